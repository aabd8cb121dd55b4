"""The compiled engine (``DistriConfig(compile=...)``) on gloo ranks: against eager and against the
single-process pipeline, without recompiling a size it has compiled, and served by tritonserver.

The suite compiles with the ``aot_eager`` backend: dynamo's capture of the whole band step with its
exchange operators, AOTAutograd's functionalisation of them, the guards and the recompile counts
are the engine's part and are all exercised, in about 30 s a graph. Inductor's code generation takes
3 minutes a graph for the tiny UNet on a cold cache here (11 for two ranks compiling at once), more
than the suite can hold; ``DISTRIFUSION_TEST_COMPILE_BACKEND=inductor`` runs this module with it.
The served stage and the recompile limit compile with the ``eager`` backend (dynamo's capture and
guards only): what they test is the stage's load and the engine's guards, not the graph.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from distributed_cases import CAPTURE_BACKEND, COMPILE_BACKEND, compiled_against_eager, reference_outputs

from clients.sdxl_client import generate
from distrifusion.launch import spawn_local
from distrifusion.serving.cpu_server import CpuServer, metric_total, scrape_metrics

pytestmark = pytest.mark.slow


def band_call(world: int) -> dict:
    """A generation whose every band is 16 latent rows of 32: the bands of every rank count then
    share most compiled kernels (inductor caches them by source)."""
    return {
        "prompt": "a watercolor painting of a lighthouse at dawn",
        "negative_prompt": "blurry, low contrast",
        "height": 128 * world,
        "width": 256,
        "num_inference_steps": 4,
        "guidance_scale": 5.0,
        "seed": 7,
    }


# full_sync, sync_gn, corrected_async_gn and stale_gn trace to one graph (what differs between them
# runs inside the exchange operator); naive_patch exchanges nothing and is a graph of its own.
MODES = {1: ["full_sync"], 2: ["full_sync", "corrected_async_gn", "naive_patch"]}


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.fixture(scope="module", params=[1, 2], ids=lambda world: f"{world}ranks")
def compiled_runs(request: pytest.FixtureRequest, tiny_sdxl_dir: Path) -> tuple[int, dict]:
    world = request.param
    runs = spawn_local(
        compiled_against_eager,
        world,
        (str(tiny_sdxl_dir), MODES[world], band_call(world), COMPILE_BACKEND),
        threads_per_rank=1,
    )
    return world, runs


def test_compiled_equals_eager_in_every_mode(compiled_runs) -> None:
    world, runs = compiled_runs
    for mode, run in runs.items():
        for generation in run["compiled"]:
            error = relative_error(generation["latents"], run["eager"])
            # fp32: the compiled graph reorders sums (fused kernels, one-pass GroupNorm moments).
            assert error <= 1e-5, f"{world} ranks, {mode}: compiled differs from eager by {error:.2e}"


def test_compiled_full_sync_equals_the_single_process_pipeline(compiled_runs, tiny_sdxl_dir: Path) -> None:
    world, runs = compiled_runs
    torch.set_num_threads(1)
    (reference,) = reference_outputs(str(tiny_sdxl_dir), [band_call(world)])
    error = relative_error(runs["full_sync"]["compiled"][0]["latents"], reference)
    assert error <= 1e-5, f"{world} ranks: compiled full_sync differs by {error:.2e}"


def test_every_step_runs_compiled_and_a_size_compiles_once(compiled_runs) -> None:
    world, runs = compiled_runs
    for mode, run in runs.items():
        first, second = run["compiled"]
        assert all(first["compiled"]) and all(second["compiled"]), mode
        if mode != "full_sync":  # full_sync's steps are all synchronous
            assert {"warmup", "steady", "last"} <= set(first["phases"]), (mode, first["phases"])
        # One graph for every phase: what differs between steps runs inside the exchange operator.
        assert first["new_graphs"][0] >= 1 and sum(first["new_graphs"][1:]) == 0, (mode, first)
        assert sum(second["new_graphs"]) == 0, f"{world} ranks, {mode}: recompiled {second['new_graphs']}"


@pytest.mark.server
def test_a_compiled_stage_compiles_its_warmup_size_at_load_and_runs_other_sizes_eager(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    """Built with --compile, the UNet stage compiles its warm-up size before Triton reports ready:
    requests of that size run compiled, with no compile while serving; a size it did not warm up
    runs eager (a compile would stall the request for minutes) and is counted as such."""
    repository = tmp_path / "repository"
    root = Path(__file__).resolve().parents[1]
    build = [sys.executable, "-m", "build_engines", "--model", str(tiny_sdxl_dir), "--output", str(repository),
             "--target", "cpu", "--unet-ranks", "2", "--compile", CAPTURE_BACKEND, "--warmup-resolutions", "256x256",
             # A step floor far below the compile: the warm-up's compiling step gets the compile deadline.
             "--step-deadline-s", "3"]  # fmt: skip
    subprocess.run(build, check=True, cwd=root, timeout=600)
    with CpuServer(repository, tmp_path / "server.log") as server:

        def served(height: int) -> tuple[np.ndarray, float, float, float]:
            before = scrape_metrics(server.metrics)
            image = generate(server.grpc, prompts=["a red fox"], seeds=[7], height=height, width=256,
                             num_inference_steps=4, timeout=300)["images"]  # fmt: skip
            after = scrape_metrics(server.metrics)
            return image, *(
                metric_total(after, name) - metric_total(before, name)
                for name in (
                    "distrifusion_unet_steps_total",
                    "distrifusion_unet_compiled_steps_total",
                    "distrifusion_unet_compiles_total",
                )
            )

        image, steps, compiled_steps, compiles = served(256)
        assert image.shape == (1, 256, 256, 3) and image.std() > 0
        assert (steps, compiled_steps, compiles) == (4, 4, 0)
        image, steps, compiled_steps, compiles = served(128)
        assert image.shape == (1, 128, 256, 3) and image.std() > 0
        assert (steps, compiled_steps, compiles) == (4, 0, 0)


def test_a_size_past_the_recompile_limit_fails_loudly_instead_of_running_eager() -> None:
    """dynamo runs a function eagerly, with only a warning, once it has compiled more graphs than its
    recompile limit, unless the compile is ``fullgraph``. The engine compiles with ``fullgraph``:
    a size past the limit must raise, never run eager while its steps say "compiled". Simulated
    band of 2 ranks, the ``eager`` backend (the capture and its guards, no code generation)."""
    from diffusers import UNet2DConditionModel
    from torch._dynamo.exc import FailOnRecompileLimitHit

    from distrifusion.collectives import ReplicatingCollective
    from distrifusion.config import DistriConfig
    from distrifusion.tiny_model import sdxl_unet_config
    from distrifusion.topology import Topology
    from distrifusion.unet import DistriUNet, GenerationInfo

    torch.manual_seed(0)
    config = sdxl_unet_config(cross_attention_dim=96, pooled_projection_dim=64)
    unet = DistriUNet(UNet2DConditionModel(**config).eval(), DistriConfig(mode="full_sync", compile="eager"),
                      topology=Topology(world=2, rank=0), collective=ReplicatingCollective())  # fmt: skip

    def step(size: int) -> None:
        unet.begin_generation(GenerationInfo(do_classifier_free_guidance=True, num_timesteps=1))
        with torch.no_grad():
            unet(torch.randn(2, 4, size, size), torch.tensor(500.0), encoder_hidden_states=torch.randn(2, 77, 96),
                 added_cond_kwargs={"text_embeds": torch.randn(2, 64),
                                    "time_ids": torch.tensor([[8.0 * size] * 2 + [0, 0] + [8.0 * size] * 2] * 2)})  # fmt: skip

    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(recompile_limit=1):
            step(16)
            (record,) = unet.steps
            assert record.compiled and record.new_graphs == 1
            with pytest.raises(FailOnRecompileLimitHit):
                step(24)
    finally:
        torch._dynamo.reset()
