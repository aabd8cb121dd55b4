"""Runs tritonserver and keeps it honest: locks down the APIs that change what it runs, replaces
dead Python-backend stubs, and holds readiness false while any model it serves is not ready.

    python -m distrifusion.serving.supervisor [--http 127.0.0.1:8000] [--metrics-port 8003] \
        -- tritonserver ARGS...

Lock-down (:mod:`.operator_key`): the supervisor reads the operator's key and adds tritonserver's
``--http-restricted-api`` and ``--grpc-restricted-protocol`` for the model-repository,
shared-memory, trace and logging APIs; it refuses to start without a usable key, and refuses a
command that sets its own restrictions or opens the SageMaker or Vertex AI endpoints (their model
loading is not covered). Its own model-control calls carry the key.

Why the rest exists (tritonserver 2.51, the CPU server, and 25.10, the production image, alike;
read in their python_backend and core sources): a stub that dies (OOM-killed, crashed) is never
restarted, and every later request to its model fails with "Stub process is not healthy"; a
model's ``is_ready()`` is not called; and ``/v2/health/ready`` stays 200 throughout, because strict
readiness only looks at each model's lifecycle state (READY, LOADING, UNAVAILABLE). A model that is
LOADING, or whose last load failed, makes the server not ready; one that is unloaded does not, so an
unloaded ``sdxl`` would leave the server ready with nothing to serve.

So, with the server in ``--model-control-mode=explicit``:

- The *served* models are those READY when the server first becomes ready (the ``--load-model``
  entry points and every model they need, BLS-called engines included). Whenever one is not
  READY, for whatever reason, readiness is false until it is back; ``distrifusion_model_ready``
  (port ``--metrics-port``) and a log line name it.
- A stub gone -> that model is unloaded and loaded again through the model-control API (new
  stubs); the ensembles that use it go and come back with it, so requests fail clearly meanwhile.
  During such a recovery, any served model that Triton dropped with it is loaded again too.
- A served model unloaded while nothing was recovering is the operator's doing (only the key
  allows it): it is not loaded back; readiness stays false until the operator loads it.
- A UNet group rebuilding (its stage says so on the health board, :mod:`.health`) -> nothing to
  do here: the stage rebuilds in its own process, so requests queued behind the fault are served.
- While anything is wrong, the *gate* model (``readiness_gate``) is being loaded: its
  ``initialize()`` waits until the supervisor opens the gate, so the server reports not ready
  until then; the gate is unloaded again afterwards (an unloaded model does not count).
- After ``--max-reloads`` failed loads of one model within ``--window-s``, or a UNet group that
  gave up, the gate is told to fail its load: the server stays not ready, and the supervisor's
  own entry on the board says ``gave_up``, which the liveness probe (:mod:`.probe`) turns into a
  container restart.

The supervisor forwards SIGTERM and SIGINT to tritonserver and exits with its exit status. A stub
still running ``_STUB_GRACE_S`` after tritonserver exited (one busy in ``execute()`` when the
server's ``--exit-timeout-secs`` ran out) is killed: it would otherwise keep its CPU or GPU.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from .health import GATE, HEALTH_DIR_VARIABLE, SUPERVISOR, HealthBoard, health_directory
from .operator_key import HEADER, KEY_FILE_VARIABLE, OperatorKeyError, read_key, restricted_server_flags
from .processes import kill_leftover_stubs, start_time, stub_models
from .supervisor_metrics import SupervisorMetrics

_POLL_SECONDS = 0.5
_UNLOAD_WAIT_S = 10.0
_STUB_GRACE_S = 5.0


class TritonControl:
    """The few HTTP calls of Triton's health and model-control APIs that the supervisor and the
    operator's tools need; ``key``: the operator's key, which the model-control calls carry."""

    def __init__(self, http: str, key: str | None = None) -> None:
        self.base = f"http://{http}"
        self.headers = {} if key is None else {HEADER: key}

    def _call(self, path: str, body: dict | None = None, timeout: float = 5.0) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.base + path, data=data, method="GET" if body is None else "POST", headers=self.headers
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                text = response.read()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as error:
            with error:  # an open connection would hold tritonserver's shutdown
                return error.code, error.read().decode(errors="replace")
        except OSError as error:
            return 0, str(error)

    def live(self) -> bool:
        return self._call("/v2/health/live")[0] == 200

    def ready(self) -> bool:
        return self._call("/v2/health/ready")[0] == 200

    def models(self) -> dict[str, tuple[str, str]] | None:
        """Model name -> (lifecycle state, Triton's reason) for every model of the repository;
        None when the index cannot be read."""
        status, index = self._call("/v2/repository/index", {})
        if status != 200 or not isinstance(index, list):
            return None
        return {entry["name"]: (entry.get("state", ""), entry.get("reason", "")) for entry in index}

    def state(self, model: str) -> str | None:
        models = self.models() or {}
        return models[model][0] if model in models else None

    def reload(self, model: str, timeout: float) -> str | None:
        """Unloads ``model`` and loads it again (new stubs); None, or the error. A load of a loaded
        model with an unchanged config would do nothing, and a dead stub is not replaced by one.
        Ensembles that use the model are unloaded with it and come back with it."""
        deadline = time.monotonic() + timeout
        # Bounded: when a stub dies inside execute(), tritonserver 2.51 never finishes unloading
        # that version (the request in flight keeps it referenced); loading anew works all the same.
        self.unload(model, _UNLOAD_WAIT_S)
        return self.load(model, max(1.0, deadline - time.monotonic()))

    def load(self, model: str, timeout: float) -> str | None:
        status, detail = self._call(f"/v2/repository/models/{model}/load", {}, timeout=timeout)
        return None if status == 200 else f"load of {model}: [{status}] {detail}"

    def unload(self, model: str, timeout: float) -> None:
        """Unloads ``model`` and waits until it is gone: Triton answers the call at once, and a load
        of the same model while it still unloads can hang."""
        self._call(f"/v2/repository/models/{model}/unload", {})
        deadline = time.monotonic() + timeout
        while self.state(model) == "UNLOADING" and time.monotonic() < deadline:
            time.sleep(0.2)


class Supervisor:
    def __init__(
        self,
        server: subprocess.Popen,
        control: TritonControl,
        board: HealthBoard,
        metrics: SupervisorMetrics,
        max_reloads: int,
        window_s: float,
    ) -> None:
        self.server = server
        self.control = control
        self.board = board
        self.metrics = metrics
        self.max_reloads = max_reloads
        self.window_s = window_s
        self._failed_loads: dict[str, collections.deque[float]] = collections.defaultdict(collections.deque)
        self._expected: dict[str, int] = {}
        """Model -> how many stubs it has when healthy."""
        self.served: list[str] = []
        """The models READY when the server first became ready: what readiness stands for."""
        self._recovering = False
        """A dead stub was seen and not every served model is back yet: models Triton drops
        meanwhile are the recovery's to load again, not the operator's choice."""
        self._problems: list[str] = []
        self._gate_thread: threading.Thread | None = None
        self.state = "starting"
        self.stopping = False
        self.stubs_seen: dict[int, int | None] = {}
        """Pid -> start time of every stub seen while the server ran: those to clean up after it exits."""

    def log(self, message: str) -> None:
        print(f"supervisor: {message}", file=sys.stderr, flush=True)

    def publish(self, state: str, **detail: Any) -> None:
        self.state = state
        self.board.publish(SUPERVISOR, state, server=self.server.pid, **detail)

    def stop(self, signum: int) -> None:
        """Passes ``signum`` on to tritonserver and stands down: no reloads while it shuts down,
        and a gate that is loading fails at once instead of holding the shutdown up."""
        self.stopping = True
        self.board.publish(GATE, "stopping")
        self.server.send_signal(signum)

    def run(self) -> int:
        self.board.publish(GATE, "closed")
        self.publish("starting")
        while self.server.poll() is None and not self.control.ready():
            self.publish("starting")
            time.sleep(_POLL_SECONDS)
        if self.server.poll() is None:
            self._expected = collections.Counter(stub_models(self.server.pid).values())
            models = self.control.models() or {}
            self.served = sorted(m for m, (state, _) in models.items() if state == "READY" and m != GATE)
            self.metrics.observe(self.served, {m: "READY" for m in self.served}, ready=True)
            self.log(f"serving {self.served}; watching stubs {dict(self._expected)}")
        while self.server.poll() is None:
            for pid in stub_models(self.server.pid):
                self.stubs_seen[pid] = start_time(pid)
            if not self.stopping:
                self.watch_once()
            time.sleep(_POLL_SECONDS)
        killed = kill_leftover_stubs(self.stubs_seen, _STUB_GRACE_S)
        if killed:
            self.log(f"killed stub(s) {killed} still running {_STUB_GRACE_S:g} s after tritonserver exited")
        return self.server.returncode

    def watch_once(self) -> None:
        if self.state == "gave_up":
            self.publish("gave_up")
            return
        models = self.control.models()
        if models is None:  # the server is busy or shutting down: judge on the next poll
            self.publish(self.state)
            return
        states = {model: state for model, (state, _) in models.items()}
        stubs = collections.Counter(stub_models(self.server.pid).values())
        missing = [model for model, count in self._expected.items() if stubs.get(model, 0) < count]
        not_ready = [model for model in self.served if states.get(model) != "READY"]
        groups = self.board.entries("unet_")
        rebuilding = sorted(name for name, entry in groups.items() if entry["state"] == "rebuilding")
        gave_up = sorted(name for name, entry in groups.items() if entry["state"] == "gave_up")
        healthy = not (missing or not_ready or rebuilding or gave_up or self._gate_thread is not None)
        self.metrics.observe(self.served, states, ready=healthy)
        if gave_up:
            self.give_up(f"UNet group(s) {gave_up} gave up rebuilding")
            return
        if not missing and not not_ready and not rebuilding:
            if self._gate_thread is not None:
                self.open_gate()  # readiness returns; the next poll confirms nothing fell away
                return
            if self._problems:
                self.log(f"readiness restored: all {len(self.served)} served models READY")
                self._problems = []
            self._recovering = False
            self.publish("watching")
            return
        if missing:
            self._recovering = True
        self.report(missing, not_ready, rebuilding, models)
        self.close_gate()
        self.publish("recovering" if self._recovering else "held", missing=missing,
                     not_ready=not_ready, rebuilding=rebuilding)  # fmt: skip
        for model in missing:
            self.log(f"a stub of {model} is gone: reloading it")
            if not self.attempt(model, self.control.reload(model, timeout=1800)):
                return
        if self._recovering:
            for model in not_ready:
                if model in missing or self.control.state(model) == "READY":
                    continue  # reloaded above, or brought back with an ensemble that was
                self.log(f"{model} was dropped during the recovery: loading it again")
                if not self.attempt(model, self.control.load(model, timeout=1800)):
                    return

    def report(
        self,
        missing: list[str],
        not_ready: list[str],
        rebuilding: list[str],
        models: dict[str, tuple[str, str]],
    ) -> None:
        """One log line whenever what keeps the server not ready changes."""
        problems = [f"a stub of {model} is gone" for model in missing]
        problems += [f"UNet group {name} is rebuilding" for name in rebuilding]
        for model in not_ready:
            state, reason = models.get(model, ("absent", "not in the repository"))
            problems.append(f"{model} is {state or 'unknown'}" + (f" ({reason})" if reason else ""))
        if problems == self._problems:
            return
        self._problems = problems
        hint = (
            ""
            if self._recovering or not not_ready
            else "; not unloaded by the supervisor, so it stays so until the operator loads it "
            "(python -m clients.operator load MODEL)"
        )
        self.log(f"not ready: {'; '.join(problems)}{hint}")

    def attempt(self, model: str, error: str | None) -> bool:
        """Counts a load of ``model`` that ended with ``error`` (None: it worked); False once the
        failures within the window reach --max-reloads, and the supervisor gives up."""
        self.metrics.reloaded(model, ok=error is None)
        if error is None:
            self.log(f"{model} loaded")
            return True
        failures = self._failed_loads[model]
        now = time.monotonic()
        failures.append(now)
        while failures and now - failures[0] > self.window_s:
            failures.popleft()
        self.log(f"load of {model} failed ({len(failures)} of {self.max_reloads}): {error}")
        if len(failures) >= self.max_reloads:
            self.give_up(
                f"{model} failed to load {len(failures)} times within {self.window_s:.0f} s: {error}"
            )
            return False
        return True

    def close_gate(self) -> None:
        """Keeps the server not ready: the gate model loads until the gate is opened."""
        if self._gate_thread is not None and self._gate_thread.is_alive():
            return
        self.board.publish(GATE, "closed")
        self._gate_thread = threading.Thread(target=self.control.load, args=(GATE, 3600.0), daemon=True)
        self._gate_thread.start()

    def open_gate(self) -> None:
        self.board.publish(GATE, "open")
        if self._gate_thread is not None:
            self._gate_thread.join(timeout=60)
        self._gate_thread = None
        self.control.unload(GATE, timeout=60)

    def give_up(self, reason: str) -> None:
        self.log(f"giving up: {reason}")
        self.board.publish(GATE, "gave_up", reason=reason)
        if self._gate_thread is None or not self._gate_thread.is_alive():
            self._gate_thread = threading.Thread(target=self.control.load, args=(GATE, 60.0), daemon=True)
            self._gate_thread.start()
        self.publish("gave_up", reason=reason)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m distrifusion.serving.supervisor", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--http",
        help="tritonserver's HTTP address (default: 127.0.0.1 and the command's --http-port, else 8000)",
    )
    parser.add_argument("--max-reloads", type=int, default=3, help="failed reloads of one model that give up")
    parser.add_argument("--window-s", type=float, default=600.0, help="the window of --max-reloads")
    parser.add_argument(
        "--metrics-port",
        type=int,
        default=8003,
        help="port of the supervisor's Prometheus metrics (default %(default)s)",
    )
    parser.add_argument(
        "--operator-key-file",
        type=Path,
        help=f"the operator's key (default ${KEY_FILE_VARIABLE}, else ~/.config/distrifusion/operator-key)",
    )
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- tritonserver ARGS...")
    args = parser.parse_args(argv)
    if args.command and args.command[0] == "--":
        args.command = args.command[1:]
    if not args.command:
        parser.error("give the server's command after --")
    if "--model-control-mode=explicit" not in args.command:
        parser.error(
            "tritonserver must run with --model-control-mode=explicit (models are reloaded through it)"
        )
    if args.http is None:
        ports = [arg.split("=", 1)[1] for arg in args.command if arg.startswith("--http-port=")]
        args.http = f"127.0.0.1:{ports[-1] if ports else 8000}"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        key = read_key(args.operator_key_file)
        command = restricted_server_flags(args.command, key)
    except OperatorKeyError as error:
        print(f"supervisor: {error}", file=sys.stderr)
        return 2
    metrics = SupervisorMetrics()
    try:
        metrics.serve(args.metrics_port)
    except OSError as error:
        print(f"supervisor: cannot serve metrics on port {args.metrics_port} ({error}): set --metrics-port "
              "(scripts/triton_server.sh: SUPERVISOR_METRICS_PORT)", file=sys.stderr)  # fmt: skip
        return 2
    directory = Path(os.environ.get(HEALTH_DIR_VARIABLE) or health_directory(os.getpid()))
    directory.mkdir(parents=True, exist_ok=True)
    board = HealthBoard(directory)
    server = subprocess.Popen(command, env={**os.environ, HEALTH_DIR_VARIABLE: str(directory)})

    control = TritonControl(args.http, key)
    supervisor = Supervisor(server, control, board, metrics, args.max_reloads, args.window_s)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda signum, frame: supervisor.stop(signum))
    return supervisor.run()


if __name__ == "__main__":
    sys.exit(main())
