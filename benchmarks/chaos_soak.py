"""Chaos soak of the `sdxl` ensemble: N minutes at concurrency 4 on the CPU server while a UNet
worker rank is SIGKILLed every K seconds. Every request is accounted for.

    python benchmarks/chaos_soak.py [--minutes 10] [--concurrency 4] [--kill-every 60]

Reports: requests sent = succeeded + failed with the documented error (UNAVAILABLE, naming the
lost rank, "safe to retry") + anything else (which should be nothing; a request that got no
answer within its timeout counts there too); requests failed per kill; seconds from each kill
until the server is ready again and until a request sent after the kill succeeds (median, max);
RSS per process at the start and the end (roles, not pids: the replaced worker keeps its role).
Writes its JSON to benchmarks/results/serving/ and its table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import os
import signal
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from benchmarks.harness import MIB, log, machine_line, start_conditions, write_json
from benchmarks.serving_common import BENCHMARKS_MD, PERF_INPUTS, SERVING_RESULTS, update_benchmarks_section
from benchmarks.soak import every_shape_at_full_batch, load_requests, sample_rss
from clients.sdxl_client import OUTPUTS, build_inputs
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

CLIENT_TIMEOUT_S = 300.0


def documented(error: Exception) -> bool:
    """The error a request in flight gets when a rank is lost: UNAVAILABLE, retry is safe."""
    status = getattr(error, "status", lambda: "")()
    return status == "StatusCode.UNAVAILABLE" and "safe to retry" in str(error)


def chaos_soak(
    server: CpuServer, seconds: float, concurrency: int, kill_every_s: float, requests: list[dict[str, Any]]
) -> dict[str, Any]:
    order = itertools.count()
    lock = threading.Lock()
    outcomes: list[dict[str, Any]] = []
    kills: list[dict[str, Any]] = []
    started = time.monotonic()
    deadline = started + seconds

    def client_loop() -> None:
        client = grpcclient.InferenceServerClient(server.grpc)
        outputs = [grpcclient.InferRequestedOutput(name) for name in OUTPUTS]
        try:
            while time.monotonic() < deadline:
                with lock:
                    fields = requests[next(order) % len(requests)]
                sent = time.monotonic()
                outcome: dict[str, Any] = {"sent": sent - started}
                try:
                    result = client.infer(
                        "sdxl",
                        build_inputs(grpcclient, **fields),
                        outputs=outputs,
                        client_timeout=CLIENT_TIMEOUT_S,
                    )
                    if result.as_numpy("image").shape != (1, fields["height"], fields["width"], 3):
                        raise ValueError("wrong image shape")
                    outcome["kind"] = "succeeded"
                except Exception as error:  # every request is accounted for
                    outcome["kind"] = "documented" if documented(error) else "other"
                    outcome["error"] = f"{type(error).__name__}: {error}"[:300]
                outcome["ended"] = time.monotonic() - started
                with lock:
                    outcomes.append(outcome)
        finally:
            client.close()

    def killer() -> None:
        # On a fixed schedule (every kill_every_s from the start), whatever the recovery took.
        for number in itertools.count(1):
            due = started + number * kill_every_s
            if due >= deadline:
                return
            time.sleep(max(0.0, due - time.monotonic()))
            processes = server.processes()
            workers = sorted(pid for role, pid in processes.items() if role.startswith("unet:rank"))
            if not workers:
                continue
            rss = {role: (sample["rss"] / MIB) for role, sample in sample_rss(processes).items()}
            killed = time.monotonic()
            os.kill(workers[0], signal.SIGKILL)
            kill: dict[str, Any] = {"at": killed - started, "pid": workers[0], "rss_mib_before": rss}
            went_false = None
            while time.monotonic() - killed < 120:
                is_ready = server.readiness() == 200
                if not is_ready and went_false is None:
                    went_false = time.monotonic() - killed
                if is_ready and went_false is not None:
                    kill["not_ready_after_s"] = went_false
                    kill["ready_again_after_s"] = time.monotonic() - killed
                    break
                time.sleep(0.1)
            kills.append(kill)
            log(f"kill {len(kills)} at {kill['at']:.0f} s: {kill}")

    threads = [threading.Thread(target=client_loop, daemon=True) for _ in range(concurrency)]
    rss_start = sample_rss(server.processes())
    for thread in threads:
        thread.start()
    chaos = threading.Thread(target=killer, daemon=True)
    chaos.start()
    while any(thread.is_alive() for thread in threads):
        time.sleep(5)
        with lock:
            done = {
                kind: sum(o["kind"] == kind for o in outcomes)
                for kind in ("succeeded", "documented", "other")
            }
        log(f"{time.monotonic() - started:5.0f} / {seconds:.0f} s: {done}, {len(kills)} kills")
    chaos.join(timeout=150)
    rss_end = sample_rss(server.processes())
    for kill in kills:
        after = [o for o in outcomes if o["kind"] == "succeeded" and o["sent"] >= kill["at"]]
        kill["served_again_after_s"] = min(o["ended"] for o in after) - kill["at"] if after else None
        window = [
            o for o in outcomes if o["kind"] != "succeeded" and kill["at"] <= o["ended"] < kill["at"] + 60
        ]
        kill["failed"] = len(window)
        kill["errors"] = [o["error"] for o in window][:5]
        kill["failed_within_s"] = max((o["ended"] - kill["at"] for o in window), default=None)
    counts = {kind: sum(o["kind"] == kind for o in outcomes) for kind in ("succeeded", "documented", "other")}
    recovery = [k["served_again_after_s"] for k in kills if k.get("served_again_after_s") is not None]
    return {
        "seconds": time.monotonic() - started,
        "concurrency": concurrency,
        "kill_every_s": kill_every_s,
        "sent": len(outcomes),
        **counts,
        "other_errors": [o["error"] for o in outcomes if o["kind"] == "other"][:20],
        "kills": kills,
        "served_again_median_s": statistics.median(recovery) if recovery else None,
        "served_again_max_s": max(recovery) if recovery else None,
        "rss_mib": {
            role: {
                "start": rss_start[role]["rss"] / MIB if role in rss_start else None,
                "end": rss_end[role]["rss"] / MIB if role in rss_end else None,
            }
            for role in sorted(set(rss_start) | set(rss_end))
        },
    }


def rebuild_growth(kills: list[dict[str, Any]]) -> float | None:
    """Rank 0's RSS change per rebuild between the second and the last kill (the first rebuild
    also pays for one-time allocations)."""
    rss = [k["rss_mib_before"].get("stub:unet") for k in kills[1:]]
    if len(rss) < 2 or None in rss:
        return None
    return (rss[-1] - rss[0]) / (len(rss) - 1)


def markdown(report: dict[str, Any], args: argparse.Namespace) -> str:
    kills = report["kills"]
    lines = [
        f"Measured {report['date']} on {report['machine']}; `python benchmarks/chaos_soak.py --minutes "
        f"{args.minutes:g} --concurrency {args.concurrency} --kill-every {args.kill_every:g}` "
        f"({report['conditions']}): back-to-back gRPC requests cycling through `clients/perf_inputs.json`, "
        f"the UNet's worker rank SIGKILLed every {args.kill_every:g} s.",
        "",
        f"- **{report['sent']} requests sent = {report['succeeded']} succeeded + {report['documented']} failed "
        f"with the documented error (UNAVAILABLE, rank named, safe to retry) + {report['other']} other.**",
        f"- {len(kills)} kills; requests failed per kill: {[k['failed'] for k in kills]}; each failed within "
        f"{max((k['failed_within_s'] or 0) for k in kills) if kills else 0:.1f} s of its kill at most.",
        f"- Readiness false after (s): {[round(k.get('not_ready_after_s', -1), 2) for k in kills]}; ready again "
        f"after (s): {[round(k.get('ready_again_after_s', -1), 1) for k in kills]}.",
        f"- Serving again (a request sent after the kill succeeded): median "
        f"{report['served_again_median_s'] or 0:.1f} s, max {report['served_again_max_s'] or 0:.1f} s.",
        "- RSS of rank 0 (the UNet stub) before each kill (MiB): "
        f"{[round(k['rss_mib_before'].get('stub:unet', 0)) for k in kills]}"
        + (
            f"; {growth:+.1f} MiB per rebuild from the second kill on."
            if (growth := rebuild_growth(kills))
            else "."
        ),
        "",
        "| process | RSS at start (MiB) | at the end (MiB) |",
        "|---|---:|---:|",
    ]
    for role, entry in report["rss_mib"].items():
        start = "-" if entry["start"] is None else f"{entry['start']:.1f}"
        end = "-" if entry["end"] is None else f"{entry['end']:.1f}"
        lines.append(f"| {role} | {start} | {end} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--kill-every", type=float, default=60.0, help="seconds between worker kills")
    parser.add_argument("--repository", type=Path, help="model repository to serve (default: the CPU one)")
    parser.add_argument("--output-dir", type=Path, default=SERVING_RESULTS)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    requests = load_requests(PERF_INPUTS)
    conditions = start_conditions()
    repository = (args.repository or ensure_cpu_repository()).resolve()
    with CpuServer(repository, args.output_dir / "server_chaos.log") as server:
        every_shape_at_full_batch(server.grpc, requests, args.concurrency, log)
        report = chaos_soak(server, args.minutes * 60, args.concurrency, args.kill_every, requests)
    report.update(date=datetime.date.today().isoformat(), machine=machine_line(), conditions=conditions)
    write_json(args.output_dir / "chaos_soak.json", report)
    text = markdown(report, args)
    print(text)
    if args.benchmarks_md:
        update_benchmarks_section("Chaos soak", text, Path(args.benchmarks_md))
    return 1 if report["other"] else 0


if __name__ == "__main__":
    sys.exit(main())
