"""Soak test of the `sdxl` ensemble: N minutes at concurrency 8, every request checked, and the
resident memory (RSS, from /proc) of the server, every Python-backend stub and every UNet worker
rank sampled throughout.

    python benchmarks/soak.py [--minutes 10] [--concurrency 8] [--url HOST:GRPC_PORT]

Without --url it starts the CPU server (scripts/cpu_repository.sh, scripts/triton_server.sh on free
loopback ports) and samples its process tree; with --url it only counts failures (no RSS: the
server's processes are not known). Requests cycle through clients/perf_inputs.json over gRPC.
Memory growth per process is measured from the first sample after the warm-up to the last sample
(after the last response). Exit status 1 when a request failed or a process grew past the bound.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient

from benchmarks.harness import MIB, log, machine_line, start_conditions, wait_idle, write_json
from benchmarks.serving_common import BENCHMARKS_MD, PERF_INPUTS, SERVING_RESULTS, update_benchmarks_section
from clients.sdxl_client import OUTPUTS, build_inputs
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository, rss_bytes

# A process fails the soak when its RSS grows past BOTH bounds after warm-up. 10% absorbs allocator
# noise on the big processes (the server and the stubs hold 250-700 MiB of libraries, weights and
# arenas); 64 MiB absorbs it on the small ones. A per-request leak of even one 256x256 image
# (192 KiB) crosses 64 MiB after ~340 requests: within the 10-minute run at about 1 image/s.
MAX_GROWTH_MIB = 64.0
MAX_GROWTH_FRACTION = 0.10


def load_requests(path: Path = PERF_INPUTS) -> list[dict[str, Any]]:
    """perf_analyzer's input-data entries as sdxl_client.build_inputs keyword arguments."""
    entries = json.loads(path.read_text())["data"]
    requests = []
    for entry in entries:
        requests.append(
            {
                "prompts": entry["prompt"],
                "negative_prompts": entry.get("negative_prompt"),
                "height": entry["height"][0],
                "width": entry["width"][0],
                "num_inference_steps": entry["num_inference_steps"][0],
                "guidance_scale": entry["guidance_scale"][0],
                "seeds": entry["seed"],
                "scheduler": entry["scheduler"][0],
            }
        )
    return requests


def sample_rss(processes: dict[str, int]) -> dict[str, dict[str, int]]:
    sample = {}
    for role, pid in processes.items():
        rss = rss_bytes(pid)
        if rss is not None:
            sample[role] = {"pid": pid, "rss": rss}
    return sample


def memory_growth(samples: list[dict[str, Any]], warmup_s: float) -> dict[str, dict[str, float]]:
    """Per process: RSS at the first sample at or after ``warmup_s`` and at the last sample,
    growth in MiB and as a fraction, and the peak. A pid change is reported as ``restarted``."""
    after = [sample for sample in samples if sample["t"] >= warmup_s] or samples[-1:]
    first, last = after[0], after[-1]
    growth = {}
    for role, start in first["rss"].items():
        end = last["rss"].get(role)
        series = [s["rss"][role]["rss"] for s in after if role in s["rss"]]
        entry = {
            "pid": start["pid"],
            "start_mib": start["rss"] / MIB,
            "end_mib": (end or {"rss": 0})["rss"] / MIB,
            "peak_mib": max(series) / MIB,
            "restarted": end is None or end["pid"] != start["pid"],
        }
        entry["growth_mib"] = entry["end_mib"] - entry["start_mib"]
        entry["growth_fraction"] = entry["growth_mib"] / entry["start_mib"] if entry["start_mib"] else 0.0
        growth[role] = entry
    return growth


def memory_violations(
    growth: dict[str, dict[str, float]],
    max_growth_mib: float = MAX_GROWTH_MIB,
    max_fraction: float = MAX_GROWTH_FRACTION,
) -> list[str]:
    """The processes that restarted, vanished, or grew past both bounds."""
    problems = []
    for role, entry in growth.items():
        if entry["restarted"]:
            problems.append(f"{role}: process {entry['pid']} is gone or was replaced")
        elif entry["growth_mib"] > max_growth_mib and entry["growth_fraction"] > max_fraction:
            problems.append(
                f"{role}: RSS grew {entry['growth_mib']:.1f} MiB ({entry['growth_fraction']:.1%}) "
                f"after warm-up, over {max_growth_mib:g} MiB and {max_fraction:.0%}"
            )
    return problems


