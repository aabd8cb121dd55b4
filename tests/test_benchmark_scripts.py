"""The GPU benchmark's code path, run on the CPU with a tiny UNet (--dry-run): it must finish and
report every configuration it can measure without CUDA, with the engine's byte counts of the
simulated bands equal to a count from the layer shapes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def analytic_bytes_sent(resolution: int, bands: list[int]) -> dict[int, dict[str, int]]:
    """What one rank of the GPU benchmark's tiny UNet sends per steady step, counted from its layer
    shapes alone (benchmarks/analytic_bytes.py), not by the engine."""
    from benchmarks.analytic_bytes import analytic_bytes, layer_shapes
    from benchmarks.gpu_sdxl_unet import TINY_UNET_CONFIG, build_unet, call_unet, make_inputs

    unet = build_unet(TINY_UNET_CONFIG, torch.device("cpu"), torch.float32, 0)
    layers, handles = layer_shapes(unet)
    call_unet(unet, make_inputs(TINY_UNET_CONFIG, resolution, torch.device("cpu"), torch.float32, 0))
    for handle in handles:
        handle.remove()
    latent, levels = resolution // 8, len(TINY_UNET_CONFIG["block_out_channels"])
    return {n: analytic_bytes(layers, latent, latent, levels, n, "corrected_async_gn") for n in bands}


def test_gpu_benchmark_dry_run_reports_every_configuration(tmp_path: Path) -> None:
    """Eager and compiled (the ``eager`` dynamo backend: the capture, not a code generator), with
    the engine's byte counts equal to the count from the layer shapes. CUDA graphs need CUDA: the
    report must say they were not measured (tests/gpu and scripts/gpu_check.sh run them)."""
    output = tmp_path / "gpu.json"
    script = ROOT / "benchmarks" / "gpu_sdxl_unet.py"
    subprocess.run(
        [sys.executable, str(script), "--dry-run", "--bands", "2", "8", "--compile", "eager", "--output", str(output)],
        check=True, timeout=600,
    )  # fmt: skip
    report = json.loads(output.read_text())
    results = report["results"]
    ((resolution, entry),) = results["resolutions"].items()
    assert report["settings"]["mode"] == "corrected_async_gn"
    expected = analytic_bytes_sent(int(resolution), [2, 8])
    for key in ("plain", "distri_1_rank_eager", "plain_compiled"):
        assert entry[key]["median_s"] > 0, key
    for key, compiled in (("simulated_bands_eager", False), ("simulated_bands_compiled", True)):
        assert sorted(entry[key], key=int) == ["2", "8"], key
        for world, band in entry[key].items():
            counted = expected[int(world)]
            assert band["steady_stats_per_step"]["bytes_sent"] == counted["total_bytes"] > 0, (key, world)
            assert band["output_gather_bytes_sent"] == counted["out_bytes"], (key, world)
            assert band["compute"]["median_s"] > 0
            assert band["ran_compiled"] is compiled, (key, world)
            assert (band["graphs_compiled"] >= 1) is compiled and band["graphs_compiled_while_timed"] == 0
    assert "error" not in results["compiled"], results["compiled"]
    assert results["cuda_graphs"]["supported"] is False and "distri_1_rank_cuda_graphs" not in entry
    assert results["skipped"] == []


def test_layers_write_their_fresh_data_straight_into_the_send_buffers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Counted with the benchmark's operator counter: with the send buffers offered, every halo and
    moment exchange is one stack into its buffer; without, a stack and a copy."""
    from benchmarks.band_operator_counts import OperatorCount, count_case
    from benchmarks.gpu_sdxl_unet import TINY_UNET_CONFIG
    from distrifusion.exchange import Exchange

    with OperatorCount() as counted:
        x = torch.ones(4, 6)
        torch.stack([x[:2], x[2:]]).view(-1).add_(1)
    assert dict(counted.counts) == {"ones": 1, "stack": 1, "add_": 1}  # views and allocations left out

    direct = count_case("corrected_async_gn", 2, TINY_UNET_CONFIG, resolution=128)
    monkeypatch.setattr(Exchange, "send_buffer", lambda self, key: None)
    copied = count_case("corrected_async_gn", 2, TINY_UNET_CONFIG, resolution=128)
    stacked = direct["grown"]["stack"][1]
    assert stacked > 0 and direct["plain"] == copied["plain"]
    assert copied["band"] - direct["band"] == stacked


def test_the_gpu_check_names_what_this_machine_lacks_before_any_gpu_work(tmp_path: Path) -> None:
    """On a machine without CUDA it stops at its prerequisites, in seconds, naming what is missing
    and which stages would not run; a lent machine spends no GPU time learning that."""
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the check would run")
    script = ROOT / "scripts" / "gpu_check.sh"
    done = subprocess.run(
        ["bash", str(script), "quick"], env={**os.environ, "OUT": str(tmp_path)}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 1, done.stdout + done.stderr
    log = (tmp_path / "gpu_check.log").read_text()
    assert "MISSING   torch with CUDA: needed by every stage" in log
    assert "stages: gpu test tier SKIPPED" in log
    assert "cannot run the GPU checks: torch with CUDA missing" in log
    assert "== gpu_tests" not in log, "no stage runs without its prerequisites"
    usage = subprocess.run(["bash", str(script), "slow"], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage: scripts/gpu_check.sh [quick|full]" in usage.stderr
