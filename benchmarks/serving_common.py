"""What the serving benchmarks and their tests share: the CPU tritonserver, perf_analyzer, /proc
sampling, the machine's description and the `## Serving on Triton (CPU)` section of BENCHMARKS.md.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from pathlib import Path

from distrifusion.launch import free_port

ROOT = Path(__file__).resolve().parents[1]
CPU_REPOSITORY = ROOT / "build" / "model_repository_cpu"
PERF_INPUTS = ROOT / "clients" / "perf_inputs.json"
PERF_ANALYZER = ROOT / "scripts" / "perf_analyzer.sh"
BENCHMARKS_MD = ROOT / "BENCHMARKS.md"
SERVING_RESULTS = ROOT / "benchmarks" / "results" / "serving"
"""Where the serving benchmarks write their raw data by default."""
SECTION = "## Serving on Triton (CPU)"
SECTION_INTRO = (
    "The `sdxl` ensemble served by the CPU tritonserver (`scripts/triton_server.sh` on\n"
    "`build/model_repository_cpu`): the tiny random-weight SDXL, so the absolute numbers say little\n"
    "about a GPU deployment; what carries over is the shape of the curves, the batching trade-off,\n"
    "the serving overhead's sources and the memory behaviour. Reproduce with\n"
    "`benchmarks/serving_sweep.py`, `benchmarks/serving_overhead.py` and `benchmarks/soak.py`\n"
    "(each writes its subsection below and its raw data to `benchmarks/results/serving/`);\n"
    "perf_analyzer comes from `scripts/setup_perf_analyzer.sh`."
)
MIB = 1024 * 1024

# Columns every `perf_analyzer -f out.csv --verbose-csv` CSV has (the first column is "Concurrency"
# or "Request Rate").
PERF_CSV_COLUMNS = (
    "Inferences/Second",
    "Client Send",
    "Server Queue",
    "Server Compute Input",
    "Server Compute Infer",
    "Server Compute Output",
    "Client Recv",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def ensure_cpu_repository() -> Path:
    """build/model_repository_cpu (and .cache/tiny-sdxl), built by scripts/cpu_repository.sh if missing."""
    subprocess.run([str(ROOT / "scripts" / "cpu_repository.sh")], check=True, cwd=ROOT)
    return CPU_REPOSITORY


def repository_variant(source: Path, destination: Path, unet_dynamic_batching: str | None) -> Path:
    """A copy of ``source`` whose unet config has ``unet_dynamic_batching`` as its dynamic_batching
    block body (e.g. ``"max_queue_delay_microseconds: 0"``), or none at all when None."""
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination, symlinks=True)
    config = destination / "unet" / "config.pbtxt"
    text = config.read_text()
    text, found = re.subn(r"dynamic_batching\s*\{[^}]*\}\n?", "", text)
    if not found:
        raise RuntimeError(f"{config}: no dynamic_batching block to replace")
    if unet_dynamic_batching is not None:
        text = text.replace(
            'backend: "python"\n',
            f'backend: "python"\ndynamic_batching {{\n  {unet_dynamic_batching}\n}}\n',
            1,
        )
    config.write_text(text)
    return destination


class CpuServer:
    """scripts/triton_server.sh on a repository, on free loopback ports; a context manager."""

    def __init__(self, repository: Path, log_path: Path, extra_args: Iterable[str] = ()) -> None:
        self.ports = {"HTTP_PORT": free_port(), "GRPC_PORT": free_port(), "METRICS_PORT": free_port()}
        self.http = f"127.0.0.1:{self.ports['HTTP_PORT']}"
        self.grpc = f"127.0.0.1:{self.ports['GRPC_PORT']}"
        self.metrics = f"127.0.0.1:{self.ports['METRICS_PORT']}/metrics"
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **{name: str(port) for name, port in self.ports.items()}}
        with log_path.open("w") as log_file:
            self.process = subprocess.Popen(
                [str(ROOT / "scripts" / "triton_server.sh"), str(repository), *extra_args],
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

    def wait_ready(self, seconds: float = 600) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"tritonserver exited:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.http}/v2/health/ready", timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                pass
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


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    try:
        return [int(child) for child in path.read_text().split()]
    except (FileNotFoundError, ProcessLookupError, ValueError):
        return []


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except (FileNotFoundError, ProcessLookupError):
        return []


def server_processes(server_pid: int) -> dict[str, int]:
    found = {"tritonserver": server_pid}
    for stub in _children(server_pid):
        command = _cmdline(stub)
        if not command or "triton_python_backend_stub" not in command[0]:
            continue
        # The stub's first argument is <repository>/<model>/<version>/model.py.
        model = Path(command[1]).parts[-3] if len(command) > 1 else str(stub)
        found[f"stub:{model}"] = stub
        workers = [child for child in _children(stub) if "resource_tracker" not in " ".join(_cmdline(child))]
        for rank, worker in enumerate(sorted(workers), start=1):
            found[f"{model}:rank{rank}"] = worker
    return found


def rss_bytes(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None


def machine() -> dict[str, str | int]:
    """CPU model and cores from lscpu, memory from /proc/meminfo."""
    info: dict[str, str | int] = {"cpu": "unknown", "cores": os.cpu_count() or 0}
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        fields = {key.strip(): value.strip() for key, value in fields.items()}
        info["cpu"] = fields.get("Model name", "unknown")
        info["cores"] = int(fields.get("CPU(s)", info["cores"]))
    except (OSError, subprocess.CalledProcessError, ValueError):
        pass
    meminfo = Path("/proc/meminfo").read_text()
    match = re.search(r"MemTotal:\s+(\d+) kB", meminfo)
    if match:
        info["memory_gib"] = round(int(match.group(1)) / MIB, 1)
    return info


def machine_line() -> str:
    info = machine()
    return f"{info['cpu']}, {info['cores']} cores, {info.get('memory_gib', '?')} GiB, no GPU"


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark or test processes running now (they would share the CPUs)."""
    found = subprocess.run(
        ["pgrep", "-af", "cpu_patch_parallel|pytest"], capture_output=True, text=True
    ).stdout
    return [line for line in found.splitlines() if line and int(line.split()[0]) != os.getpid()]


