"""Overload of the served ensemble: the shipped queue bound of the UNet stage against no bound, side
by side on the same machine, then perf_analyzer at high concurrency against the bounded server.

    .venv/bin/python benchmarks/queue_bound.py [--seconds 45] [--rate 4] [--concurrency 32]

Each server (the CPU repository as scripts/cpu_repository.sh builds it, and the same build with
``--max-queue-size 1000000``) gets an open-loop load: requests sent at ``--rate`` per second,
whatever the answers, for ``--seconds``, more than the UNet group can serve. Every second it records
Triton's pending-request count of the unet model, the resident memory of the server's whole process
tree and the answers so far. The bounded server must refuse the excess at once (UNAVAILABLE) with a
flat queue; the unbounded one shows what the bound prevents. Writes
benchmarks/results/serving/queue_bound.json and the "Overload" subsection of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from benchmarks.harness import log, machine_line, write_json
from benchmarks.serving_common import (
    PERF_ANALYZER,
    PERF_INPUTS,
    ROOT,
    SERVING_RESULTS,
    update_benchmarks_section,
)
from build_engines.repository import parse_config
from clients.sdxl_client import QUEUE_FULL, build_inputs
from demo_model import SHIPPED
from distrifusion.serving.cpu_server import (
    CpuServer,
    ensure_cpu_repository,
    metric_total,
    rss_bytes,
    scrape_metrics,
)

UNBOUNDED = 1_000_000
REQUEST = {"height": 128, "width": 128, "num_inference_steps": 20}
SDXL_CONDITIONING_MB = 2 * 77 * (768 + 1280) * 4 / 1e6
"""What a waiting request holds at SDXL's sizes: both encoders' hidden states, prompt and negative."""


def unbounded_repository(output: Path) -> Path:
    """The CPU repository's build (scripts/cpu_repository.sh's flags) with no practical queue bound."""
    command = [sys.executable, "-m", "build_engines", "--model", str(SHIPPED),
               "--output", str(output), "--target", "cpu", "--unet-ranks", "2",
               "--max-resolution", "4096x4096", "--warmup-resolutions", "512x512",
               "--vae-tile-above", "1024x1024", "--vae-tile", "512",
               "--max-queue-size", str(UNBOUNDED), "--force"]  # fmt: skip
    subprocess.run(command, check=True, cwd=ROOT, timeout=900, stdout=subprocess.DEVNULL)
    return output


def tree_rss(server: CpuServer) -> int:
    return sum(rss_bytes(pid) or 0 for pid in set(server.processes().values()))


def overload(server: CpuServer, rate: float, seconds: float, drain_s: float) -> dict[str, Any]:
    """Open-loop requests at ``rate`` per second for ``seconds``; answers, queue and memory per second."""
    client = grpcclient.InferenceServerClient(server.grpc)
    answers: list[dict[str, Any]] = []
    lock = threading.Lock()

    def answered(sent_at: float, result: Any, error: Any) -> None:
        kind = "served" if error is None else "refused" if QUEUE_FULL in (error.message() or "") else "failed"
        with lock:
            answers.append(
                {"kind": kind, "seconds": time.monotonic() - sent_at, "at": time.monotonic() - start}
            )

    samples: list[dict[str, Any]] = []
    start = time.monotonic()
    sent = 0
    next_sample = start
    while (now := time.monotonic()) - start < seconds:
        if sent < (now - start) * rate:
            inputs = build_inputs(grpcclient, [f"overload {sent}"], seeds=[sent], **REQUEST)
            client.async_infer("sdxl", inputs, callback=functools.partial(answered, now), client_timeout=3600)
            sent += 1
        if now >= next_sample:
            pending = metric_total(
                scrape_metrics(server.metrics), "nv_inference_pending_request_count", model="unet"
            )
            with lock:
                counts = {
                    kind: sum(a["kind"] == kind for a in answers) for kind in ("served", "refused", "failed")
                }
            samples.append({"t": round(now - start, 1), "sent": sent, "unet_pending": pending,
                            "tree_rss_mib": round(tree_rss(server) / 2**20, 1), **counts})  # fmt: skip
            next_sample += 1.0
        time.sleep(0.01)
    deadline = time.monotonic() + drain_s
    while time.monotonic() < deadline and len(answers) < sent:
        time.sleep(0.2)
    with lock:
        final = list(answers)
    client.close()
    refused = [a["seconds"] for a in final if a["kind"] == "refused"]
    served = sorted(a["seconds"] for a in final if a["kind"] == "served")
    return {
        "sent": sent,
        "rate_per_s": rate,
        "seconds": seconds,
        "served": len(served),
        "refused": len(refused),
        "failed": sum(a["kind"] == "failed" for a in final),
        "unanswered": sent - len(final),
        "refusal_seconds_max": round(max(refused), 3) if refused else None,
        "served_latency_s": {"median": round(served[len(served) // 2], 2), "max": round(served[-1], 2)}
        if served
        else None,
        "unet_pending_max": max(s["unet_pending"] for s in samples),
        "unet_pending_last": samples[-1]["unet_pending"],
        "tree_rss_mib": {
            "first": samples[0]["tree_rss_mib"],
            "max": max(s["tree_rss_mib"] for s in samples),
            "last": samples[-1]["tree_rss_mib"],
        },
        "samples": samples,
    }


def perf_analyzer_overload(server: CpuServer, concurrency: int, log_path: Path) -> dict[str, Any]:
    """perf_analyzer 2.50 at ``concurrency``: it stops at the first failed request and prints it."""
    arguments = ["-m", "sdxl", "-i", "grpc", "-u", server.grpc, "--input-data", str(PERF_INPUTS),
                 "--concurrency-range", f"{concurrency}:{concurrency}", "--request-count", str(4 * concurrency)]  # fmt: skip
    result = subprocess.run(
        [str(PERF_ANALYZER), *arguments], capture_output=True, text=True, timeout=600, cwd=ROOT
    )
    output = result.stdout + result.stderr
    log_path.write_text("$ perf_analyzer " + " ".join(arguments) + "\n" + output)
    errors = [line.strip() for line in output.splitlines() if "had error" in line]
    return {
        "concurrency": concurrency,
        "exit_code": result.returncode,
        "threads_refused": sum(QUEUE_FULL in line for line in errors),
        "other_errors": [line for line in errors if QUEUE_FULL not in line],
        "first_error": errors[0] if errors else None,
    }


def markdown(report: dict[str, Any]) -> str:
    rows = []
    for name in ("bounded", "unbounded"):
        run = report[name]
        latency = run["served_latency_s"] or {"median": "-", "max": "-"}
        rows.append(
            f"| {name} (max_queue_size {report['queue_sizes'][name]}) | {run['sent']} | {run['served']} | "
            f"{run['refused']} | {run['refusal_seconds_max'] if run['refusal_seconds_max'] is not None else '-'} | "
            f"{run['unet_pending_max']:.0f} / {run['unet_pending_last']:.0f} | {latency['median']} / {latency['max']} | "
            f"{run['tree_rss_mib']['first']:.0f} / {run['tree_rss_mib']['max']:.0f} | {run['unanswered']} |"
        )
    perf = report["perf_analyzer"]
    bounded, unbounded = report["bounded"], report["unbounded"]
    # After the first fifth of the window: the first requests of a size not warmed up have grown
    # the ranks' buffers by then, alike in both runs.
    settled = {
        name: next(x for x in report[name]["samples"] if x["t"] >= report[name]["seconds"] / 5)
        for name in ("bounded", "unbounded")
    }
    growth = {
        name: report[name]["samples"][-1]["tree_rss_mib"] - settled[name]["tree_rss_mib"] for name in settled
    }
    pending_growth = unbounded["unet_pending_last"] - settled["unbounded"]["unet_pending"]
    backlog_rate = unbounded["unet_pending_last"] / unbounded["seconds"]
    return "\n".join([
        f"`benchmarks/queue_bound.py` on {report['machine']}: open-loop requests ({REQUEST['height']}x"
        f"{REQUEST['width']}, {REQUEST['num_inference_steps']} steps) at {bounded['rate_per_s']}/s for "
        f"{bounded['seconds']:.0f} s, more than the 2-rank UNet group serves; the shipped bound "
        "(2 full batches) against none, each on a fresh server.",
        "",
        "| UNet queue | sent | served | refused | slowest refusal (s) | unet pending max / at end | served latency median / max (s) | server tree RSS first / max (MiB) | unanswered at end |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        f"- Bounded, the queue stays at its bound and the excess is refused within "
        f"{bounded['refusal_seconds_max']} s; unbounded, the backlog grows by {backlog_rate:.1f} requests/s "
        f"for as long as the overload lasts, and so does the latency of what is served "
        f"({unbounded['served_latency_s']['max'] / bounded['served_latency_s']['max']:.1f}x the bounded "
        "maximum already at the end of the window).",
        f"- Memory: from {settled['bounded']['t']:.0f} s on (the first requests of a size not warmed up "
        f"had grown both trees alike, to {settled['bounded']['tree_rss_mib']:.0f} MiB), the bounded tree grew "
        f"{growth['bounded']:.1f} MiB and the unbounded one {growth['unbounded']:.1f} MiB, steadily, with "
        f"{pending_growth:.0f} more requests waiting: "
        f"{growth['unbounded'] * 1024 / max(pending_growth, 1):.0f} KiB per waiting request with the tiny "
        f"model. At SDXL's sizes the text conditioning alone is {SDXL_CONDITIONING_MB:.2f} MB a request "
        f"(prompt and negative, 2 x 77 x 2048 fp32): this backlog rate would add at least "
        f"{backlog_rate * SDXL_CONDITIONING_MB:.1f} MB per second for as long as the overload lasts, where "
        f"the bound holds at most {report['queue_sizes']['bounded'] * SDXL_CONDITIONING_MB:.0f} MB.",
        f"- perf_analyzer at concurrency {perf['concurrency']} on the bounded server: exit code "
        f"{perf['exit_code']}, {perf['threads_refused']} of its threads stopped on `{QUEUE_FULL}` "
        f"(perf_analyzer 2.50 ends a thread at its first failed request), other errors: "
        f"{len(perf['other_errors'])}.",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=45.0)
    parser.add_argument("--rate", type=float, default=4.0, help="requests per second, open loop")
    parser.add_argument("--concurrency", type=int, default=32, help="perf_analyzer's concurrency")
    parser.add_argument("--output", type=Path, default=SERVING_RESULTS / "queue_bound.json")
    parser.add_argument("--no-markdown", action="store_true", help="leave BENCHMARKS.md alone")
    args = parser.parse_args(argv)
    directory = args.output.parent
    directory.mkdir(parents=True, exist_ok=True)
    repositories = {"bounded": ensure_cpu_repository(),
                    "unbounded": unbounded_repository(ROOT / "build" / "model_repository_cpu_unbounded")}  # fmt: skip
    report: dict[str, Any] = {"machine": machine_line(), "queue_sizes": {}}
    for name, repository in repositories.items():
        config = parse_config((repository / "unet" / "config.pbtxt").read_text())
        report["queue_sizes"][name] = config.dynamic_batching.default_queue_policy.max_queue_size
        log(f"{name}: max_queue_size {report['queue_sizes'][name]}, max_batch_size {config.max_batch_size}")
        # A short exit timeout: the unbounded server's backlog is not worth draining.
        with CpuServer(
            repository, directory / f"queue_bound_{name}.log", ["--exit-timeout-secs=5"]
        ) as server:
            report[name] = overload(server, args.rate, args.seconds, drain_s=120 if name == "bounded" else 0)
            log(f"{name}: { ({k: v for k, v in report[name].items() if k != 'samples'}) }")
            if name == "bounded":
                report["perf_analyzer"] = perf_analyzer_overload(
                    server, args.concurrency, directory / "queue_bound_perf_analyzer.log"
                )
                log(f"perf_analyzer: {report['perf_analyzer']}")
    write_json(args.output, report)
    text = markdown(report)
    print(text)
    if not args.no_markdown:
        update_benchmarks_section("Overload: the UNet queue bound", text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
