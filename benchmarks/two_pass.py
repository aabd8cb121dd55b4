"""Two-pass generation against direct generation at 2x and 4x the demo model's native side,
through the served `sdxl` ensemble: prompt agreement and object count (the detector reads each
picture back, as benchmarks/prompt_following.py does) and the time of each.

    python benchmarks/two_pass.py [--prompts 16] [--steps 12] [--strength 0.6]

Builds the CPU model repository if missing (scripts/cpu_repository.sh), starts tritonserver on free
ports and sends, per size, each prompt directly at that size and as a two-pass request (the first
pass at the native side, refined at the size with --strength), one prompt per request, both
orders alternating so that neither runs on a warmer server. Writes
benchmarks/results/two_pass.json, the grid benchmarks/figures/two_pass.png and the section "Two-pass
against direct generation" of BENCHMARKS.md.
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
from benchmarks.prompt_following import held_out_scenes
from benchmarks.serving_common import BENCHMARKS_MD
from clients.sdxl_client import generate
from demo_model import SHIPPED
from demo_model.detector import agreement, detect
from demo_model.scenes import Scene, render
from distrifusion.serving.cpu_server import CpuServer, ensure_cpu_repository

RESULTS = Path(__file__).resolve().parent / "results" / "two_pass.json"
FIGURE = Path(__file__).resolve().parent / "figures" / "two_pass.png"
HEADING = "## Two-pass against direct generation (`benchmarks/two_pass.py`)"
METHODS = ("direct", "two_pass")
SCALES = (2, 4)


def run(
    server: CpuServer, scene: Scene, seed: int, side: int, native: int, method: str, args: argparse.Namespace
) -> tuple[dict[str, Any], np.ndarray]:
    fields: dict[str, Any] = {"prompts": [scene.caption], "seeds": [seed], "height": side, "width": side,
                              "num_inference_steps": args.steps}  # fmt: skip
    if method == "two_pass":
        fields.update(first_pass_size=(native, native), strength=args.strength)
    result = generate(server.grpc, timeout=1800, **fields)
    picture = result["images"][0]
    detection = detect(Image.fromarray(picture))
    found = agreement(scene, detection)
    row = {"seed": seed, "prompt": scene.caption, "side": side, "method": method, "seconds": result["seconds"],
           "objects_wanted": len(scene.objects), "objects_detected": len(detection.objects), **asdict(found)}  # fmt: skip
    return row, picture


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    return {
        "colours": float(np.mean([row["background"] and row["colours"] for row in rows])),
        "shapes": float(np.mean([row["shapes"] for row in rows])),
        "count": float(np.mean([row["count"] for row in rows])),
        "objects_found": float(np.mean([row["objects_found"] for row in rows])),
        "extra_objects": float(np.mean([max(0, r["objects_detected"] - r["objects_wanted"]) for r in rows])),
        "seconds": float(np.median([row["seconds"] for row in rows])),
    }


def grid(
    pictures: dict[tuple[int, str, int], np.ndarray], scenes: list[Scene], path: Path, tile: int = 256
) -> None:
    """Per prompt (a column): the scene, then direct and two-pass at each size, downscaled."""
    keys = [(side, method) for side in sorted({k[0] for k in pictures}) for method in METHODS]
    canvas = Image.new("RGB", (len(scenes) * tile, (1 + len(keys)) * tile), "white")
    for column, scene in enumerate(scenes):
        canvas.paste(render(scene, tile, tile), (column * tile, 0))
        for row, (side, method) in enumerate(keys, start=1):
            picture = Image.fromarray(pictures[(side, method, column)]).resize(
                (tile, tile), Image.Resampling.LANCZOS
            )
            canvas.paste(picture, (column * tile, row * tile))
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--strength", type=float, default=0.6)
    parser.add_argument("--grid-prompts", type=int, default=6)
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    conditions = start_conditions()
    native = json.loads((SHIPPED / "unet" / "config.json").read_text())["sample_size"] * 8
    scenes = held_out_scenes(args.prompts)
    rows: list[dict[str, Any]] = []
    pictures: dict[tuple[int, str, int], np.ndarray] = {}
    with CpuServer(ensure_cpu_repository(), RESULTS.parent / "two_pass_server.log") as server:
        server.wait_ready()
        for scale in SCALES:
            side = native * scale
            for index, (seed, scene) in enumerate(scenes):
                order = METHODS if index % 2 == 0 else METHODS[::-1]
                for method in order:
                    row, picture = run(server, scene, seed, side, native, method, args)
                    rows.append(row)
                    if index < args.grid_prompts:
                        pictures[(side, method, index)] = picture
                log(f"{side}² {index + 1}/{len(scenes)}: " + ", ".join(
                    f"{r['method']} {r['seconds']:.1f} s count {r['objects_detected']}/{r['objects_wanted']}"
                    for r in rows[-2:]))  # fmt: skip
    summary = {
        f"{native * scale}/{method}": summarize([r for r in rows if r["side"] == native * scale and r["method"] == method])
        for scale in SCALES
        for method in METHODS
    }  # fmt: skip
    report = {
        "date": datetime.date.today().isoformat(),
        "machine": machine_line(),
        "conditions": conditions,
        "model": str(SHIPPED.relative_to(Path(__file__).resolve().parents[1])),
        "native": native,
        "steps": args.steps,
        "strength": args.strength,
        "summary": summary,
        "rows": rows,
    }
    grid(pictures, [scene for _, scene in scenes[: args.grid_prompts]], FIGURE)
    publish(RESULTS, report, markdown(report), args.benchmarks_md, HEADING)
    return 0


def markdown(report: dict[str, Any]) -> str:
    native, steps = report["native"], report["steps"]
    sides = sorted({row["side"] for row in report["rows"]})
    grid_rows = ", ".join(f"{side}² {method.replace('_', '-')}" for side in sides for method in METHODS)
    lines = [
        f"Measured {report['date']} on {report['machine']} ({report['conditions']}). The shipped demo model "
        f"(`{report['model']}`, trained at {native}x{native}) served by the CPU repository (2 UNet ranks, "
        f"corrected_async_gn), {len(report['rows']) // 4} held-out prompts per size, one per request, seed "
        f"per prompt. Direct: {steps} Euler steps at the size. Two-pass: {steps} steps at {native}x{native}, "
        f"upscaled, then strength {report['strength']:g} at the size ({int(steps * report['strength'])} "
        "steps), one request. The detector reads each picture back (at its own analysis size).",
        "",
        "| size | method | every colour | shapes | object count exact | objects found | extra objects (mean) | median seconds per image | time vs direct |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, summary in report["summary"].items():
        side, method = key.split("/")
        direct = report["summary"][f"{side}/direct"]["seconds"]
        lines.append(
            f"| {side}² | {method.replace('_', '-')} | {summary['colours']:.0%} | {summary['shapes']:.0%} | "
            f"{summary['count']:.0%} | {summary['objects_found']:.0%} | {summary['extra_objects']:.2f} | "
            f"{summary['seconds']:.1f} | {summary['seconds'] / direct:.2f} |"
        )
    lines += [
        "",
        f"Each column of the grid is one prompt; its rows: the scene the prompt describes, then {grid_rows} "
        "(downscaled to 256 px).",
        "",
        "![each column one prompt: the scene it describes, then direct and two-pass at each size, downscaled]"
        "(benchmarks/figures/two_pass.png)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
