"""The chaos soak's short version (benchmarks/chaos_soak.py runs 10 minutes with a kill a minute):
90 s at concurrency 4 on the CPU server with one UNet worker SIGKILLed; every request accounted for."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.chaos_soak import chaos_soak
from benchmarks.soak import load_requests
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

pytestmark = [pytest.mark.server, pytest.mark.slow]


def test_ninety_seconds_with_one_worker_killed(tmp_path: Path) -> None:
    requests = [r for r in load_requests() if r["height"] * r["width"] <= 512 * 512]
    with CpuServer(ensure_cpu_repository(), tmp_path / "server.log") as server:
        report = chaos_soak(server, seconds=90, concurrency=4, kill_every_s=45, requests=requests)
    print({key: value for key, value in report.items() if key != "rss_mib"})
    assert report["other"] == 0, report["other_errors"]
    assert report["sent"] == report["succeeded"] + report["documented"]
    (kill,) = report["kills"]
    assert kill["not_ready_after_s"] < 5 and kill["ready_again_after_s"] <= 30, kill
    assert kill["served_again_after_s"] is not None and kill["served_again_after_s"] <= 30, kill
    assert report["succeeded"] > 0