def every_shape_at_full_batch(
    grpc_url: str, requests: list[dict[str, Any]], concurrency: int, progress: Callable[[str], None]
) -> list[str]:
    """Sends ``concurrency`` copies of one request of each distinct size and step count at once, so
    that every stage has served its largest batch of every shape before memory is measured (ONNX
    Runtime's arena, for one, grows on the first sight of a bigger batch and size, then stays).
    Returns the failures."""
    shapes = {(r["height"], r["width"], r["num_inference_steps"]): r for r in requests}
    failures: list[str] = []

    def send(fields: dict[str, Any]) -> None:
        try:
            with grpcclient.InferenceServerClient(grpc_url) as client:
                client.infer("sdxl", build_inputs(grpcclient, **fields), client_timeout=600)
        except Exception as error:  # counted with the soak's failures
            failures.append(f"warm-up {type(error).__name__}: {error}")

    for fields in shapes.values():
        progress(f"warm-up: {concurrency} requests at once of {fields['height']}x{fields['width']}")
        burst = [threading.Thread(target=send, args=(fields,)) for _ in range(concurrency)]
        for thread in burst:
            thread.start()
        for thread in burst:
            thread.join()
    return failures


def soak(
    grpc_url: str,
    seconds: float,
    concurrency: int = 8,
    warmup_s: float = 30.0,
    sample_every_s: float = 5.0,
    processes: Callable[[], dict[str, int]] | None = None,
    requests: list[dict[str, Any]] | None = None,
    progress: Callable[[str], None] = log,
) -> dict[str, Any]:
    """``concurrency`` clients send requests back to back for ``seconds``; returns counts, latency,
    failures (first 20 messages) and, with ``processes``, RSS samples and growth per process."""
    requests = requests or load_requests()
    order = itertools.count()
    lock = threading.Lock()
    latencies: list[float] = []
    failures: list[str] = []
    failures += every_shape_at_full_batch(grpc_url, requests, concurrency, progress)
    started = time.monotonic()
    deadline = started + seconds
    samples: list[dict[str, Any]] = []

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(grpc_url)
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        try:
            while time.monotonic() < deadline:
                with lock:
                    fields = requests[next(order) % len(requests)]
                sent = time.monotonic()
                try:
                    result = client.infer(
                        "sdxl", build_inputs(grpcclient, **fields), outputs=outputs, client_timeout=600
                    )
                    image = result.as_numpy("image")
                    expected = (1, fields["height"], fields["width"], 3)
                    if image is None or image.shape != expected or image.dtype != np.uint8:
                        raise ValueError(
                            f"image {None if image is None else image.shape}, expected {expected}"
                        )
                    if result.as_numpy("used_seed").reshape(-1).tolist() != fields["seeds"]:
                        raise ValueError("used_seed differs from the request's seed")
                except Exception as error:  # every failure is counted, the loop goes on
                    with lock:
                        failures.append(f"{type(error).__name__}: {error}")
                    continue
                with lock:
                    latencies.append(time.monotonic() - sent)
        finally:
            client.close()

    def sample() -> None:
        if processes is not None:
            samples.append({"t": time.monotonic() - started, "rss": sample_rss(processes())})

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    for thread in threads:
        thread.start()
    next_report = started
    while any(thread.is_alive() for thread in threads):
        sample()
        now = time.monotonic()
        if now >= next_report:
            with lock:
                done, failed = len(latencies), len(failures)
            rss = ""
            if samples:
                total = sum(entry["rss"] for entry in samples[-1]["rss"].values()) / MIB
                rss = f", RSS of {len(samples[-1]['rss'])} processes {total:.0f} MiB"
            progress(f"{now - started:5.0f} / {seconds:.0f} s: {done} images, {failed} failed{rss}")
            next_report = now + max(30.0, sample_every_s)
        for thread in threads:
            thread.join(timeout=sample_every_s / max(1, len(threads)))
    elapsed = time.monotonic() - started
    sample()  # after the last response
    report: dict[str, Any] = {
        "seconds": elapsed,
        "concurrency": concurrency,
        "requests": len(latencies) + len(failures),
        "succeeded": len(latencies),
        "failed": len(failures),
        "failures": failures[:20],
        "images_per_second": len(latencies) / elapsed,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": float(np.percentile(latencies, 95)) if latencies else None,
        "max_s": max(latencies) if latencies else None,
        "warmup_s": warmup_s,
    }
    if samples:
        report["samples"] = samples
        report["memory"] = memory_growth(samples, warmup_s)
    return report