def start_conditions() -> str:
    """The 1-minute load average and other benchmark processes now, for the record."""
    others = other_benchmarks()
    note = f"load average {os.getloadavg()[0]:.2f} at the start"
    return note + (
        f", {len(others)} other benchmark/test processes running" if others else ", nothing else running"
    )


def wait_idle(max_load: float = 0.5, timeout: float = 0.0) -> float:
    """Waits (up to ``timeout`` s) until no other benchmark or test runs and the 1-minute load
    average is below ``max_load``; returns the load average found."""
    deadline = time.monotonic() + timeout
    while True:
        load = os.getloadavg()[0]
        busy = other_benchmarks()
        if (load < max_load and not busy) or time.monotonic() >= deadline:
            return load
        log(f"waiting for an idle machine (load {load:.2f}, {len(busy)} other benchmark/test processes)")
        time.sleep(30)


PROGRESS_LINES = r"(Request concurrency|Request Rate|Pass \[|\s*Concurrency:|Failed|Error|Warning)"


def run_perf_analyzer(
    arguments: list[str], log_path: Path, progress: Callable[[str], None] | None = log, timeout: float = 3600
) -> None:
    """Runs scripts/perf_analyzer.sh, its output teed to ``log_path`` and summarised as progress."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with log_path.open("w") as log_file:
        log_file.write("$ perf_analyzer " + " ".join(arguments) + "\n")
        process = subprocess.Popen(
            [str(PERF_ANALYZER), *arguments],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
        )
        assert process.stdout is not None
        watchdog = threading.Timer(timeout, process.kill)
        watchdog.daemon = True
        watchdog.start()
        try:
            for line in process.stdout:
                log_file.write(line)
                log_file.flush()
                text = line.strip()
                if progress and re.match(PROGRESS_LINES, text):
                    progress(f"  perf_analyzer: {text}")
            code = process.wait()
        finally:
            watchdog.cancel()
            if process.poll() is None:  # interrupted (e.g. SIGTERM turned into SystemExit)
                process.kill()
                process.wait()
    if time.monotonic() - started >= timeout:
        raise TimeoutError(f"perf_analyzer ran past {timeout:.0f} s and was stopped; see {log_path}")
    if code != 0:
        raise RuntimeError(
            f"perf_analyzer exited with {code}; see {log_path}:\n{log_path.read_text()[-3000:]}"
        )


def perf_analyzer_arguments(
    grpc_url: str,
    metrics_url: str | None,
    csv_path: Path,
    input_data: Path,
    measurement_requests: int,
    warmup_requests: int,
    max_trials: int,
    stability: int,
    model: str = "sdxl",
) -> list[str]:
    """Settings for multi-second requests: count windows instead of 5 s time windows, warm-up
    requests, p95 stability; verbose CSV with the server's metrics."""
    arguments = [
        "-m", model, "-i", "grpc", "-u", grpc_url, "--async", "-v",
        "--input-data", str(input_data),
        "--measurement-mode", "count_windows",
        "--measurement-request-count", str(measurement_requests),
        "--percentile", "95",
        "--stability-percentage", str(stability),
        "--max-trials", str(max_trials),
        "-f", str(csv_path), "--verbose-csv",
    ]  # fmt: skip
    if warmup_requests:
        # perf_analyzer 2.50 never finishes when the warm-up count is below the concurrency, or
        # with --request-rate-range: callers leave it out (0) there.
        arguments += ["--warmup-request-count", str(warmup_requests)]
    if metrics_url:
        arguments += ["--collect-metrics", "--metrics-url", metrics_url, "--metrics-interval", "1000"]
    return arguments


