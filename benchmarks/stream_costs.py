"""What streaming costs the denoising loop: the step time with no listener, with a progress listener
(the clean-latent probe and a frame per step, as the UNet stage's streams get), and with a preview
every step; and a preview's own cost at 1024² to 4096².

    python -m benchmarks.stream_costs [--size 512] [--steps 6] [--rounds 4] [--benchmarks-md BENCHMARKS.md]

The three loops run side by side in ABBA order on one rank of the demo model; the preview timings
are of LatentToRgb.preview_pixels plus the copy to the host, on random latents of each size.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.harness import log, machine_line, paired_ratios, publish, release_memory
from demo_model import SHIPPED
from distrifusion.config import DistriConfig
from distrifusion.pipeline import DistriPipeline, StepProgress
from distrifusion.vae.preview import LatentToRgb

HEADING = "## Streamed progress: listener overhead and preview cost"


def _loop_seconds(pipeline: DistriPipeline, size: int, steps: int, on_progress: object) -> float:
    started = time.perf_counter()
    pipeline(prompt="a red circle on a blue background", height=size, width=size, num_inference_steps=steps,
             seed=1, output_type="latent", on_progress=on_progress)  # fmt: skip
    return (time.perf_counter() - started) / steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--preview-size", type=int, default=256)
    parser.add_argument("--results", type=Path, default=Path("benchmarks/results/stream_costs.json"))
    parser.add_argument("--benchmarks-md", default="")
    args = parser.parse_args(argv)

    pipeline = DistriPipeline.from_pretrained(SHIPPED, DistriConfig())
    latent_map = LatentToRgb.load(SHIPPED / "vae")
    assert latent_map is not None

    def progress_only(progress: StepProgress) -> None:
        progress.mark.done()

    def with_preview(progress: StepProgress) -> None:
        latent_map.preview_pixels(progress.clean_latent(), args.preview_size).cpu().numpy()

    _loop_seconds(pipeline, args.size, 2, None)  # allocator and kernels warm
    times: dict[str, list[float]] = {"none": [], "progress": [], "preview": []}
    for round_index in range(args.rounds):
        order = ["none", "progress", "preview"]
        for name in order if round_index % 2 == 0 else order[::-1]:
            listener = {"none": None, "progress": progress_only, "preview": with_preview}[name]
            times[name].append(_loop_seconds(pipeline, args.size, args.steps, listener))
        log(f"round {round_index + 1}: " + ", ".join(f"{k} {v[-1]:.3f} s/step" for k, v in times.items()))
    release_memory()

    previews = {}
    generator = torch.Generator().manual_seed(0)
    for side in (1024, 2048, 4096):
        latents = torch.randn(1, 4, side // 8, side // 8, generator=generator)
        runs = []
        for _ in range(20):
            started = time.perf_counter()
            latent_map.preview_pixels(latents, args.preview_size).cpu().numpy()
            runs.append(time.perf_counter() - started)
        previews[side] = statistics.median(runs)

    machine = machine_line()
    report = {
        "machine": machine,
        "size": args.size,
        "steps": args.steps,
        "rounds": args.rounds,
        "seconds_per_step": times,
        "progress_vs_none": paired_ratios(times["progress"], times["none"]),
        "preview_vs_none": paired_ratios(times["preview"], times["none"]),
        "preview_seconds": previews,
    }
    median = {name: statistics.median(values) for name, values in times.items()}
    spread = {name: (min(values), max(values)) for name, values in times.items()}
    rows = "\n".join(
        f"| {label} | {median[name]:.3f} ({spread[name][0]:.3f}-{spread[name][1]:.3f}) | "
        + ("1 (baseline)" if name == "none" else f"{report[f'{name}_vs_none']['median_ratio']:.3f}")
        + " |"
        for name, label in (
            ("none", "no listener (the `sdxl` ensemble's path)"),
            ("progress", "progress listener (probe + step mark)"),
            ("preview", f"progress + a {args.preview_size}-px preview every step"),
        )
    )
    preview_rows = "\n".join(
        f"| {side}² ({side // 8}² latent) | {seconds * 1000:.2f} |" for side, seconds in previews.items()
    )
    text = f"""`benchmarks/stream_costs.py --size {args.size} --steps {args.steps} --rounds {args.rounds}` on {machine}: one
rank of the demo model, {args.size}², the three loops side by side in ABBA order ({args.rounds} rounds of
{args.steps} steps each).

| Denoising loop | s/step, median (range) | Paired ratio to no listener (median) |
|---|---:|---:|
{rows}

| Preview of a latent of | ms ({args.preview_size}-px preview, median of 20) |
|---|---:|
{preview_rows}
"""
    publish(args.results, report, text, args.benchmarks_md, HEADING)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
