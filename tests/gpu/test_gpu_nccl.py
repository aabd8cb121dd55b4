"""The served UNet group on several GPUs with NCCL (skipped with fewer than two): every rank on its
own GPU, full_sync equal to one GPU, the production settings (fp16, CUDA graphs, asynchronous)
finite, warm-up at load and replay of its graphs.

fp32 comparisons turn TF32 off in every rank through the group's placement hook
(:class:`~distrifusion.launch.ExactFp32`): a fixture of this process would not reach
the spawned ranks, whose cuDNN convolutions would run in TF32 (errors near 1e-3)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from ranks import TEXT_TOKENS, denoise_request, full_sync_error, save_unet_only

from distrifusion.config import DistriConfig
from distrifusion.serving.unet_group import UNetGroup

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs for NCCL")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_unet_only(tmp_path_factory.mktemp("unet-only"))


def test_full_sync_on_two_gpus_equals_one_gpu(model_dir: Path) -> None:
    error = full_sync_error(model_dir, [0, 1])
    assert error <= 1e-5, error


def test_production_settings_on_every_gpu(model_dir: Path) -> None:
    count = torch.cuda.device_count()
    config = DistriConfig(device="cuda")  # fp16, CUDA graphs, corrected_async_gn
    assert config.cuda_graphs and config.dtype == "fp16"
    group = UNetGroup(str(model_dir), config, ranks=count, devices=list(range(count)))
    try:
        assert group.devices == [f"cuda:{index}" for index in range(count)]
        group.warm_up(512, 512, TEXT_TOKENS)
        captured = group.pipeline.unet.graphs.captures
        first = group.denoise(denoise_request(steps=12))
        again = group.denoise(denoise_request(steps=12))
        assert group.pipeline.unet.graphs.captures == captured, "the warm-up captured every phase"
        assert torch.isfinite(first.latents).all()
        assert torch.equal(first.latents, again.latents)
        steady = [s for s in group.pipeline.unet.steps if s.phase == "steady"]
        assert steady and all(s.communication.bytes_sent > 0 for s in steady)
    finally:
        group.close()
