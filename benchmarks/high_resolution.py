"""The whole ensemble at size on the CPU server: one request per size over gRPC, its latency, the
VAE stage's path (whole or tiled) and the peak resident memory of every process of the server
while it ran (VmHWM from /proc, reset before each request through /proc/PID/clear_refs).

    python benchmarks/high_resolution.py [--sizes 1024x1024,2048x2048,3072x1024] [--steps 2]

Serves the CPU repository (scripts/cpu_repository.sh: tiny model, 2 gloo UNet ranks, tiles above
1024 x 1024). Writes benchmarks/results/serving/high_resolution.json and its table to BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import MIB, log, machine_line, start_conditions, write_json
from benchmarks.serving_common import BENCHMARKS_MD, SERVING_RESULTS, update_benchmarks_section
from build_engines.build import parse_resolutions
from clients.sdxl_client import generate
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository, metric_total, scrape_metrics


def reset_peak(pid: int) -> None:
    """Linux: writing 5 to clear_refs resets the process's peak RSS (VmHWM) to its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024 / MIB
    except OSError:
        return None
    return None


def measure(server: CpuServer, width: int, height: int, steps: int) -> dict[str, Any]:
    processes = server.processes()
    for pid in processes.values():
        reset_peak(pid)
    before = scrape_metrics(server.metrics)
    started = time.monotonic()
    result = generate(server.grpc, prompts=["a lighthouse at dawn"], seeds=[1], height=height, width=width,
                      num_inference_steps=steps, timeout=3600)  # fmt: skip
    seconds = time.monotonic() - started
    after = scrape_metrics(server.metrics)
    paths = {
        path: metric_total(after, "distrifusion_vae_decodes_total", path=path)
        - metric_total(before, "distrifusion_vae_decodes_total", path=path)
        for path in ("whole", "tiled")
    }
    vae_seconds = metric_total(after, "distrifusion_vae_decode_seconds_sum") - metric_total(
        before, "distrifusion_vae_decode_seconds_sum"
    )
    return {
        "width": width,
        "height": height,
        "steps": steps,
        "image_shape": list(result["images"].shape),
        "seconds": seconds,
        "vae_seconds": vae_seconds,
        "vae_path": next(path for path, count in paths.items() if count),
        "peak_rss_mib": {role: peak_rss_mib(pid) for role, pid in sorted(processes.items())},
    }


def markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    roles = list(runs[0]["peak_rss_mib"])
    lines = [
        f"Measured {report['date']} on {report['machine']}; `python benchmarks/high_resolution.py --steps "
        f"{report['steps']}` ({report['conditions']}): one gRPC request per size on the CPU repository "
        "(tiny model, 2 gloo UNet ranks; the VAE stage tiles images over 1024 x 1024 in tiles of 512 x 512, "
        "8 per engine call, 0.75 of the image's GroupNorm statistics). Peak RSS: each process's VmHWM while "
        "the request ran (reset before it).",
        "",
        "| size | request (s) | VAE (s) | VAE path | " + " | ".join(f"{role} (MiB)" for role in roles) + " |",
        "|---|---:|---:|---|" + "---:|" * len(roles),
    ]
    for run in runs:
        peaks = " | ".join(
            "-" if run["peak_rss_mib"][r] is None else f"{run['peak_rss_mib'][r]:.0f}" for r in roles
        )
        lines.append(
            f"| {run['width']}x{run['height']} | {run['seconds']:.1f} | {run['vae_seconds']:.1f} | "
            f"{run['vae_path']} | {peaks} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1024x1024,2048x2048,3072x1024", help="WIDTHxHEIGHT list")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output-dir", type=Path, default=SERVING_RESULTS)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    conditions = start_conditions()
    repository = ensure_cpu_repository()
    runs = []
    with CpuServer(repository, args.output_dir / "server_high_resolution.log") as server:
        for width, height in parse_resolutions(args.sizes, "--sizes"):
            log(f"{width}x{height}, {args.steps} steps ...")
            runs.append(measure(server, width, height, args.steps))
            log(f"  {runs[-1]['seconds']:.1f} s, VAE {runs[-1]['vae_path']} {runs[-1]['vae_seconds']:.1f} s")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "conditions": conditions,
        "steps": args.steps,
        "runs": runs,
    }
    write_json(args.output_dir / "high_resolution.json", report)
    text = markdown(report)
    print(text)
    if args.benchmarks_md:
        update_benchmarks_section("High resolution", text, Path(args.benchmarks_md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
