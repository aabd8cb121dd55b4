"""What every benchmark measures around its figures: the CPU that other processes use meanwhile,
the wait for an idle machine, peak memory, timing loops and paired statistics, op profiles, the
machine's description, and the JSON and BENCHMARKS.md section it writes.

On a shared machine, other people's work lands in the timings: :class:`ForeignCpu` measures it
(the machine's busy time from /proc/stat minus what the benchmark's own processes used),
:func:`wait_idle` waits for a quiet machine before a measurement starts, and :class:`Phases` runs
a benchmark's measurements one by one, again while others disturbed them, resumable after an
interruption.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import hashlib
import json
import math
import os
import pickle
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from distrifusion.serving.processes import child_pids

MIB = 1024 * 1024
T = TypeVar("T")


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


def all_ranks(value: T) -> list[T]:
    """Every rank's ``value``, on every rank of the default torch.distributed group (a collective:
    all must call it); ``[value]`` without a group or in a group of one."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [value]
    values: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


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
        return own if self.world == 1 else sum(all_ranks(own))

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
# Memory


def release_memory() -> None:
    """Returns freed heap to the OS, so the next peak is not inflated by the previous run's leftovers."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int:
    """This process's peak resident memory: VmHWM (since :func:`reset_peak_rss`), else ru_maxrss."""
    from distrifusion.serving.cpu_server import status_bytes

    hwm = status_bytes(os.getpid(), "VmHWM")
    if hwm is not None:
        return hwm
    # ru_maxrss is the whole process lifetime's peak (KiB on Linux).
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --------------------------------------------------------------------------------------------------
# Timing and paired statistics


def step_seconds(
    step: Callable[[], Any], repeats: int, before: Callable[[], Any] | None = None
) -> list[float]:
    """Wall seconds of each of ``repeats`` back-to-back calls of ``step``; ``before`` (untimed) runs
    ahead of each call (a barrier, so that the ranks' steps overlap)."""
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    return times


def abba(rounds: int, first: Callable[[], T], second: Callable[[], T]) -> list[tuple[T, T]]:
    """``rounds`` rounds of ``first`` and ``second`` in ABBA order (first then second in even rounds,
    second then first in odd ones), so that a slow drift of the machine's speed favours neither;
    each round's (first's result, second's result)."""
    results = []
    for index in range(rounds):
        if index % 2 == 0:
            a = first()
            b = second()
        else:
            b = second()
            a = first()
        results.append((a, b))
    return results


def paired_ratios(numerators: Sequence[float], denominators: Sequence[float]) -> dict[str, Any]:
    """Paired measurements compared: each pair's ``ratios`` (numerator / denominator), their median
    (``median_ratio``) and the ``ratio_of_medians`` of the two sides."""
    ratios = [n / d for n, d in zip(numerators, denominators, strict=True)]
    return {
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
        "ratio_of_medians": statistics.median(numerators) / statistics.median(denominators),
    }


def slowest_median(per_rank: Iterable[Iterable[float]]) -> float:
    """The largest of the ranks' median times: ranks that meet every step last as long as the slowest."""
    return max(statistics.median(times) for times in per_rank)


# --------------------------------------------------------------------------------------------------
# Op profiles

Profile = dict[str, tuple[float, int]]
"""Op name -> (self CPU milliseconds, calls)."""


def profile_ops(fn: Callable[[], T]) -> tuple[T, Profile]:
    """Runs ``fn`` under torch's CPU profiler; returns its result and its ops' :data:`Profile`."""
    import torch

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        result = fn()
    return result, {
        event.key: (event.self_cpu_time_total / 1000.0, event.count)
        for event in prof.key_averages()
        if event.self_cpu_time_total > 0
    }


def compare_profiles(single: Profile, multi: Profile, world: int, top: int = 20) -> list[dict[str, Any]]:
    """The ``top`` ops by how far their time at ``world`` ranks (``multi``) exceeds 1/world of their
    time at 1 rank (``single``)."""
    rows = []
    for name in set(single) | set(multi):
        one, one_calls = single.get(name, (0.0, 0))
        many, many_calls = multi.get(name, (0.0, 0))
        rows.append(
            {
                "op": name,
                "one_rank_ms": round(one, 2),
                "one_rank_calls": one_calls,
                f"{world}_rank_ms": round(many, 2),
                f"{world}_rank_calls": many_calls,
                "excess_over_ideal_ms": round(many - one / world, 2),
            }
        )
    rows.sort(key=lambda row: -row["excess_over_ideal_ms"])
    return rows[:top]


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
# Phases: measurements re-run while disturbed, kept across an interrupted run

