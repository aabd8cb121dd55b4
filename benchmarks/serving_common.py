"""What the serving benchmarks and their tests share: perf_analyzer, the CPU model repository and
its variants, and the `## Serving on Triton (CPU)` section of BENCHMARKS.md. The CPU tritonserver
itself is :mod:`distrifusion.serving.cpu_server`; the measurement helpers are :mod:`benchmarks.harness`.

Everything talks to 127.0.0.1 only.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

from google.protobuf import text_format

from benchmarks.harness import log
from build_engines.repository import format_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
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


def repository_variant(source: Path, destination: Path, queue_delay_us: int | None) -> Path:
    """A copy of ``source`` whose unet stage batches with ``queue_delay_us`` as its
    max_queue_delay_microseconds (the queue bound kept), or does not batch at all when None."""
    if destination.exists():
        shutil.rmtree(destination)
    shutil.copytree(source, destination, symlinks=True)
    config = destination / "unet" / "config.pbtxt"
    msg = parse_config(config.read_text())
    if not msg.HasField("dynamic_batching"):
        raise RuntimeError(f"{config}: no dynamic_batching block to vary")
    if queue_delay_us is None:
        msg.ClearField("dynamic_batching")
    else:
        msg.dynamic_batching.max_queue_delay_microseconds = queue_delay_us
    config.write_text(format_config(msg, f"benchmark variant of {source}"))
    return destination


def unet_batching(repository: Path) -> str:
    """The unet stage's dynamic_batching block on one line, or "off"."""
    msg = parse_config((repository / "unet" / "config.pbtxt").read_text())
    if not msg.HasField("dynamic_batching"):
        return "off"
    return f"dynamic_batching {{ {text_format.MessageToString(msg.dynamic_batching, as_one_line=True)} }}"


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
