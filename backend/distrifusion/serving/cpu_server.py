"""The nvidia-pytriton wheel's tritonserver on a model repository: the CPU stand-in for the
production image, as the tests and the serving benchmarks start it.

It runs ``scripts/triton_server.sh`` of the checkout this package is installed from (editable,
as ``scripts/setup.sh`` installs it) on free loopback ports, and reads the server's process tree
and memory from Linux's /proc. It imports nothing from Triton's Python backend.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from ..launch import free_port
from .processes import child_pids, cmdline, stub_models, tritonserver_pid

_SERVER_SCRIPT = Path("scripts") / "triton_server.sh"


def checkout_root() -> Path:
    """The checkout this module lives in: the first folder above it with scripts/triton_server.sh."""
    here = Path(__file__).resolve()
    for folder in here.parents:
        if (folder / _SERVER_SCRIPT).is_file():
            return folder
    raise FileNotFoundError(
        f"{here} is not inside a checkout with {_SERVER_SCRIPT}: install the project editable "
        "(scripts/setup.sh) to start the CPU server"
    )


def cpu_repository() -> Path:
    """Where scripts/cpu_repository.sh builds the CPU model repository."""
    return checkout_root() / "build" / "model_repository_cpu"


def ensure_cpu_repository() -> Path:
    """build/model_repository_cpu (of the demo model), built by scripts/cpu_repository.sh if missing or stale."""
    root = checkout_root()
    subprocess.run([str(root / "scripts" / "cpu_repository.sh")], check=True, cwd=root)
    return cpu_repository()


class CpuServer:
    """scripts/triton_server.sh on a repository, on free loopback ports; a context manager."""

    def __init__(self, repository: Path, log_path: Path, extra_args: Iterable[str] = ()) -> None:
        self.ports = {
            name: free_port()
            for name in ("HTTP_PORT", "GRPC_PORT", "METRICS_PORT", "SUPERVISOR_METRICS_PORT")
        }
        self.http = f"127.0.0.1:{self.ports['HTTP_PORT']}"
        self.grpc = f"127.0.0.1:{self.ports['GRPC_PORT']}"
        self.metrics = f"127.0.0.1:{self.ports['METRICS_PORT']}/metrics"
        self.supervisor_metrics = f"127.0.0.1:{self.ports['SUPERVISOR_METRICS_PORT']}/metrics"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{name: str(port) for name, port in self.ports.items()}}
        with log_path.open("w") as log_file:
            self.process = subprocess.Popen(
                [str(checkout_root() / _SERVER_SCRIPT), str(repository), *extra_args],
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def __enter__(self) -> CpuServer:
        try:
            self.wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def readiness(self) -> int:
        """/v2/health/ready's HTTP status (0: no answer). Every connection is closed at once: one left
        open holds tritonserver's shutdown for its whole --exit-timeout-secs."""
        try:
            with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as response:
                return response.status
        except urllib.error.HTTPError as error:
            with error:
                return error.code
        except OSError:
            return 0

    def wait_ready(self, seconds: float = 600) -> None:
        """Until Triton reports ready and its metrics endpoint answers: tritonserver starts that one
        after the HTTP endpoint, so a scrape right after readiness could be refused (it was, once)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited:\n{self.log_tail()}")
            if self.readiness() == 200 and _answers(self.metrics):
                return
            time.sleep(1)
        raise TimeoutError(f"tritonserver not ready after {seconds:.0f} s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)

    def processes(self) -> dict[str, int]:
        """Role -> pid: ``tritonserver``, ``stub:<model>`` for each Python-backend stub, and
        ``unet:rank<N>`` for the UNet's spawned worker ranks (rank 0 is the unet stub)."""
        return server_processes(self.process.pid)


_SHARED: dict[str, CpuServer] = {}


def shared_cpu_server(log_path: Path, register_cleanup: Callable[[Callable[[], None]], None]) -> CpuServer:
    """One CPU server on the built CPU repository for every caller in this process (the serving
    tests share it: a start costs 30-60 s here), started again if it has stopped. ``register_cleanup``
    gets its stop function the first time (pytest: ``request.config.add_cleanup``)."""
    server = _SHARED.get("server")
    if server is None or server.process.poll() is not None:
        server = CpuServer(ensure_cpu_repository(), log_path)
        try:
            server.wait_ready()
        except BaseException:
            server.stop()
            raise
        _SHARED["server"] = server
        register_cleanup(server.stop)
    return server


def server_processes(root_pid: int) -> dict[str, int]:
    """What :meth:`CpuServer.processes` returns, for the server started as ``root_pid`` (the
    supervisor, with tritonserver as its child; or tritonserver itself)."""
    server = tritonserver_pid(root_pid)
    if server is None:
        return {}
    found = {"tritonserver": server}
    if server != root_pid:
        found["supervisor"] = root_pid
    for stub, model in stub_models(server).items():
        found[f"stub:{model}"] = stub
        workers = [child for child in child_pids(stub) if "resource_tracker" not in " ".join(cmdline(child))]
        for rank, worker in enumerate(sorted(workers), start=1):
            found[f"{model}:rank{rank}"] = worker
    return found


def status_bytes(pid: int, field: str) -> int | None:
    """A memory figure of /proc/<pid>/status in bytes (``VmRSS``, ``VmHWM``, ...); None once the
    process is gone, off Linux, or without that field."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def rss_bytes(pid: int) -> int | None:
    """The resident memory of ``pid`` (VmRSS), None once it is gone."""
    return status_bytes(pid, "VmRSS")


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{url}", timeout=5):
            return True
    except OSError:
        return False


def scrape_metrics(url: str) -> dict[tuple[str, frozenset], float]:
    """The Prometheus samples at ``url`` (host:port/metrics): (name, labels) -> value."""
    with urllib.request.urlopen(f"http://{url}", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and not line.startswith("#"):
            labels = frozenset(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
            samples[(match.group(1), labels)] = float(match.group(3))
    return samples


def metric_samples(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> list[float]:
    """``name``'s samples that carry ``labels`` (empty when no such series is exported)."""
    wanted = set(labels.items())
    return [value for (metric, found), value in samples.items() if metric == name and wanted <= found]


def metric_total(samples: dict[tuple[str, frozenset], float], name: str, **labels: str) -> float:
    """The sum of ``name``'s samples that carry ``labels``."""
    return sum(metric_samples(samples, name, **labels))
