"""Two ranks of the served UNet group on one GPU, in a gloo group (NCCL refuses two ranks on one
device; gloo's all-gathers go through host memory): what a one-GPU machine checks of the multi-rank
CUDA path. Device placement, full_sync against one rank, the production settings (fp16, CUDA
graphs, corrected_async_gn) captured at warm-up and replayed, steps timed on the device, the memory
check against the CUDA allocator, and the group rebuilt after a rank is killed by pid."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import torch
from ranks import TEXT_TOKENS, denoise_request, full_sync_error, relative_error, save_unet_only

from distrifusion.config import DistriConfig
from distrifusion.serving.memory import peak_growth
from distrifusion.serving.unet_group import REBUILDING, SERVING, UNetGroup


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_unet_only(tmp_path_factory.mktemp("unet-only"))


def test_full_sync_with_two_ranks_on_one_gpu_equals_one_rank(model_dir: Path) -> None:
    error = full_sync_error(model_dir, [0, 0], backend="gloo")
    assert error <= 1e-5, error


def test_production_settings_two_ranks_on_one_gpu_warm_up_replay_and_rebuild(model_dir: Path) -> None:
    config = DistriConfig(device="cuda")  # fp16, CUDA graphs, corrected_async_gn
    assert config.cuda_graphs and config.dtype == "fp16"
    group = UNetGroup(str(model_dir), config, ranks=2, devices=[0, 0], backend="gloo")
    try:
        group.warm_up(512, 512, TEXT_TOKENS)
        captured = group.pipeline.unet.graphs.captures
        assert captured > 0
        first = group.denoise(denoise_request(steps=12))
        assert group.pipeline.unet.graphs.captures == captured, "the warm-up captured every phase"
        assert torch.isfinite(first.latents).all()
        steady = [step for step in group.pipeline.unet.steps if step.phase == "steady"]
        assert steady and all(step.communication.bytes_sent > 0 for step in steady)
        # Timed on the device (CUDA events), and a size of 4x the work expected from it.
        expected = group.step_times.expected(2, 1024, 1024)
        assert expected is not None and expected.seconds > 0
        print(f"a 512x512 step: {group.step_times.expected(2, 512, 512)}; 1024x1024 expected: {expected}")

        generation = denoise_request(steps=12)
        held = group._holds(generation)
        estimate = group.memory.estimate(2, 512, 512, held)
        with peak_growth(group.pipeline.unet.device) as peak:
            again = group.denoise(generation)
        print(f"memory: held {held}, estimate {estimate / 2**20:.1f} MiB, measured {peak[0] / 2**20:.1f} MiB")
        assert peak[0] <= estimate, (peak[0], estimate)
        assert torch.equal(first.latents, again.latents)

        (pid,) = group.worker_pids
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while group.state == SERVING and time.monotonic() - killed < 5:
            time.sleep(0.05)
        assert group.state == REBUILDING
        assert group.wait_serving(timeout=120) == SERVING
        rebuilt = group.denoise(denoise_request(steps=12))
        assert relative_error(rebuilt.latents, first.latents) <= 1e-3
        assert group.devices == ["cuda:0", "cuda:0"]
    finally:
        group.close()
