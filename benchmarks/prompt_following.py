"""Prompt following of the demo model, through the served `sdxl` ensemble: for scenes whose seeds and
captions were not used in training, the detector (demo_model.detector) reads each generated
picture back and compares it with what the prompt said.

    python benchmarks/prompt_following.py [--prompts 64] [--steps 20]

Builds the CPU model repository if missing (scripts/cpu_repository.sh: the shipped demo model,
2 gloo UNet ranks), starts tritonserver on free ports and sends the prompts over gRPC, four to a
request, at the model's trained size. Writes benchmarks/results/prompt_following.json, the picture
grid benchmarks/figures/prompt_following.png (generated above, the scene the prompt describes
below) and the section "Prompt following of the demo model" of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.harness import log, machine_line, publish, start_conditions
from benchmarks.serving_common import BENCHMARKS_MD
from clients.sdxl_client import generate
from demo_model import SHIPPED
from demo_model.detector import agreement, detect
from demo_model.scenes import Scene, random_scene, render
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

RESULTS = Path(__file__).resolve().parent / "results" / "prompt_following.json"
FIGURE = Path(__file__).resolve().parent / "figures" / "prompt_following.png"
HEADING = "## Prompt following of the demo model (`benchmarks/prompt_following.py`)"
EVALUATION_SEEDS = 2 * 10**6  # training scenes have seeds 0..N-1, the training previews 10**6..
TARGETS = {"colours": 0.8, "shapes": 0.6}
REQUEST_ROWS = 4  # the CPU repository's max_batch_size


def held_out_scenes(count: int, model: Path = SHIPPED) -> list[tuple[int, Scene]]:
    """``count`` (seed, scene) pairs whose seeds and captions the training never saw."""
    if not (model / "training.json").is_file():
        raise SystemExit(f"{model} holds no trained model: train it with `python -m demo_model.train`")
    trained = json.loads((model / "training.json").read_text())["scenes"]
    seen = {random_scene(seed).caption for seed in range(trained)}
    chosen: list[tuple[int, Scene]] = []
    seed = EVALUATION_SEEDS
    while len(chosen) < count:
        scene = random_scene(seed)
        if scene.caption not in seen:
            chosen.append((seed, scene))
        seed += 1
    return chosen


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    def share(key: str) -> float:
        return float(np.mean([row[key] for row in rows]))

    return {
        "background": share("background"),
        "object_colours": share("colours"),
        "colours": float(np.mean([row["background"] and row["colours"] for row in rows])),
        "shapes": share("shapes"),
        "count": share("count"),
        "objects_found": share("objects_found"),
    }


def grid(pictures: list[np.ndarray], scenes: list[Scene], path: Path, columns: int = 8) -> None:
    side = pictures[0].shape[0]
    rows = (len(pictures) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * side, rows * 2 * side), "white")
    for index, (picture, scene) in enumerate(zip(pictures, scenes, strict=True)):
        x, y = (index % columns) * side, (index // columns) * 2 * side
        canvas.paste(Image.fromarray(picture), (x, y))
        canvas.paste(render(scene, side, side), (x, y + side))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    conditions = start_conditions()
    side = json.loads((SHIPPED / "unet" / "config.json").read_text())["sample_size"] * 8
    scenes = held_out_scenes(args.prompts)
    repository = ensure_cpu_repository()
    rows: list[dict[str, Any]] = []
    pictures: list[np.ndarray] = []
    with CpuServer(repository, RESULTS.parent / "prompt_following_server.log") as server:
        for start in range(0, len(scenes), REQUEST_ROWS):
            chunk = scenes[start : start + REQUEST_ROWS]
            result = generate(server.grpc, prompts=[s.caption for _, s in chunk], seeds=[seed for seed, _ in chunk],
                              height=side, width=side, num_inference_steps=args.steps,
                              guidance_scale=args.guidance)  # fmt: skip
            for (seed, scene), picture in zip(chunk, result["images"], strict=True):
                detection = detect(Image.fromarray(picture))
                found = agreement(scene, detection)
                rows.append(
                    {"seed": seed, "prompt": scene.caption, "detected": asdict(detection), **asdict(found)}
                )
                pictures.append(picture)
            log(f"{len(rows)}/{len(scenes)}: {summarize(rows)}")
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "conditions": conditions,
        "model": str(SHIPPED.relative_to(Path(__file__).resolve().parents[1])),
        "size": side,
        "steps": args.steps,
        "guidance": args.guidance,
        "summary": summarize(rows),
        "targets": TARGETS,
        "rows": rows,
    }
    grid(pictures[:16], [s for _, s in scenes[:16]], FIGURE)
    publish(RESULTS, report, markdown(report), args.benchmarks_md, HEADING)
    return 0


def markdown(report: dict[str, Any]) -> str:
    summary = report["summary"]
    lines = [
        f"Measured {report['date']} on {report['machine']} ({report['conditions']}). The shipped demo model "
        f"(`{report['model']}`) served by the CPU repository, {len(report['rows'])} prompts whose seeds and "
        f"captions were not used in training, {report['size']}x{report['size']} (its trained size), "
        f"{report['steps']} Euler steps, guidance {report['guidance']:g}, 2 UNet ranks (corrected_async_gn). "
        "The detector reads each picture back; a row counts when the picture has exactly what the prompt "
        "says (as multisets: the objects' colours, their shapes, their count).",
        "",
        "| what the picture has | share of prompts | target |",
        "|---|---:|---:|",
        f"| the background colour(s) | {summary['background']:.0%} | |",
        f"| the objects' colours | {summary['object_colours']:.0%} | |",
        f"| every colour: background and objects | {summary['colours']:.0%} | {TARGETS['colours']:.0%} |",
        f"| the objects' shapes | {summary['shapes']:.0%} | {TARGETS['shapes']:.0%} |",
        f"| the number of objects | {summary['count']:.0%} | |",
        f"| objects of the prompt found (colour and shape; mean share) | {summary['objects_found']:.0%} | |",
        "",
        "![generated (top) and the scene its prompt describes (bottom)](benchmarks/figures/prompt_following.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