FOREIGN_LIMIT = 0.05
"""A measurement during which other processes used more than this share of the CPUs is disturbed."""


def disturbed(window: dict[str, Any], limit: float = FOREIGN_LIMIT) -> bool:
    """Whether other processes used more than ``limit`` of the CPUs during ``window`` (a
    :class:`ForeignCpu` record; one without the figure, off Linux, counts as undisturbed)."""
    return window.get("foreign_cpu_fraction", 0.0) > limit


def checkpoint_folder(benchmark: str, settings: object) -> Path:
    """A temporary folder (created) for the undisturbed measurements of ``benchmark`` run with
    ``settings``: a run restarted with the same settings (by their repr) finds them there."""
    key = hashlib.sha1(repr(settings).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / f"{benchmark}-{key}"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


class Phases:
    """A benchmark's measurements, run one phase at a time.

    Each phase first waits (up to ``idle_wait`` s; 0: not at all) for an idle machine, and is timed
    with the CPU other processes used meanwhile (``records``, for the JSON). :meth:`run_clean` runs a
    measurement again, up to ``retries`` times, while other processes disturbed it; with
    ``checkpoints`` (see :func:`checkpoint_folder`) an undisturbed result is kept there, and a
    restarted run reuses it instead of measuring again.
    """

    def __init__(
        self,
        idle_wait: float = 0.0,
        retries: int = 0,
        checkpoints: Path | None = None,
        limit: float = FOREIGN_LIMIT,
    ) -> None:
        self.idle_wait = idle_wait
        self.retries = retries
        self.checkpoints = checkpoints
        self.limit = limit
        self.records: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Times the block and measures the CPU *other* processes used meanwhile: this process and
        the ranks it spawned and joined in the block are the benchmark's, the rest is foreign."""
        if self.idle_wait > 0:
            wait_idle(self.idle_wait)
        log(f"== {name}")
        with ForeignCpu() as meter:
            yield
        record: dict[str, Any] = {"phase": name, **meter.record}
        self.records.append(record)
        note = ""
        if disturbed(record, self.limit):
            note = (
                f" -- WARNING: other processes used {100 * record['foreign_cpu_fraction']:.0f} % of the CPUs"
            )
        log(f"   done in {record['wall_seconds']:.1f} s{note}")

    def undisturbed(self, result: dict[str, Any]) -> bool:
        """Whether other processes left a result's own ``foreign_cpu`` window under ``limit``."""
        return not disturbed(result["foreign_cpu"], self.limit)

    def checkpoint(self, label: str) -> Path | None:
        """Where the undisturbed result of the measurement ``label`` is kept (None: not kept)."""
        if self.checkpoints is None:
            return None
        return self.checkpoints / (hashlib.sha1(label.encode()).hexdigest()[:16] + ".pkl")

    def run_clean(
        self,
        label: str,
        run_once: Callable[[], dict[str, Any]],
        clean: Callable[[dict[str, Any]], bool] | None = None,
    ) -> dict[str, Any]:
        """``run_once()`` as the phase ``label``, again while its result is not ``clean`` (by
        default: while other processes used more than ``limit`` of the CPUs in its own
        ``foreign_cpu`` window). The result gets ``attempts``, and ``disturbed`` if no try was clean."""
        clean = clean or self.undisturbed
        checkpoint = self.checkpoint(label)
        if checkpoint is not None and checkpoint.exists():
            log(f"== {label}: undisturbed result of an earlier run reused ({checkpoint})")
            return pickle.loads(checkpoint.read_bytes())
        for attempt in range(self.retries + 1):
            with self.phase(label + (f" (retry {attempt})" if attempt else "")):
                result = run_once()
            result["attempts"] = attempt + 1
            if clean(result):
                if checkpoint is not None:
                    checkpoint.write_bytes(pickle.dumps(result))
                return result
            if attempt < self.retries:
                log("   other processes used the CPUs meanwhile: retrying")
        result["disturbed"] = True
        return result


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


def machine_line(info: dict[str, Any] | None = None) -> str:
    """One line for a report: CPU model, CPUs, memory (the serving benchmarks run without a GPU);
    from ``info`` (:func:`machine_info`'s) where the caller has it."""
    info = info or machine_info()
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
