"""CPU benchmark of ``torch.compile`` (inductor, C++): eager against compiled, side by side.

Runs the configuration of ``cpu_patch_parallel.py`` (SDXL-architecture UNet with random weights,
block_out_channels 128/256/512, 512x512 image, classifier-free guidance, Euler, fp32, one thread
per rank) as six runs, each in fresh processes: the plain diffusers UNet, the engine at 1 rank and
the engine at 2 ranks (corrected_async_gn), each eager and compiled. It reports steps per second in
the warm-up and steady phases, the compiled/eager ratio, the first step's time (the compile, on a
cache directory this invocation starts empty, and again in a new process on the cache the first
compile filled: a restarted server), the peak RSS per rank and the compiled latents' error against
eager. Then (``--server``) the CPU tritonserver's start, from launch to ready, for the tiny model's
repository built eager and built with ``--compile`` (2 ranks, warm-up 256x256), the compiled one on
an empty inductor cache and restarted on the cache its first start filled.

    python benchmarks/cpu_compiled_unet.py [--steps 14] [--server] [--output benchmarks/results/cpu_compiled_unet.json]

Writes the JSON and the "Compiled UNet (CPU)" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from benchmarks.cpu_patch_parallel import Settings, build_pipe, denoise, make_inputs
from benchmarks.harness import (
    MIB,
    ForeignCpu,
    log,
    machine_info,
    machine_line,
    peak_rss_bytes,
    release_memory,
    replace_section,
    reset_peak_rss,
    wait_idle,
    write_json,
)
from distrifusion.config import DistriConfig
from distrifusion.launch import spawn_local
from distrifusion.serving.cpu_server import CpuServer
from distrifusion.tiny_model import save_tiny_model
from distrifusion.unet import DistriUNet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = ROOT / "benchmarks" / "results" / "cpu_compiled_unet.json"
SECTION = "## Compiled UNet (CPU)"
MODE = "corrected_async_gn"
# (label, world, engine): the plain diffusers UNet, then the engine.
SUBJECTS = (("plain UNet", 1, False), ("engine, 1 rank", 1, True), ("engine, 2 ranks", 2, True))


def run(settings: Settings, engine: bool, compiled: str | None) -> dict[str, Any]:
    """One generation on this rank; rank 0's figures (and every rank's peak RSS)."""
    torch.set_num_threads(1)
    world = dist.get_world_size() if dist.is_initialized() else 1
    release_memory()
    pipe = build_pipe(settings)
    inputs = make_inputs(pipe, settings)
    if engine:
        config = DistriConfig(mode=MODE, warmup_steps=settings.warmup_steps, compile=compiled or False)
        unet: Any = DistriUNet(pipe.unet, config)
    else:
        unet = (
            torch.compile(pipe.unet, backend=compiled, dynamic=False, fullgraph=True)
            if compiled
            else pipe.unet
        )
    release_memory()
    reset_peak_rss()
    meter = ForeignCpu(world=world).start()
    latents, records, _ = denoise(pipe, unet, inputs, settings, profile_rank0=False)
    window = meter.stop()
    peaks: list[Any] = [peak_rss_bytes()]
    if world > 1:
        peaks = [None] * world
        dist.all_gather_object(peaks, peak_rss_bytes())
    seconds = [record.seconds for record in records]
    return {
        "first_step_seconds": seconds[0],
        "warmup_step_seconds": statistics.median(seconds[i] for i in settings.warmup_step_indices()),
        "steady_step_seconds": statistics.median(seconds[i] for i in settings.steady_steps()),
        "step_seconds": seconds,
        "peak_rss_bytes": peaks,
        "foreign_cpu": window,
        "latents": latents,
    }


def measure(settings: Settings, world: int, engine: bool, compiled: str | None) -> dict[str, Any]:
    wait_idle(timeout=600)
    result = spawn_local(run, world, (settings, engine, compiled), threads_per_rank=1)
    log(
        f"{compiled or 'eager'} {world} rank(s), engine={engine}: first step "
        f"{result['first_step_seconds']:.1f} s, steady {result['steady_step_seconds']:.3f} s"
    )
    return result


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


def table(results: dict[str, Any]) -> str:
    lines = [
        "| subject | eager steps/s (warm-up, steady) | compiled steps/s (warm-up, steady) | steady ratio "
        "| compile: cold, warm cache | peak RSS per rank, eager / compiled | error vs eager |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, figures in results.items():
        eager, cold, warm = figures["eager"], figures["compiled"], figures["compiled, warm cache"]
        compile_cold = cold["first_step_seconds"] - eager["first_step_seconds"]
        compile_warm = warm["first_step_seconds"] - eager["first_step_seconds"]
        rss = " / ".join(
            ", ".join(f"{peak / MIB:.0f}" for peak in run["peak_rss_bytes"]) for run in (eager, cold)
        )
        lines.append(
            f"| {label} | {1 / eager['warmup_step_seconds']:.2f}, {1 / eager['steady_step_seconds']:.2f} "
            f"| {1 / warm['warmup_step_seconds']:.2f}, {1 / warm['steady_step_seconds']:.2f} "
            f"| {eager['steady_step_seconds'] / warm['steady_step_seconds']:.2f}x "
            f"| {compile_cold:.0f} s, {compile_warm:.0f} s | {rss} MiB | {figures['relative_error']:.1e} |"
        )
    return "\n".join(lines)


def server_starts(directory: Path, backend: str) -> dict[str, float | str]:
    """Seconds from launch to ready (or why it never was): eager, compiled on an empty cache,
    compiled again on that cache."""
    model = save_tiny_model(directory / "tiny-sdxl")
    build = [sys.executable, "-m", "build_engines", "--model", str(model), "--target", "cpu",
             "--unet-ranks", "2", "--warmup-resolutions", "256x256"]  # fmt: skip
    starts: dict[str, float | str] = {}
    for label, flags in (
        ("eager", []),
        ("compiled, empty cache", ["--compile", backend]),
        ("compiled, restarted", None),
    ):
        repository = directory / ("eager" if label == "eager" else "compiled")
        if flags is not None:
            subprocess.run([*build, "--output", str(repository), *flags], check=True, cwd=ROOT, timeout=1200)
        wait_idle(timeout=600)
        started = time.perf_counter()
        server = CpuServer(repository, directory / f"{label}.log")
        try:
            server.wait_ready(seconds=3600)  # a cold compile takes longer than CpuServer's usual wait
            starts[label] = time.perf_counter() - started
        except (RuntimeError, TimeoutError) as error:
            # The server's own last error line: what an operator would see.
            lines = [line for line in str(error).splitlines() if "rror" in line]
            starts[label] = (
                f"failed after {time.perf_counter() - started:.0f} s: {lines[-1][:300] if lines else error}"
            )
        finally:
            server.stop()
        log(f"server {label}: {starts[label]}")
    return starts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--latent", type=int, default=64, help="latent height = width (image pixels / 8)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-markdown", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--server", action="store_true", help="also time the CPU server's start")
    parser.add_argument(
        "--server-only", action="store_true", help="time the server's start; engine figures from --output"
    )
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (default inductor)")
    args = parser.parse_args(argv)
    if args.server_only:  # the engine figures' settings are those of the run that measured them
        measured = json.loads(args.output.read_text())["settings"]
        args.steps, args.latent = measured["steps"], measured["latent_size"]
    settings = Settings(
        seed=0,
        block_out_channels=(128, 256, 512),
        transformer_layers_per_block=(1, 1, 2),
        latent_size=args.latent,
        steps=args.steps,
        warmup_steps=4,
        guidance_scale=5.0,
        comm_batch_size=60,
        overhead_pairs=0,
        profile=False,
        worlds=(1, 2),
        modes_by_world={1: (MODE,), 2: (MODE,)},
    )
    results: dict[str, Any] = {}
    if args.server_only:
        results = json.loads(args.output.read_text())["results"]
    with tempfile.TemporaryDirectory(prefix="inductor-cache-") as cache:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # the spawned ranks inherit it
        for label, world, engine in () if args.server_only else SUBJECTS:
            # The warm-cache run is the one whose step times count: the cold one's first steps
            # share the cores with inductor's compile workers.
            runs = {
                "eager": measure(settings, world, engine, compiled=None),
                "compiled": measure(settings, world, engine, compiled=args.backend),
                "compiled, warm cache": measure(settings, world, engine, compiled=args.backend),
            }
            runs["relative_error"] = relative_error(
                runs["compiled, warm cache"]["latents"], runs["eager"]["latents"]
            )
            results[label] = runs
        starts = (
            server_starts(Path(cache) / "server", args.backend) if args.server or args.server_only else {}
        )
    payload = {
        "machine": machine_info(),
        "server_start_seconds": starts,
        "settings": vars(settings) | {"mode": MODE, "backend": args.backend},
        "results": {
            label: {
                key: value if key == "relative_error" else {k: v for k, v in value.items() if k != "latents"}
                for key, value in runs.items()
            }
            for label, runs in results.items()
        },
    }
    write_json(args.output, payload)
    body = (
        f"`python benchmarks/cpu_compiled_unet.py` ({machine_line()}; SDXL-architecture UNet, "
        f"block_out_channels 128/256/512, {settings.image_size}x{settings.image_size}, batch 1 + CFG, "
        f"{settings.steps} Euler steps, {settings.warmup_steps} warm-up steps, {MODE} on 2 ranks, fp32, "
        f"backend {args.backend}, "
        "1 thread per rank, every run in fresh processes). Compiled step rates are the warm-cache "
        "run's; compile time is the first step's time over eager's, on an empty inductor cache and "
        "on the cache that first compile filled.\n\n" + table(results)
    )
    if starts:
        body += (
            "\n\nThe CPU tritonserver from launch to ready (tiny model, 2 UNet ranks, warm-up 256x256): "
            + ", ".join(
                f"{label} {seconds:.0f} s" if isinstance(seconds, float) else f"{label} {seconds}"
                for label, seconds in starts.items()
            )
            + "."
        )
    if not args.no_markdown:
        replace_section(ROOT / "BENCHMARKS.md", SECTION, body)
    print(body)


if __name__ == "__main__":
    sys.exit(main())
