"""Load test of the `sdxl` ensemble with perf_analyzer: throughput and latency against concurrency,
with and without dynamic batching of the UNet stage, and one Poisson request-rate run.

    python benchmarks/serving_sweep.py [--quick] [--url HOST:GRPC_PORT --metrics-url HOST:PORT/metrics]

Without --url it builds the CPU model repository if missing (scripts/cpu_repository.sh) and, for
each UNet batching variant, starts scripts/triton_server.sh on a copy of it on free loopback ports:
  - `default`: the repository as built (the unet template's dynamic_batching block),
  - `no-batching`: the unet's dynamic_batching block removed (one request per execute()),
  - `delay-<ms>ms`: dynamic batching with max_queue_delay_microseconds (--queue-delay-ms, 100).
With --url it measures that server as it is (no variants).

perf_analyzer (scripts/perf_analyzer.sh) runs over gRPC with clients/perf_inputs.json, settings for
multi-second requests: count windows of --measurement-requests requests, warm-up requests, p95
stability, verbose CSV with the server's metrics. One invocation per concurrency level, so an
unstable level does not lose the others: a level that does not stabilise within --max-trials
windows is measured once more with a fixed --request-count and flagged `stable: false`.

Writes to --output-dir (default benchmarks/results/serving): the CSVs, serving_sweep.json,
serving_sweep.png; the plot also to --figure (default benchmarks/figures/serving_sweep.png, kept in
git: BENCHMARKS.md shows it) and the tables to BENCHMARKS.md (section `## Serving on Triton (CPU)`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import ForeignCpu, log, machine_line, start_conditions, wait_idle, write_json
from benchmarks.serving_common import (
    BENCHMARKS_MD,
    PERF_INPUTS,
    ROOT,
    SERVING_RESULTS,
    perf_analyzer_arguments,
    read_perf_csv,
    repository_variant,
    run_perf_analyzer,
    unet_batching,
    update_benchmarks_section,
)
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

DELAY_TRADE_OFF = (
    "The built default keeps no queue delay all the same: with a delay, a request that arrives alone "
    "waits that long for company, and this server is built for the latency of one image. "
    "Throughput-first deployments can raise `max_queue_delay_microseconds`."
)


def _seconds(row: dict[str, str], column: str) -> float:
    return float(row[column]) / 1e6


def summarize(row: dict[str, str]) -> dict[str, float]:
    return {
        "images_per_second": float(row["Inferences/Second"]),
        "p50_s": _seconds(row, "p50 latency"),
        "p90_s": _seconds(row, "p90 latency"),
        "p95_s": _seconds(row, "p95 latency"),
        "p99_s": _seconds(row, "p99 latency"),
        "server_queue_s": _seconds(row, "Server Queue"),
        "server_compute_s": _seconds(row, "Server Compute Infer"),
    }


class Sweep:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.output: Path = args.output_dir
        self.raw = self.output / "raw"
        self.raw.mkdir(parents=True, exist_ok=True)
        self.started = time.monotonic()
        self.server_pid: int | None = None

    def progress(self, message: str) -> None:
        elapsed = datetime.timedelta(seconds=round(time.monotonic() - self.started))
        log(f"[{elapsed}] {message}")

    def measure(
        self,
        name: str,
        grpc: str,
        metrics: str | None,
        load: list[str],
        input_data: Path,
        warmup_requests: int = 0,
        window_scale: int = 1,
    ) -> dict[str, Any]:
        """One perf_analyzer run (one concurrency level or one request rate)."""
        args = self.args
        csv_path = self.raw / f"{name}.csv"
        log_path = self.raw / f"{name}.log"
        csv_path.unlink(missing_ok=True)
        window = args.measurement_requests * window_scale
        arguments = perf_analyzer_arguments(
            grpc, metrics, csv_path, input_data, window, warmup_requests,
            args.max_trials, args.stability,
        )  # fmt: skip
        stable = True
        meter = ForeignCpu([self.server_pid] if self.server_pid else [])
        try:
            with meter:
                run_perf_analyzer(arguments + load, log_path, self.progress, timeout=args.level_timeout)
        except RuntimeError:
            if "Failed to obtain stable measurement" not in log_path.read_text():
                raise
            # perf_analyzer 2.50 writes no CSV for an unstable level; measure a fixed number of
            # requests instead (no warm-up: the failed attempt warmed the server up).
            stable = False
            count = window * 2
            self.progress(
                f"{name}: not stable within {args.max_trials} windows; measuring {count} requests once"
            )
            fixed = arguments
            if "--warmup-request-count" in arguments:
                index = arguments.index("--warmup-request-count")
                fixed = arguments[:index] + arguments[index + 2 :]
            meter = ForeignCpu([self.server_pid] if self.server_pid else [])
            with meter:
                run_perf_analyzer(
                    fixed + load + ["--request-count", str(count)],
                    self.raw / f"{name}.fixed.log",
                    self.progress,
                    timeout=args.level_timeout,
                )
        (row,) = read_perf_csv(csv_path)[-1:]
        result = {"name": name, "stable": stable, "csv": str(csv_path), **summarize(row)}
        # With --url the server is not ours to measure: its own work would count as foreign.
        foreign = meter.fraction if self.server_pid else None
        result["foreign_cpu"] = foreign
        result["raw"] = row
        self.progress(
            f"{name}: {result['images_per_second']:.3f} images/s, p50 {result['p50_s']:.2f} s, "
            f"p95 {result['p95_s']:.2f} s, p99 {result['p99_s']:.2f} s{'' if stable else ' (not stable)'}"
            + ("" if foreign is None else f", other processes used {foreign:.0%} of the CPUs")
        )
        return result

    def measure_clean(self, name: str, run: Any) -> dict[str, Any]:
        """``run(name)``, again (after waiting for an idle machine) while other processes used more
        than --foreign-limit of the CPUs meanwhile, up to --retries times; the cleanest result wins."""
        results = []
        for attempt in range(self.args.retries + 1):
            result = run(name if not attempt else f"{name}_retry{attempt}")
            results.append(result)
            if result["foreign_cpu"] is None or result["foreign_cpu"] <= self.args.foreign_limit:
                break
            if attempt < self.args.retries:
                self.progress(
                    f"{name}: disturbed by other processes; waiting for an idle machine to measure again"
                )
                wait_idle(timeout=self.args.retry_wait)
        best = min(results, key=lambda r: r["foreign_cpu"] or 0.0)
        best["attempts"] = len(results)
        return best

    def measure_concurrency(
        self, name: str, grpc: str, metrics: str | None, level: int, input_data: Path
    ) -> dict[str, Any]:
        # perf_analyzer 2.50 never finishes when fewer warm-up requests than the concurrency are
        # asked for: round up to a multiple of the concurrency.
        warmup = -(-self.args.warmup_requests // level) * level
        load = ["--concurrency-range", f"{level}:{level}"]
        return self.measure_clean(
            name, lambda label: self.measure(label, grpc, metrics, load, input_data, warmup_requests=warmup)
        )

    def concurrency_sweep(
        self, variant: str, grpc: str, metrics: str | None, levels: list[int], input_data: Path
    ) -> list[dict[str, Any]]:
        results = []
        for level in levels:
            self.progress(f"{variant}: concurrency {level}")
            result = self.measure_concurrency(f"{variant}_c{level}", grpc, metrics, level, input_data)
            results.append({"concurrency": level, **result})
        merge_csv([Path(r["csv"]) for r in results], self.output / f"sweep_{variant}.csv")
        return results

    def poisson(self, variant: str, grpc: str, metrics: str | None, rate: float, input_data: Path) -> dict:
        self.progress(f"{variant}: Poisson arrivals at {rate:.3f} requests/s")
        load = ["--request-rate-range", f"{rate:.4f}", "--request-distribution", "poisson"]
        # Arrivals vary more than a closed loop: twice the window; no warm-up (the server is warm
        # from the sweep, and perf_analyzer 2.50 hangs on warm-up with a request rate).
        result = self.measure_clean(
            f"{variant}_poisson",
            lambda label: self.measure(label, grpc, metrics, load, input_data, window_scale=2),
        )
        shutil.copy(result["csv"], self.output / f"poisson_{variant}.csv")
        return {"request_rate": rate, **result}


def _share(fraction: float | None) -> str:
    return "-" if fraction is None else f"{fraction:.0%}"


def merge_csv(parts: list[Path], destination: Path) -> None:
    """The per-level CSVs as one (header once, measurement rows only)."""
    lines: list[str] = []
    for part in parts:
        text = part.read_text().splitlines()
        rows = [line for line in text[1:] if re.match(r"[\d.]+,", line)]
        if not lines:
            lines.append(text[0])
        lines += rows
    destination.write_text("\n".join(lines) + "\n")


def plot(results: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
    for color, (variant, sweep) in zip(colors, results["sweeps"].items(), strict=False):
        levels = [r["concurrency"] for r in sweep]
        left.plot(levels, [r["images_per_second"] for r in sweep], "o-", color=color, label=variant)
        for key, style in (("p50_s", ":"), ("p95_s", "-"), ("p99_s", "--")):
            label = f"{variant} {key[:3]}"
            right.plot(levels, [r[key] for r in sweep], style, marker="o", color=color, label=label)
    for variant, extra in results.get("delay_variants", {}).items():
        left.plot([extra["concurrency"]], [extra["images_per_second"]], "s", color="tab:red", label=variant)
        right.plot([extra["concurrency"]], [extra["p95_s"]], "s", color="tab:red", label=f"{variant} p95")
    left.set(xlabel="concurrency (requests in flight)", ylabel="images / s", title="throughput")
    right.set(
        xlabel="concurrency (requests in flight)", ylabel="latency (s)", title="latency p50 / p95 / p99"
    )
    for axis in (left, right):
        axis.set_xticks(sorted({r["concurrency"] for s in results["sweeps"].values() for r in s}))
        axis.grid(alpha=0.3)
        axis.set_ylim(bottom=0)
    left.legend(fontsize=8)
    right.legend(fontsize=7, ncol=2)
    figure.suptitle(title, fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def markdown(results: dict[str, Any], args: argparse.Namespace) -> tuple[str, str]:
    """(concurrency sweep section, batching section) for BENCHMARKS.md."""
    output = args.output_dir.relative_to(ROOT) if args.output_dir.is_relative_to(ROOT) else args.output_dir
    head = (
        f"Measured {results['date']} on {results['machine']}; `python benchmarks/serving_sweep.py"
        f"{' --quick' if args.quick else ''}` ({results['seconds'] / 60:.0f} min; {results['conditions']}). Tiny random-weight "
        f"SDXL (`.cache/tiny-sdxl`), CPU repository: UNet on 2 gloo ranks (1 thread each), text "
        f"encoders and VAE on ONNX Runtime. Requests cycle through `clients/perf_inputs.json` (8 "
        f"prompts: 4 at 256x256/8 steps, 2 at 128x128/4 steps, 2 at 192x256/6 steps; Euler, guidance 5), "
        f"batch 1 each, gRPC. perf_analyzer {args.measurement_requests}-request count windows, "
        f"{args.warmup_requests} warm-up requests, stable when 3 windows agree within {args.stability}% "
        f"(throughput and p95). Latencies end to end at the client. Raw CSVs, JSON and the plot: "
        f"`{output}/`."
    )
    figure = args.figure.relative_to(ROOT) if args.figure.is_relative_to(ROOT) else args.figure
    lines = [head, "", f"![throughput and latency against concurrency]({figure})", ""]
    lines += [
        "| UNet batching | concurrency | images/s | p50 (s) | p95 (s) | p99 (s) | stable | CPU used by other processes |",
        "|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for variant, sweep in results["sweeps"].items():
        for r in sweep:
            lines.append(
                f"| {results['variants'][variant]} | {r['concurrency']} | {r['images_per_second']:.3f} | "
                f"{r['p50_s']:.2f} | {r['p95_s']:.2f} | {r['p99_s']:.2f} | {'yes' if r['stable'] else 'no'} | "
                f"{_share(r['foreign_cpu'])} |"
            )
    for variant, run in results.get("poisson", {}).items():
        lines.append("")
        lines.append(
            f"Poisson arrivals (`--request-rate-range {run['request_rate']:.3f} --request-distribution poisson`, "
            f"0.6x the best closed-loop throughput; {results['variants'][variant]}): perf_analyzer reports "
            f"{run['images_per_second']:.3f} images/s completed, latency p50 {run['p50_s']:.2f} s, p95 "
            f"{run['p95_s']:.2f} s, p99 {run['p99_s']:.2f} s{'' if run['stable'] else ' (not stable)'}; other "
            f"processes used {_share(run['foreign_cpu'])} of the CPUs."
        )
    sweep_md = "\n".join(lines)

    comparison = results.get("batching")
    if not comparison:
        return sweep_md, ""
    level = comparison["concurrency"]
    rows = [
        f"Concurrency {level}, same run and machine as above, one server per variant (same inputs).",
        "",
        "| UNet batching | images/s | p50 (s) | p95 (s) | p99 (s) | throughput vs no batching | p95 vs no batching |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    baseline = comparison["rows"].get("no-batching")
    for variant, r in comparison["rows"].items():
        gain = f"{r['images_per_second'] / baseline['images_per_second']:.2f}x" if baseline else "-"
        p95 = f"{r['p95_s'] / baseline['p95_s']:.2f}x" if baseline else "-"
        rows.append(
            f"| {results['variants'][variant]} | {r['images_per_second']:.3f} | {r['p50_s']:.2f} | "
            f"{r['p95_s']:.2f} | {r['p99_s']:.2f} | {gain} | {p95} |"
        )
    rows += ["", comparison["verdict"]]
    return sweep_md, "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="gRPC host:port of a running server (default: start the CPU server)")
    parser.add_argument("--metrics-url", help="its metrics URL, host:port/metrics (with --url)")
    parser.add_argument("--repository", type=Path, help="model repository to serve (default: the CPU one)")
    parser.add_argument("--input-data", type=Path, default=PERF_INPUTS)
    parser.add_argument("--concurrency", default="1,2,3,4", help="levels (default 1,2,3,4)")
    parser.add_argument(
        "--request-rate", type=float, help="Poisson rate, requests/s (default: 0.6 x best throughput)"
    )
    parser.add_argument(
        "--measurement-requests", type=int, help="requests per count window (default 16; quick 8)"
    )
    parser.add_argument("--warmup-requests", type=int, help="warm-up requests per run (default 4; quick 2)")
    parser.add_argument(
        "--max-trials", type=int, help="windows before giving up stabilising (default 6; quick 3)"
    )
    parser.add_argument("--stability", type=int, help="allowed spread, percent (default 20; quick 40)")
    parser.add_argument("--queue-delay-ms", type=float, default=100.0, help="extra dynamic-batching variant")
    parser.add_argument("--no-batching-comparison", action="store_true", help="only the repository as built")
    parser.add_argument("--level-timeout", type=float, default=1200.0, help="seconds per perf_analyzer run")
    parser.add_argument("--retries", type=int, default=2, help="re-measurements of a disturbed level")
    parser.add_argument(
        "--foreign-limit", type=float, default=0.10, help="CPU share of other processes tolerated"
    )
    parser.add_argument(
        "--retry-wait", type=float, default=300.0, help="seconds to wait for idle before a retry"
    )
    parser.add_argument("--quick", action="store_true", help="smaller windows, fewer trials (a few minutes)")
    parser.add_argument("--wait-idle", type=float, default=0.0, help="wait up to S s for an idle machine")
    parser.add_argument("--output-dir", type=Path, default=SERVING_RESULTS)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    parser.add_argument(
        "--figure", default=str(ROOT / "benchmarks" / "figures" / "serving_sweep.png"), help="'' to skip"
    )
    args = parser.parse_args(argv)
    defaults = {
        "measurement_requests": (16, 8),
        "warmup_requests": (4, 2),
        "max_trials": (6, 3),
        "stability": (20, 40),
    }
    for name, (full, quick) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    args.output_dir = args.output_dir.resolve()
    args.figure = Path(args.figure).resolve() if args.figure else args.output_dir / "serving_sweep.png"
    if args.max_trials < 3:
        parser.error("--max-trials: at least 3 (perf_analyzer compares the last 3 windows)")
    levels = [int(level) for level in args.concurrency.split(",")]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    sweep = Sweep(args)
    if args.wait_idle:
        busy = wait_idle(timeout=args.wait_idle)
        sweep.progress(f"CPUs {busy:.0%} busy")
    results: dict[str, Any] = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "conditions": start_conditions(),
        "settings": {k: str(v) for k, v in vars(args).items()},
        "sweeps": {},
        "variants": {},
        "poisson": {},
    }

    def run_poisson(variant: str, grpc: str, metrics: str | None) -> None:
        best = max(r["images_per_second"] for r in results["sweeps"][variant])
        rate = args.request_rate or round(0.6 * best, 3)
        results["poisson"][variant] = sweep.poisson(variant, grpc, metrics, rate, args.input_data)

    if args.url:
        results["variants"]["server"] = "as served"
        results["sweeps"]["server"] = sweep.concurrency_sweep(
            "server", args.url, args.metrics_url, levels, args.input_data
        )
        run_poisson("server", args.url, args.metrics_url)
    else:
        source = (args.repository or ensure_cpu_repository()).resolve()
        copies = args.output_dir / "repositories"
        # (variant, the unet's max_queue_delay_microseconds or None for no batching, full sweep?);
        # "default" is the repository as built.
        plan: list[tuple[str, int | None, bool]] = [("default", None, True)]
        if not args.no_batching_comparison:
            plan += [
                ("no-batching", None, True),
                (f"delay-{args.queue_delay_ms:g}ms", int(args.queue_delay_ms * 1000), True),
            ]
        comparison_level = max(levels)
        comparison: dict[str, Any] = {"concurrency": comparison_level, "rows": {}}
        for variant, queue_delay_us, full_sweep in plan:
            as_built = variant == "default"
            repository = source if as_built else repository_variant(source, copies / variant, queue_delay_us)
            results["variants"][variant] = f"{unet_batching(repository)}{' (as built)' if as_built else ''}"
            sweep.progress(
                f"{variant}: starting tritonserver on {repository} ({results['variants'][variant]})"
            )
            started = time.monotonic()
            with CpuServer(repository, args.output_dir / f"server_{variant}.log") as server:
                sweep.progress(f"{variant}: server ready in {time.monotonic() - started:.0f} s")
                sweep.server_pid = server.process.pid
                if full_sweep:
                    rows = sweep.concurrency_sweep(
                        variant, server.grpc, server.metrics, levels, args.input_data
                    )
                    results["sweeps"][variant] = rows
                    comparison["rows"][variant] = next(
                        r for r in rows if r["concurrency"] == comparison_level
                    )
                    if variant == "default":
                        run_poisson(variant, server.grpc, server.metrics)
                else:
                    row = sweep.measure_concurrency(
                        f"{variant}_c{comparison_level}",
                        server.grpc,
                        server.metrics,
                        comparison_level,
                        args.input_data,
                    )
                    comparison["rows"][variant] = {"concurrency": comparison_level, **row}
                    results.setdefault("delay_variants", {})[variant] = comparison["rows"][variant]
        shutil.rmtree(copies, ignore_errors=True)
        if len(comparison["rows"]) > 1:
            comparison["verdict"] = verdict(comparison["rows"], results["variants"])
            results["batching"] = comparison

    results["seconds"] = time.monotonic() - sweep.started
    for rows in results["sweeps"].values():
        for row in rows:
            row.pop("raw", None)
    write_json(args.output_dir / "serving_sweep.json", results)
    title = f"sdxl ensemble on the CPU ({results['machine']}), perf_analyzer, {results['date']}"
    plot(results, args.output_dir / "serving_sweep.png", title)
    if args.figure != args.output_dir / "serving_sweep.png":
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(args.output_dir / "serving_sweep.png", args.figure)
    sweep_md, batching_md = markdown(results, args)
    if args.benchmarks_md:
        update_benchmarks_section(
            "Throughput and latency against concurrency (perf_analyzer)", sweep_md, Path(args.benchmarks_md)
        )
        if batching_md:
            update_benchmarks_section(
                "Dynamic batching of the UNet stage", batching_md, Path(args.benchmarks_md)
            )
    print(json.dumps({k: results[k] for k in ("machine", "variants")}, indent=2))
    print(sweep_md)
    print(batching_md)
    sweep.progress(f"done: {args.output_dir}")
    return 0


def verdict(rows: dict[str, dict[str, Any]], labels: dict[str, str]) -> str:
    """The variant with the highest throughput at the comparison level, against no batching and
    against the built default."""
    best = max(rows, key=lambda name: rows[name]["images_per_second"])
    base = rows.get("no-batching")
    default = rows.get("default")
    parts = [f"Best throughput: {labels[best]}."]
    if base:
        gain = rows[best]["images_per_second"] / base["images_per_second"]
        p95 = rows[best]["p95_s"] / base["p95_s"]
        parts.append(f"Against no batching: {gain:.2f}x images/s, p95 latency {p95:.2f}x.")
    if default and best != "default":
        gap = rows[best]["images_per_second"] / default["images_per_second"]
        parts.append(f"The built default reaches {1 / gap:.0%} of that.")
        if best.startswith("delay-"):
            parts.append(DELAY_TRADE_OFF)
    return " ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
