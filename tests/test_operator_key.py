"""The operator's key file and the supervisor's side of the lock-down and of readiness, without a
server: what it refuses to start with, and which models it loads back (a recovery's) or leaves to
the operator (an unload it did not make), and the stubs it cleans up after the server exits."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from distrifusion.serving import processes
from distrifusion.serving import supervisor as supervisor_module
from distrifusion.serving.health import GATE, HealthBoard
from distrifusion.serving.operator_key import (
    KEY_FILE_VARIABLE,
    OperatorKeyError,
    create_key,
    read_key,
    restricted_server_flags,
)
from distrifusion.serving.supervisor import Supervisor
from distrifusion.serving.supervisor_metrics import SupervisorMetrics

GOOD_KEY = "k" * 40


def test_created_keys_are_owner_only_and_kept(tmp_path: Path) -> None:
    path, created = create_key(tmp_path / "config" / "distrifusion" / "operator-key")
    assert created and path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700
    key = read_key(path)
    assert len(key) == 64 and key != read_key(create_key(tmp_path / "other")[0])
    assert create_key(path) == (path, False) and read_key(path) == key


@pytest.mark.parametrize(
    ("mode", "content", "message"),
    [
        (0o644, GOOD_KEY, "others may read or change the operator key"),
        (0o620, GOOD_KEY, "others may read or change the operator key"),
        (0o600, "short", "32 to 256 characters"),
        (0o600, "k" * 31 + ":", "32 to 256 characters"),
        (0o600, "k" * 20 + "=" + "k" * 20, "32 to 256 characters"),
    ],
)
def test_unusable_key_files_are_refused(tmp_path: Path, mode: int, content: str, message: str) -> None:
    path = tmp_path / "operator-key"
    path.write_text(content + "\n")
    path.chmod(mode)
    with pytest.raises(OperatorKeyError, match=message):
        read_key(path)
    with pytest.raises(OperatorKeyError, match=message):
        create_key(path)  # an existing file is the operator's: never replaced
    assert path.read_text() == content + "\n"


def test_a_kubernetes_secret_file_is_accepted(tmp_path: Path) -> None:
    # A Secret volume with defaultMode 0400 and the pod's fsGroup: kubelet adds group read.
    path = tmp_path / "operator-key"
    path.write_text(GOOD_KEY)
    path.chmod(0o440)
    assert read_key(path) == GOOD_KEY


def test_a_missing_key_names_where_it_was_looked_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_FILE_VARIABLE, str(tmp_path / "absent"))
    with pytest.raises(OperatorKeyError, match=f"no operator key at {tmp_path / 'absent'}"):
        read_key()


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        ("--http-restricted-api=health:k=v", "set by the supervisor"),
        ("--grpc-restricted-protocol=inference:k=v", "set by the supervisor"),
        ("--allow-sagemaker=true", "loads models without the operator key"),
        ("--allow-vertex-ai=1", "loads models without the operator key"),
    ],
)
def test_commands_that_would_weaken_the_restriction_are_refused(argument: str, message: str) -> None:
    with pytest.raises(OperatorKeyError, match=message):
        restricted_server_flags(["tritonserver", argument], GOOD_KEY)


def test_the_restriction_covers_both_protocols() -> None:
    command = restricted_server_flags(["tritonserver", "--allow-sagemaker=false"], GOOD_KEY)
    apis = "model-repository,shared-memory,trace,logging"
    assert command[2:] == [
        f"--http-restricted-api={apis}:operator-key={GOOD_KEY}",
        f"--grpc-restricted-protocol={apis}:operator-key={GOOD_KEY}",
    ]


@pytest.mark.parametrize("problem", ["missing", "readable", "restricted-flag"])
def test_the_supervisor_runs_no_server_without_a_usable_key(tmp_path: Path, problem: str) -> None:
    marker = tmp_path / "server-ran"
    server = tmp_path / "tritonserver"
    server.write_text(f"#!/bin/sh\ntouch {marker}\n")
    server.chmod(0o755)
    key_file = tmp_path / "operator-key"
    if problem != "missing":
        key_file.write_text(GOOD_KEY)
        key_file.chmod(0o644 if problem == "readable" else 0o600)
    command = [str(server), "--model-control-mode=explicit"]
    if problem == "restricted-flag":
        command.append("--http-restricted-api=health:k=v")
    result = subprocess.run(
        [sys.executable, "-m", "distrifusion.serving.supervisor", "--metrics-port=0", "--", *command],
        env={**os.environ, KEY_FILE_VARIABLE: str(key_file)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2, result.stderr
    assert "supervisor: " in result.stderr and not marker.exists()


# --- readiness: which models the supervisor loads back ---------------------------------------------

SERVED = ("sdxl", "tokenizer", "unet", "vae_decoder", "vae_decoder_whole")


class FakeTriton:
    """Triton's model-control API as the supervisor sees it; ``on_reload`` may drop models, as
    tritonserver 2.51 dropped the ensemble when a killed version stayed UNLOADING."""

    def __init__(self) -> None:
        self.states = {model: ("READY", "") for model in SERVED}
        self.calls: list[tuple[str, str]] = []
        self.dropped_on_reload: list[str] = []
        self.lock = threading.Lock()

    def ready(self) -> bool:
        return True

    def models(self) -> dict[str, tuple[str, str]]:
        with self.lock:
            return dict(self.states)

    def state(self, model: str) -> str | None:
        return self.models().get(model, (None, ""))[0]

    def load(self, model: str, timeout: float) -> None:
        with self.lock:
            self.calls.append(("load", model))
            if model != GATE:
                self.states[model] = ("READY", "")

    def unload(self, model: str, timeout: float) -> None:
        with self.lock:
            self.calls.append(("unload", model))

    def reload(self, model: str, timeout: float) -> None:
        with self.lock:
            self.calls.append(("reload", model))
            self.states[model] = ("READY", "")
            for dropped in self.dropped_on_reload:
                self.states[dropped] = ("UNAVAILABLE", "unloaded")


class FakeServer:
    pid = 0

    def poll(self) -> None:
        return None


@pytest.fixture
def watched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Supervisor, FakeTriton, dict[int, str]]:
    stubs = {pid: model for pid, model in enumerate(m for m in SERVED if m != "sdxl")}
    monkeypatch.setattr(supervisor_module, "stub_models", lambda _pid: dict(stubs))
    triton = FakeTriton()
    supervisor = Supervisor(FakeServer(), triton, HealthBoard(tmp_path), SupervisorMetrics(), 3, 600.0)
    supervisor._expected = {model: 1 for model in stubs.values()}
    supervisor.served = list(SERVED)
    return supervisor, triton, stubs


def _gauge(metrics: SupervisorMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels)


def _settle(supervisor: Supervisor, polls: int = 3) -> None:
    for _ in range(polls):
        supervisor.watch_once()
        if supervisor._gate_thread is not None:
            supervisor._gate_thread.join(timeout=5)


def test_a_model_the_operator_unloaded_is_left_to_the_operator(watched, capsys) -> None:
    supervisor, triton, _ = watched
    triton.states["sdxl"] = ("UNAVAILABLE", "unloaded")
    _settle(supervisor)
    assert ("load", GATE) in triton.calls and ("load", "sdxl") not in triton.calls
    assert supervisor.state == "held"
    assert _gauge(supervisor.metrics, "distrifusion_model_ready", model="sdxl") == 0
    assert _gauge(supervisor.metrics, "distrifusion_model_ready", model="unet") == 1
    assert _gauge(supervisor.metrics, "distrifusion_ready") == 0
    log = capsys.readouterr().err
    assert log.count("not ready: sdxl is UNAVAILABLE (unloaded)") == 1, "one line per change"
    assert "until the operator loads it" in log

    triton.states["sdxl"] = ("READY", "")  # the operator loads it again
    _settle(supervisor)
    assert ("unload", GATE) in triton.calls and supervisor.state == "watching"
    assert _gauge(supervisor.metrics, "distrifusion_ready") == 1
    assert "readiness restored" in capsys.readouterr().err


def test_models_dropped_during_a_recovery_are_loaded_back(watched, capsys) -> None:
    supervisor, triton, stubs = watched
    dead = next(pid for pid, model in stubs.items() if model == "vae_decoder")
    del stubs[dead]
    triton.dropped_on_reload = ["sdxl", "vae_decoder_whole"]
    supervisor.watch_once()
    stubs[dead] = "vae_decoder"  # the reload started a new stub
    supervisor.watch_once()  # the next poll sees what the reload dropped
    assert [call for call in triton.calls if call[1] != GATE] == [
        ("reload", "vae_decoder"),
        ("load", "sdxl"),
        ("load", "vae_decoder_whole"),
    ]
    _settle(supervisor)
    assert supervisor.state == "watching" and ("unload", GATE) in triton.calls
    assert _gauge(supervisor.metrics, "distrifusion_model_reloads_total", model="sdxl", result="ok") == 1
    log = capsys.readouterr().err
    assert "sdxl was dropped during the recovery: loading it again" in log
    assert "until the operator loads it" not in log


def test_stubs_left_running_after_the_server_exits_are_killed(tmp_path: Path, monkeypatch, capsys) -> None:
    """As tritonserver leaves a stub busy in execute() when --exit-timeout-secs runs out: the
    stub (a real process named like one) is killed; another program under a seen pid is spared."""
    stub = subprocess.Popen(["bash", "-c", f"exec -a {tmp_path}/triton_python_backend_stub sleep 120"])
    other = subprocess.Popen(["sleep", "120"])
    try:
        deadline = time.monotonic() + 10
        while not processes.cmdline(stub.pid)[0].endswith("triton_python_backend_stub"):
            assert time.monotonic() < deadline, "the stand-in stub did not start"
            time.sleep(0.05)
        monkeypatch.setattr(
            supervisor_module, "stub_models", lambda _pid: {stub.pid: "unet", other.pid: "unet"}
        )
        monkeypatch.setattr(supervisor_module, "_STUB_GRACE_S", 0.5)
        monkeypatch.setattr(supervisor_module, "_POLL_SECONDS", 0.01)
        triton = FakeTriton()
        triton.states = {}
        supervisor = Supervisor(
            ExitingServer(polls=6), triton, HealthBoard(tmp_path), SupervisorMetrics(), 3, 600.0
        )
        assert supervisor.run() == 0
        assert stub.wait(timeout=10) == -signal.SIGKILL
        assert other.poll() is None, "a process that is not a stub was killed"
        assert f"killed stub(s) [{stub.pid}] still running" in capsys.readouterr().err
    finally:
        for process in (stub, other):
            process.kill()
            process.wait()


class ExitingServer:
    """A tritonserver that runs for ``polls`` polls and exits with 0."""

    pid = 0
    returncode = 0

    def __init__(self, polls: int) -> None:
        self.polls = polls

    def poll(self) -> int | None:
        self.polls -= 1
        return None if self.polls > 0 else 0
