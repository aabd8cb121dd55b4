"""Fidelity the way the DistriFusion paper measures it (its Table 1): each picture made with the
UNet split over 2, 4 or 8 ranks against the one-device picture of the same prompt and seed, on the
demo model, whose pictures follow their prompts.

    python benchmarks/fidelity.py [--sizes 256 512 1024] [--steps 20]

For each size (the trained size, 2x and 4x its side), each rank count (gloo ranks on the CPU) and
each mode, `distrifusion-generate` draws the same held-out prompts with the same seed. Reported per
configuration: PSNR and SSIM (torchmetrics, 8-bit RGB) against the 1-rank pictures, the detector's
agreement with the prompt (every colour; shapes) and the mean object count, next to the paper's
Table 1 (SDXL at 1024², COCO captions, 50 steps). Writes benchmarks/results/fidelity.json, the
picture grid benchmarks/figures/fidelity.png and the section "Fidelity against one device" of
BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from benchmarks.harness import log, machine_line, publish, start_conditions
from benchmarks.prompt_following import held_out_scenes
from benchmarks.serving_common import BENCHMARKS_MD
from demo_model import SHIPPED
from demo_model.detector import agreement, detect
from demo_model.scenes import Scene

RESULTS = Path(__file__).resolve().parent / "results" / "fidelity.json"
FIGURE = Path(__file__).resolve().parent / "figures" / "fidelity.png"
HEADING = "## Fidelity against one device (`benchmarks/fidelity.py`)"
MODES = ("full_sync", "corrected_async_gn", "stale_gn", "separate_gn", "naive_patch")
RANKS = (2, 4, 8)
# Paper Table 1, PSNR (dB) against the one-device picture: (devices, method) -> value.
PAPER_PSNR = {
    (2, "naive_patch"): 14.0,
    (2, "corrected_async_gn"): 24.6,
    (4, "naive_patch"): 10.7,
    (4, "corrected_async_gn"): 23.0,
    (8, "naive_patch"): 7.70,
    (8, "corrected_async_gn"): 22.0,
}


def draw(scenes: list[Scene], seed: int, size: int, ranks: int, mode: str, steps: int) -> list[np.ndarray]:
    """The pictures of ``scenes``' captions, one batch, from ``distrifusion-generate``."""
    with tempfile.TemporaryDirectory() as folder:
        command = [sys.executable, "-m", "distrifusion.cli.generate", "--model", str(SHIPPED), "--ranks", str(ranks),
                   "--mode", mode, "--seed", str(seed), "--height", str(size), "--width", str(size),
                   "--steps", str(steps), "--output-dir", folder]  # fmt: skip
        for scene in scenes:
            command += ["--prompt", scene.caption]
        subprocess.run(command, check=True, capture_output=True, text=True)
        return [
            np.asarray(Image.open(Path(folder) / f"image_{i}.png").convert("RGB")) for i in range(len(scenes))
        ]