def markdown(report: dict[str, Any], args: argparse.Namespace, problems: list[str]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']}; `python benchmarks/soak.py --minutes "
        f"{args.minutes:g} --concurrency {args.concurrency}` ({report['conditions']}): {report['seconds'] / 60:.1f} min of "
        f"back-to-back gRPC requests from {args.concurrency} clients cycling through "
        f"`clients/perf_inputs.json`, each response checked (image shape and dtype, seed), CPU "
        f"repository as built.",
        "",
        f"- **{report['requests']} requests, {report['failed']} failed**; {report['images_per_second']:.3f} "
        f"images/s, latency p50 {report['p50_s']:.2f} s, p95 {report['p95_s']:.2f} s, max {report['max_s']:.2f} s.",
    ]
    if "memory" in report:
        lines += [
            f"- RSS from /proc every {args.sample_every:g} s; growth from the first sample after "
            f"{report['warmup_s']:.0f} s of warm-up to the last sample (after the last response). "
            f"Bound: a process fails when it grows more than {MAX_GROWTH_MIB:g} MiB and more than "
            f"{MAX_GROWTH_FRACTION:.0%}.",
            "",
            "| process | RSS after warm-up (MiB) | at the end (MiB) | peak (MiB) | growth |",
            "|---|---:|---:|---:|---:|",
        ]
        for role, entry in report["memory"].items():
            lines.append(
                f"| {role} | {entry['start_mib']:.1f} | {entry['end_mib']:.1f} | {entry['peak_mib']:.1f} | "
                f"{entry['growth_mib']:+.1f} MiB ({entry['growth_fraction']:+.1%}) |"
            )
    lines += ["", "Result: " + ("passed." if not problems else "FAILED: " + "; ".join(problems))]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the first RSS reference")
    parser.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    parser.add_argument("--url", help="gRPC host:port of a running server (default: start the CPU server)")
    parser.add_argument("--repository", type=Path, help="model repository to serve (default: the CPU one)")
    parser.add_argument("--input-data", type=Path, default=PERF_INPUTS)
    parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for an idle machine")
    parser.add_argument("--output-dir", type=Path, default=SERVING_RESULTS)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.wait_idle:
        log(f"CPUs {wait_idle(timeout=args.wait_idle):.0%} busy")
    seconds = args.minutes * 60
    requests = load_requests(args.input_data)
    conditions = start_conditions()
    log(f"soak: {args.minutes:g} min at concurrency {args.concurrency}")
    if args.url:
        report = soak(args.url, seconds, args.concurrency, args.warmup, args.sample_every, None, requests)
    else:
        repository = (args.repository or ensure_cpu_repository()).resolve()
        started = time.monotonic()
        with CpuServer(repository, args.output_dir / "server_soak.log") as server:
            log(f"server ready in {time.monotonic() - started:.0f} s: {server.processes()}")
            report = soak(
                server.grpc,
                seconds,
                args.concurrency,
                args.warmup,
                args.sample_every,
                server.processes,
                requests,
            )
    report["date"] = datetime.date.today().isoformat()
    report["machine"] = machine_line()
    report["conditions"] = conditions
    problems = memory_violations(report.get("memory", {}))
    if report["failed"]:
        problems.insert(
            0, f"{report['failed']} of {report['requests']} requests failed: {report['failures'][:3]}"
        )
    write_json(args.output_dir / "soak.json", report)
    text = markdown(report, args, problems)
    print(text)
    if args.benchmarks_md:
        update_benchmarks_section("Soak", text, Path(args.benchmarks_md))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
