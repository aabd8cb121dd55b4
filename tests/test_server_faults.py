"""Faults on the real CPU tritonserver (2.51, under the supervisor): lost UNet ranks, ranks that
raise or stop, killed stubs, and a group that cannot be rebuilt. Every fault is real (SIGKILL and
SIGSTOP by pid, or the test-only injection file); readiness is Triton's own /v2/health/ready.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from processes import descendants, still_running_after
from tritonclient.utils import InferenceServerException

from clients.sdxl_client import generate
from distrifusion.serving.cpu_server import CpuServer, metric_total, scrape_metrics
from distrifusion.serving.faults import INJECTION_VARIABLE
from distrifusion.serving.health import HEALTH_DIR_VARIABLE

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"height": 128, "width": 128, "num_inference_steps": 4}
LONG = {"height": 256, "width": 256, "num_inference_steps": 300}
FAULT_FLAGS = ["--step-deadline-s", "3", "--max-rebuilds", "2", "--collective-timeout-s", "60",
               "--warmup-resolutions", "256x256", "--max-resolution", "512x512"]  # fmt: skip


def build(tiny_sdxl_dir: Path, output: Path, ranks: int) -> Path:
    command = [sys.executable, "-m", "build_engines", "--model", str(tiny_sdxl_dir), "--output", str(output),
               "--target", "cpu", "--unet-ranks", str(ranks), *FAULT_FLAGS]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    return output


class FaultyServer(CpuServer):
    def __init__(self, repository: Path, directory: Path) -> None:
        self.faults = directory / "faults.json"
        self.health = directory / "health"
        os.environ[INJECTION_VARIABLE], os.environ[HEALTH_DIR_VARIABLE] = str(self.faults), str(self.health)
        try:
            super().__init__(repository, directory / "server.log")
        finally:
            del os.environ[INJECTION_VARIABLE], os.environ[HEALTH_DIR_VARIABLE]

    def ready(self) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
        except OSError:
            return 0

    def unet_workers(self) -> list[int]:
        return sorted(pid for role, pid in self.processes().items() if role.startswith("unet:rank"))

    def stub(self, model: str) -> int:
        return self.processes()[f"stub:{model}"]

    def readiness_while(self, seconds: float) -> list[tuple[float, int]]:
        """Readiness changes over the next ``seconds``, polled every 0.1 s, in a background thread."""
        changes: list[tuple[float, int]] = []

        def poll() -> None:
            started = time.monotonic()
            while time.monotonic() - started < seconds:
                code = self.ready()
                if not changes or changes[-1][1] != code:
                    changes.append((time.monotonic() - started, code))
                time.sleep(0.1)

        threading.Thread(target=poll, daemon=True).start()
        return changes

    def wait_serving(self, seconds: float = 60) -> float:
        """Seconds until a small request succeeds again."""
        started = time.monotonic()
        while time.monotonic() - started < seconds:
            try:
                generate(self.grpc, prompts=["again"], seeds=[1], timeout=120, **SMALL)
                return time.monotonic() - started
            except InferenceServerException:
                time.sleep(0.5)
        raise TimeoutError(f"not serving again within {seconds} s:\n{self.log_tail()}")

    def stop_and_check(self) -> None:
        tree = descendants(self.process.pid) | {self.process.pid}
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        assert still_running_after(tree, seconds=15) == set(), "no process of the server's tree is left"


@pytest.fixture(scope="module")
def server(tiny_sdxl_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FaultyServer]:
    directory = tmp_path_factory.mktemp("faulty")
    running = FaultyServer(build(tiny_sdxl_dir, directory / "repository", ranks=2), directory)
    try:
        running.wait_ready()
        yield running
    finally:
        if running.process.poll() is None:
            running.stop_and_check()


@pytest.fixture(scope="module")
def clean_image(server: FaultyServer) -> np.ndarray:
    return generate(server.grpc, prompts=["a red fox"], seeds=[7], **SMALL)["images"]


def test_a_worker_killed_while_idle_is_replaced_and_readiness_says_so(server, clean_image) -> None:
    before = scrape_metrics(server.metrics)
    assert metric_total(before, "distrifusion_group_restarts_total", reason="rank_exited") == 0
    assert metric_total(before, "distrifusion_failures_total", kind="unavailable") == 0  # exported from 0
    changes = server.readiness_while(45)
    (worker,) = server.unet_workers()
    os.kill(worker, signal.SIGKILL)
    serving_after = server.wait_serving()
    deadline = time.monotonic() + 15
    while server.ready() != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    codes = [code for _, code in changes]
    assert 200 in codes and any(code != 200 for code in codes[codes.index(200) :]), changes
    assert codes[-1] == 200, changes
    not_ready_at = next(at for at, code in changes if code != 200)
    assert not_ready_at < 5, f"readiness went false {not_ready_at:.1f} s after the kill"
    assert serving_after <= 30, f"serving again after {serving_after:.1f} s"
    after = scrape_metrics(server.metrics)
    assert metric_total(after, "distrifusion_group_restarts_total", reason="rank_exited") == 1
    assert metric_total(after, "distrifusion_live_ranks", model="unet") == 2
    assert np.array_equal(
        generate(server.grpc, prompts=["a red fox"], seeds=[7], **SMALL)["images"], clean_image
    )
    print(f"readiness false after {not_ready_at:.2f} s; serving again after {serving_after:.1f} s")


def _send(server: FaultyServer, results: dict, name: str, **fields) -> threading.Thread:
    def run() -> None:
        started = time.monotonic()
        try:
            results[name] = generate(server.grpc, prompts=[name], seeds=[1], timeout=300, **fields)
        except InferenceServerException as error:
            results[name] = error
        results[f"{name} seconds"] = time.monotonic() - started

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_a_worker_killed_during_a_request_fails_only_that_request(server) -> None:
    results: dict = {}
    long_one = _send(server, results, "long", **LONG)
    time.sleep(4)  # denoising by now
    queued = [_send(server, results, f"queued {n}", **SMALL) for n in range(2)]
    time.sleep(0.5)
    (worker,) = server.unet_workers()
    killed = time.monotonic()
    os.kill(worker, signal.SIGKILL)
    long_one.join(timeout=60)
    failed_after = time.monotonic() - killed
    error = results["long"]
    assert isinstance(error, InferenceServerException), error
    assert failed_after < 10, f"the request in flight failed {failed_after:.1f} s after the kill"
    assert error.status() == "StatusCode.UNAVAILABLE", error
    assert "rank 1 (cpu) was killed by SIGKILL at step" in error.message()
    assert "safe to retry" in error.message()
    for thread in queued:
        thread.join(timeout=120)
    for n in range(2):
        assert isinstance(results[f"queued {n}"], dict), results[f"queued {n}"]  # served after the rebuild


@pytest.mark.parametrize("rank", [1, 0])
def test_a_rank_that_raises_fails_the_request_and_the_next_equals_a_clean_run(
    server, clean_image, rank
) -> None:
    server.faults.write_text(json.dumps({"raise": [{"rank": rank, "step": 1}]}))
    with pytest.raises(
        InferenceServerException, match=f"rank {rank} \\(cpu\\) raised RuntimeError: injected"
    ) as raised:
        generate(server.grpc, prompts=["a red fox"], seeds=[7], **SMALL)
    assert raised.value.status() == "StatusCode.UNAVAILABLE"
    server.wait_serving()
    assert np.array_equal(
        generate(server.grpc, prompts=["a red fox"], seeds=[7], **SMALL)["images"], clean_image
    )


def test_a_stopped_worker_fails_the_request_by_the_deadline_and_is_ended(server) -> None:
    results: dict = {}
    long_one = _send(server, results, "long", **LONG)
    time.sleep(4)
    (worker,) = server.unet_workers()
    stopped = time.monotonic()
    os.kill(worker, signal.SIGSTOP)
    long_one.join(timeout=60)
    error = results["long"]
    assert isinstance(error, InferenceServerException) and "is stopped and did not finish a step" in str(
        error
    )
    assert time.monotonic() - stopped < 3 + 10, "nothing waits much past the deadline"
    assert still_running_after([worker], seconds=5) == set(), "the stopped process is ended"
    server.wait_serving()


@pytest.mark.parametrize("model", ["unet", "vae_decoder"])
def test_a_killed_stub_is_replaced_and_the_stage_serves_again(server, model) -> None:
    changes = server.readiness_while(60)
    stub = server.stub(model)
    workers = server.unet_workers() if model == "unet" else []
    os.kill(stub, signal.SIGKILL)
    serving_after = server.wait_serving(seconds=90)
    if model == "vae_decoder":
        assert serving_after <= 30, f"serving again after {serving_after:.1f} s"
    assert still_running_after(workers, seconds=5) == set(), "a killed stub's ranks exit within 5 s"
    assert server.stub(model) != stub
    deadline = time.monotonic() + 15
    while server.ready() != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert any(code != 200 for _, code in changes) and server.ready() == 200, changes


def test_sigterm_leaves_no_process(server) -> None:
    server.stop_and_check()


def test_repeated_failed_rebuilds_leave_the_server_not_ready_and_the_probe_failing(
    tiny_sdxl_dir: Path, tmp_path: Path
) -> None:
    """Three ranks; rank 1 cannot start any more, then rank 2 is killed: two failed rebuilds give up."""
    running = FaultyServer(build(tiny_sdxl_dir, tmp_path / "repository", ranks=3), tmp_path)
    try:
        running.wait_ready()
        probe = [sys.executable, "-m", "distrifusion.serving.probe", "live", "--http", running.http,
                 "--health-dir", str(running.health)]  # fmt: skip
        assert subprocess.run(probe, capture_output=True, timeout=30).returncode == 0
        running.faults.write_text(json.dumps({"fail_start": [1]}))
        os.kill(running.unet_workers()[-1], signal.SIGKILL)
        deadline = time.monotonic() + 120
        failed = None
        while time.monotonic() < deadline:
            failed = subprocess.run(probe, capture_output=True, text=True, timeout=30)
            if failed.returncode != 0:
                break
            time.sleep(1)
        assert failed is not None and failed.returncode == 1 and "gave up" in failed.stderr, failed
        assert running.ready() != 200
        with pytest.raises(InferenceServerException, match="gave up"):
            generate(running.grpc, prompts=["a red fox"], seeds=[1], **SMALL)
        time.sleep(5)
        assert running.ready() != 200, "it stays not ready"
    finally:
        running.stop_and_check()
