"""What every benchmark measures around its figures: the CPU that other processes use meanwhile,
the wait for an idle machine, the machine's description, and the JSON it writes.

On a shared machine, other people's work lands in the timings: :class:`ForeignCpu` measures it
(the machine's busy time from /proc/stat minus what the benchmark's own processes used), and
:func:`wait_idle` waits for a quiet machine before a measurement starts.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from distrifusion.serving.processes import child_pids

MIB = 1024 * 1024


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------
# CPU time


def busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat: user, nice, system, irq,
    softirq, steal), None off Linux."""
    try:
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return None
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def own_cpu_seconds() -> float:
    """CPU seconds of this process (every thread) and of its finished, waited-for children."""
    times = os.times()
    return times.user + times.system + times.children_user + times.children_system


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds used so far by ``pid`` and its live descendants."""
    tick = os.sysconf("SC_CLK_TCK")
    total, pending = 0.0, [pid]
    while pending:
        current = pending.pop()
        try:
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
        pending += child_pids(current)
    return total


class ForeignCpu:
    """Measures the CPU that processes *outside* the benchmark use between start() and stop() (or
    inside a ``with`` block).

    The benchmark's own processes: this one, its waited-for children, the live process trees of
    ``pids`` (a server), and with ``world`` > 1 every rank of the default torch.distributed group;
    then every rank must call start() and stop(), which meet in a barrier, and each gets the
    group's figure. ``record`` holds ``wall_seconds`` and, on Linux, ``foreign_cpu_seconds`` and
    ``foreign_cpu_fraction`` (the share of all the machine's CPUs).
    """

    def __init__(self, pids: Iterable[int] = (), world: int = 1) -> None:
        self.pids = tuple(pids)
        self.world = world
        self.record: dict[str, Any] = {}

    def _own(self) -> float:
        return own_cpu_seconds() + sum(tree_cpu_seconds(pid) for pid in self.pids)

    def _meet(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def _group_total(self, own: float) -> float:
        if self.world == 1:
            return own
        import torch.distributed as dist

        owns: list[Any] = [None] * self.world
        dist.all_gather_object(owns, own)
        return sum(owns)

    def start(self) -> ForeignCpu:
        self._meet()
        self._busy, self._own_start, self._started = busy_cpu_seconds(), self._own(), time.perf_counter()
        return self

    def stop(self) -> dict[str, Any]:
        own = self._own() - self._own_start
        self._meet()  # every rank done before the machine-wide figure is read
        busy, wall = busy_cpu_seconds(), time.perf_counter() - self._started
        own = self._group_total(own)
        self.record["wall_seconds"] = wall
        if self._busy is not None and busy is not None:
            foreign = max(0.0, busy - self._busy - own)
            self.record["foreign_cpu_seconds"] = foreign
            self.record["foreign_cpu_fraction"] = foreign / (wall * (os.cpu_count() or 1))
        return self.record

    @property
    def fraction(self) -> float | None:
        """The share of the CPUs other processes used (None before stop() or off Linux)."""
        return self.record.get("foreign_cpu_fraction")

    def __enter__(self) -> ForeignCpu:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --------------------------------------------------------------------------------------------------
# Waiting for an idle machine

BENCHMARK_PROCESSES = (
    "cpu_patch_parallel|cpu_compiled_unet|serving_sweep|serving_overhead|soak.py|gpu_sdxl_unet|pytest"
)
"""A pgrep pattern for the command lines of benchmarks and test runs (they would share the CPUs)."""


def _ancestors() -> set[int]:
    """This process and the processes above it (a ``timeout`` or shell that started it)."""
    found, pid = set(), os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        try:
            pid = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            break
    return found


def other_benchmarks() -> list[str]:
    """Command lines of other benchmark or test processes running now (not this one nor the
    processes that started it)."""
    try:
        found = subprocess.run(
            ["pgrep", "-af", BENCHMARK_PROCESSES], capture_output=True, text=True, check=False
        ).stdout
    except OSError:
        return []
    mine = _ancestors()
    return [line for line in found.splitlines() if line and int(line.split()[0]) not in mine]


def start_conditions() -> str:
    """The 1-minute load average and other benchmark processes now, for the record."""
    others = other_benchmarks()
    note = f"load average {os.getloadavg()[0]:.2f} at the start"
    return note + (
        f", {len(others)} other benchmark/test processes running" if others else ", nothing else running"
    )


def wait_idle(timeout: float, busy_limit: float = 0.1, window: float = 3.0) -> float:
    """Waits (up to ``timeout`` s) until no other benchmark or test runs and the machine's CPUs are
    under ``busy_limit`` busy over a ``window`` of seconds; returns the busy share last seen."""
    deadline = time.monotonic() + timeout
    cpus = os.cpu_count() or 1
    reported = -math.inf
    while True:
        before = busy_cpu_seconds()
        time.sleep(window)
        after = busy_cpu_seconds()
        busy = 0.0 if before is None or after is None else (after - before) / (window * cpus)
        others = other_benchmarks()
        if (busy < busy_limit and not others) or time.monotonic() >= deadline:
            return busy
        if time.monotonic() - reported >= 30:
            reported = time.monotonic()
            log(
                f"waiting for an idle machine ({100 * busy:.0f} % busy, "
                f"{len(others)} other benchmark/test processes)"
            )


# --------------------------------------------------------------------------------------------------
# The machine


def _memory_bytes() -> int | None:
    with contextlib.suppress(OSError), open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return None


def machine_info(device: Any = None) -> dict[str, Any]:
    """The CPU (lscpu's model name), its CPUs, memory, Python and library versions; with a CUDA
    ``device`` (a torch.device) also the GPU, its CUDA and cuDNN, and nvidia-smi's line."""
    import diffusers
    import torch

    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    info: dict[str, Any] = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_bytes": _memory_bytes(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device is not None:
        info["device"] = str(device)
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=props.total_memory / 2**30,
            compute_capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            cuda=torch.version.cuda,
            cudnn=torch.backends.cudnn.version(),
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv"],
                capture_output=True,
                text=True,
                timeout=20,
                check=False,
            ).stdout.strip()
    return info


def machine_line() -> str:
    """One line for a report: CPU model, CPUs, memory (the serving benchmarks run without a GPU)."""
    info = machine_info()
    memory = info["memory_bytes"]
    gib = "?" if memory is None else f"{round(memory / 2**30, 1)}"
    return f"{info['cpu_model']}, {info['logical_cpus']} cores, {gib} GiB, no GPU"


# --------------------------------------------------------------------------------------------------
# Results


def jsonable(value: Any) -> Any:
    """A JSON-ready copy: numpy arrays in dicts (latents, images) left out, numpy scalars as numbers,
    infinities and NaN (PSNR of identical outputs) as strings, torch dtypes and devices by name."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items() if not isinstance(v, np.ndarray)}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    return value


def write_json(path: Path, payload: object) -> None:
    """``payload`` as strict JSON (see :func:`jsonable`) at ``path``, its folder created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(jsonable(payload), indent=1, allow_nan=False) + "\n")


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replaces the body of the ``##`` section ``heading`` of BENCHMARKS.md (added at the end if missing)."""
    text = path.read_text()
    block = f"{heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^{re.escape(heading)}\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: block + "\n", text, count=1).rstrip("\n") + "\n"
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def publish(results: Path, report: dict, text: str, benchmarks_md: str, heading: str) -> None:
    """A benchmark's end: ``report`` as JSON at ``results``, ``text`` printed and, unless
    ``benchmarks_md`` is empty, written as the body of the ``heading`` section of that file."""
    write_json(results, report)
    print(text)
    if benchmarks_md:
        replace_section(Path(benchmarks_md), heading, text)
