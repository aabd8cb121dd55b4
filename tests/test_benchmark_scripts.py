"""The GPU benchmark's code path, run on the CPU with a tiny UNet (--dry-run): it must finish and
report every configuration it measures, with the engine's byte counts of the simulated bands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_benchmark_dry_run_reports_every_configuration(tmp_path: Path) -> None:
    output = tmp_path / "gpu.json"
    script = ROOT / "benchmarks" / "gpu_sdxl_unet.py"
    subprocess.run(
        [sys.executable, str(script), "--dry-run", "--output", str(output)], check=True, timeout=300
    )
    report = json.loads(output.read_text())
    (entry,) = report["results"]["resolutions"].values()
    assert entry["plain"]["median_s"] > 0 and entry["distri_1_rank_eager"]["median_s"] > 0
    assert sorted(entry["simulated_bands_eager"], key=int) == ["2", "4", "8"]
    received = []
    for world, band in entry["simulated_bands_eager"].items():
        stats = band["steady_stats_per_step"]
        # A rank receives what every other rank sends: (world - 1) times its own.
        assert stats["bytes_received"] == (int(world) - 1) * stats["bytes_sent"] > 0
        assert band["compute"]["median_s"] > 0
        received.append(stats["bytes_received"])
    assert received == sorted(received)  # more bands, more bytes received per rank
    assert report["results"]["cuda_graphs"]["supported"] is False  # no CUDA here, and it says so
    assert report["results"]["skipped"] == []


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