def compare(pictures: list[np.ndarray], reference: list[np.ndarray], scenes: list[Scene]) -> dict[str, Any]:
    def batch(images: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float()

    detections = [detect(Image.fromarray(p)) for p in pictures]
    found = [agreement(s, d) for s, d in zip(scenes, detections, strict=True)]
    psnr = [peak_signal_noise_ratio(batch([p]), batch([r]), data_range=255.0).item()
            for p, r in zip(pictures, reference, strict=True)]  # fmt: skip
    return {
        "psnr_db": float(np.mean(psnr)),
        "ssim": structural_similarity_index_measure(
            batch(pictures), batch(reference), data_range=255.0
        ).item(),
        "colours": float(np.mean([f.background and f.colours for f in found])),
        "shapes": float(np.mean([f.shapes for f in found])),
        "objects": float(np.mean([len(d.objects) for d in detections])),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512, 1024])
    parser.add_argument("--prompts", type=int, nargs="+", default=[8, 4, 2], help="per size")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    parser.add_argument("--merge", action="store_true",
                        help="keep the published rows of the sizes not run now (same steps and seed)")  # fmt: skip
    args = parser.parse_args(argv)
    conditions = start_conditions()
    started = time.monotonic()
    scenes = [scene for _, scene in held_out_scenes(max(args.prompts))]
    results: list[dict[str, Any]] = []
    figure_rows: list[tuple[str, list[np.ndarray]]] = []
    for size, count in zip(args.sizes, args.prompts, strict=True):
        chosen = scenes[:count]
        reference = draw(chosen, args.seed, size, 1, "full_sync", args.steps)
        row = {
            "size": size,
            "ranks": 1,
            "mode": "one device",
            "prompts": count,
            **compare(reference, reference, chosen),
        }
        results.append(row)
        log(str(row))
        if size == args.sizes[0]:
            figure_rows.append(("1 rank", reference))
        for ranks in RANKS:
            for mode in MODES:
                pictures = draw(chosen, args.seed, size, ranks, mode, args.steps)
                row = {"size": size, "ranks": ranks, "mode": mode, "prompts": count,
                       **compare(pictures, reference, chosen), "paper_psnr_db": PAPER_PSNR.get((ranks, mode))}  # fmt: skip
                results.append(row)
                log(str(row))
                if (
                    size == args.sizes[0]
                    and ranks == max(RANKS)
                    and mode in ("corrected_async_gn", "naive_patch")
                ):
                    figure_rows.append((f"{ranks} ranks, {mode}", pictures))
    report = {"date": datetime.date.today().isoformat(), "machine": machine_line(), "conditions": conditions,
              "steps": args.steps, "seed": args.seed, "minutes": (time.monotonic() - started) / 60,
              "prompts": [s.caption for s in scenes], "results": results}  # fmt: skip
    if args.merge:
        report = merged(json.loads(RESULTS.read_text()), report)
    if not args.merge or args.sizes[0] <= min(row["size"] for row in report["results"]):
        picture_grid(figure_rows, FIGURE)  # the grid shows the smallest size published
    publish(RESULTS, report, markdown(report), args.benchmarks_md, HEADING)
    return 0


def merged(published: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new``'s rows with ``published``'s rows of the other sizes, which must share steps and seed."""
    for key in ("steps", "seed"):
        if published[key] != new[key]:
            raise SystemExit(f"--merge: the published run used {key}={published[key]}, this one {new[key]}")
    sizes = {row["size"] for row in new["results"]}
    kept = [row for row in published["results"] if row["size"] not in sizes]
    prompts = max(published["prompts"], new["prompts"], key=len)
    return {**new, "minutes": published["minutes"] + new["minutes"], "prompts": prompts,
            "results": sorted(kept + new["results"], key=lambda row: row["size"])}  # fmt: skip


def picture_grid(rows: list[tuple[str, list[np.ndarray]]], path: Path) -> None:
    """One row per configuration, its label on the left."""
    from PIL import ImageDraw

    side = rows[0][1][0].shape[0]
    label = 150
    canvas = Image.new("RGB", (label + side * len(rows[0][1]), side * len(rows)), "white")
    draw_text = ImageDraw.Draw(canvas)
    for index, (name, pictures) in enumerate(rows):
        draw_text.text((6, index * side + side // 2 - 6), name, fill="black")
        for column, picture in enumerate(pictures):
            canvas.paste(Image.fromarray(picture), (label + column * side, index * side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} ({report['conditions']}; {report['minutes']:.0f} min). "
        f"The demo model, held-out prompts, {report['steps']} Euler steps, guidance 5, seed {report['seed']}, "
        "warm-up 4 steps; gloo ranks on the CPU. PSNR and SSIM against the 1-rank picture of the same prompt "
        "and seed (8-bit RGB, mean over prompts); colours and shapes: share of pictures whose detected "
        "colours (background and objects) and shapes match the prompt; objects: mean detected count. The "
        "paper's column: Table 1, SDXL at 1024², 50 steps, COCO captions, against one GPU.",
        "",
        "| size | ranks | mode | PSNR (dB) | SSIM | colours | shapes | objects | paper PSNR (dB) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["results"]:
        psnr = "∞" if row["ranks"] == 1 else f"{row['psnr_db']:.1f}"
        paper = "" if row.get("paper_psnr_db") is None else f"{row['paper_psnr_db']:.1f}"
        lines.append(
            f"| {row['size']}² | {row['ranks']} | {row['mode']} | {psnr} | {row['ssim']:.3f} | {row['colours']:.0%} | "
            f"{row['shapes']:.0%} | {row['objects']:.1f} | {paper} |"
        )
    lines += [
        "",
        "![1 rank, then 8 ranks corrected_async_gn and naive_patch](benchmarks/figures/fidelity.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