def read_perf_csv(path: Path) -> list[dict[str, str]]:
    """The measurement rows of a perf_analyzer CSV (the server-metrics block after them is dropped)."""
    rows = []
    with path.open(newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        for row in reader:
            if not row or not row[0].strip() or not re.fullmatch(r"[\d.]+", row[0].strip()):
                break
            rows.append(dict(zip(header, row, strict=False)))
    return rows


def update_benchmarks_section(subsection: str, body: str, path: Path = BENCHMARKS_MD) -> None:
    """Replaces (or adds) ``### subsection`` inside ``## Serving on Triton (CPU)`` of BENCHMARKS.md,
    leaving every other section as it is (the file is re-read right before writing)."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"### {subsection}\n\n{body.strip()}\n"
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if line.rstrip() == SECTION), None)
    if start is None:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\n{SECTION_INTRO}\n\n{block}"
        path.write_text(text)
        return
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{1,2} ", lines[i])), len(lines))
    section = lines[start:end]
    heading = f"### {subsection}"
    first = next((i for i, line in enumerate(section) if line.rstrip() == heading), None)
    if first is None:
        new_section = "".join(section).rstrip("\n") + "\n\n" + block
    else:
        last = next(
            (i for i in range(first + 1, len(section)) if section[i].startswith("### ")), len(section)
        )
        new_section = "".join(section[:first]) + block + ("\n" if last < len(section) else "")
        new_section += "".join(section[last:])
    new_section = new_section.rstrip("\n") + "\n"
    if end < len(lines):
        new_section += "\n"
    path.write_text("".join(lines[:start]) + new_section + "".join(lines[end:]))


def write_json(path: Path, payload: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


_SHARED: dict[str, CpuServer] = {}


def shared_cpu_server(log_path: Path, register_cleanup: Callable[[Callable[[], None]], None]) -> CpuServer:
    """One CPU server on the built CPU repository for every caller in this process (the tests of
    perf_analyzer and of the soak share it: a start costs 20-60 s here). ``register_cleanup`` gets
    its stop function the first time (pytest: ``request.config.add_cleanup``)."""
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


_TICK = os.sysconf("SC_CLK_TCK")


def _busy_seconds() -> float:
    """CPU seconds all CPUs spent busy since boot (/proc/stat: user, nice, system, irq, softirq, steal)."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(values[:3]) + sum(values[5:8])) / _TICK


def _tree_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICK
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        pending += _children(current)
    return total


class ForeignCpu:
    """Measures the share of the CPUs that processes other than this one, its waited children
    (perf_analyzer) and the server tree ``server_pid`` used meanwhile: other people's work that
    would land in the timings on a shared machine. ``fraction`` is None without a server pid."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.fraction: float | None = None

    def _own(self) -> float:
        times = os.times()
        own = times.user + times.system + times.children_user + times.children_system
        return own + (_tree_seconds(self.server_pid) if self.server_pid else 0.0)

    def __enter__(self) -> ForeignCpu:
        self._start = (time.monotonic(), _busy_seconds(), self._own())
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own = time.monotonic(), _busy_seconds(), self._own()
        if self.server_pid:
            foreign = (busy - self._start[1]) - (own - self._start[2])
            self.fraction = max(0.0, foreign) / ((wall - self._start[0]) * (os.cpu_count() or 1))
