"""Tiled VAE decoding against the whole decode, ours beside diffusers' ``enable_tiling``, on the
same latents: PSNR against the whole decode and the seam score (distrifusion.vae.quality: the
contrast across tile borders over the whole decode's at the same borders; 1 is seamless).

    python benchmarks/vae_tiling.py

The demo model's VAE (trained: demo_model/; the VAE engines of the CPU repository, ONNX Runtime)
on real decodes: the latents the demo model draws for a held-out prompt (1024 x 1024), and the
encoder's latents of a rendered scene and of a synthetic picture of gradients, edges and a
checkerboard. 1024 x 1024: the whole decode through the whole-latent engine; 2048 x 2048: through
diffusers' own decode (PyTorch's attention is memory-efficient; ONNX Runtime's would need 17 GiB).
Writes benchmarks/results/vae_tiling.json and its table to BENCHMARKS.md ("VAE tiling").
"""

from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from PIL import Image

from benchmarks.harness import log, machine_line, publish, start_conditions
from benchmarks.prompt_following import held_out_scenes
from benchmarks.serving_common import BENCHMARKS_MD
from demo_model import SHIPPED
from demo_model.scenes import render
from distrifusion.export.onnx_export import ort_session
from distrifusion.serving.cpu_server import ensure_cpu_repository
from distrifusion.vae.decode import ENGINE_OUTPUTS, WHOLE_ENGINE, DecodeSettings, VaeDecoder
from distrifusion.vae.quality import (
    diffusers_tile_borders,
    diffusers_tiled_decode,
    psnr,
    seam_score,
    structured_latents,
    tile_borders,
)

RESULTS = Path(__file__).resolve().parent / "results" / "vae_tiling.json"
SHARES = (0.0, 0.5, 0.75, 1.0)


def onnx_engines(repository: Path):
    sessions = {model: ort_session(repository / model / "1" / "model.onnx") for model in ENGINE_OUTPUTS}

    def run(model: str, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {name: tensor.numpy() for name, tensor in inputs.items()}
        return torch.from_numpy(sessions[model].run([ENGINE_OUTPUTS[model]], feeds)[0])

    return run


def encoded(vae: AutoencoderKL, image: Image.Image) -> torch.Tensor:
    """``[C, h, w]`` latents of ``image``, scaled as a pipeline's."""
    pixels = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(pixels).latent_dist.mean[0] * vae.config.scaling_factor


def generated_latents(prompt: str, size: int) -> torch.Tensor:
    """``[C, h, w]`` latents the demo model draws for ``prompt`` (diffusers' pipeline, 1 process)."""
    pipe = StableDiffusionXLPipeline.from_pretrained(SHIPPED, dtype=torch.float32, local_files_only=True)
    with torch.no_grad():
        latents = pipe(prompt=prompt, height=size, width=size, num_inference_steps=20, guidance_scale=5.0,
                       generator=torch.Generator().manual_seed(0), output_type="latent").images  # fmt: skip
    return latents[0]


def compare(
    vae: AutoencoderKL, run, latents: torch.Tensor, whole, tile_pixels: int, shares
) -> list[dict[str, Any]]:
    height, width = latents.shape[-2:]
    scale = 8
    rows = []
    started = time.perf_counter()
    theirs = diffusers_tiled_decode(vae, latents, tile_pixels)
    borders = diffusers_tile_borders(height, tile_pixels, scale)
    rows.append({"method": "diffusers enable_tiling", "tile": tile_pixels, "psnr_db": psnr(theirs, whole),
                 "seam": seam_score(theirs, whole, borders, borders), "seconds": time.perf_counter() - started})  # fmt: skip
    for share in shares:
        settings = DecodeSettings.derive(vae.config, 8 << 30, tensorrt=False, tile=tile_pixels // scale,
                                         whole_max_pixels=1, image_statistics=share)  # fmt: skip
        started = time.perf_counter()
        ours, record = VaeDecoder(settings, run).decode(latents)
        seconds = time.perf_counter() - started
        plan = settings.plan(height, width)
        borders = tile_borders([row * scale for row in plan.rows], plan.tile_height * scale)
        rows.append({"method": f"ours, image statistics {share:g}", "tile": tile_pixels, "tiles": record.tiles,
                     "psnr_db": psnr(ours.numpy(), whole), "seam": seam_score(ours.numpy(), whole, borders, borders),
                     "seconds": seconds})  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmarks-md", default=str(BENCHMARKS_MD), help="'' to skip")
    args = parser.parse_args(argv)
    conditions = start_conditions()
    repository = ensure_cpu_repository()
    vae = AutoencoderKL.from_pretrained(SHIPPED / "vae", dtype=torch.float32).eval()
    scene = held_out_scenes(1)[0][1]
    run = onnx_engines(repository)
    results = []
    for size, reference, tiles, shares in ((1024, "whole-latent engine (ONNX Runtime)", (512,), SHARES),
                                           (2048, "diffusers' decode (PyTorch)", (1024,), (0.75,))):  # fmt: skip
        latent_sets = {
            "encoded scene": encoded(vae, render(scene, size, size)),
            "encoded picture": structured_latents(vae, size),
        }
        if size == 1024:
            latent_sets = {"generated": generated_latents(scene.caption, size), **latent_sets}
        for name, latents in latent_sets.items():
            log(f"{size}x{size}, {name} ...")
            if size == 1024:
                whole = run(WHOLE_ENGINE, {"latents": latents[None]})[0].numpy()
            else:
                with torch.no_grad():
                    decoded = vae.decode(latents[None] / vae.config.scaling_factor).sample
                whole = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0).numpy()
            for tile in tiles:
                for row in compare(vae, run, latents, whole, tile, shares):
                    results.append({"size": size, "latents": name, "reference": reference, **row})
                    log(f"  {row}")
    report = {"date": datetime.date.today().isoformat(), "machine": machine_line(), "conditions": conditions,
              "results": results}  # fmt: skip
    publish(
        RESULTS, report, markdown(report), args.benchmarks_md, "## VAE tiling (`benchmarks/vae_tiling.py`)"
    )
    return 0


def markdown(report: dict[str, Any]) -> str:
    lines = [
        f"Measured {report['date']} on {report['machine']} ({report['conditions']}). The demo model's trained "
        "VAE on the same latents (generated: what the model drew for a held-out prompt; encoded: a rendered scene "
        "and a synthetic picture through its encoder), tiles with a quarter overlap. PSNR against the whole decode; "
        "seam score: the contrast across the method's own tile borders over the whole decode's at the same "
        "borders (1: seamless; above 1: seams; below 1: borders smoother than the picture).",
        "",
        "| size | latents | tile (px) | method | PSNR (dB) | seam score | seconds |",
        "|---|---|---:|---|---:|---:|---:|",
    ]
    for row in report["results"]:
        lines.append(
            f"| {row['size']}² | {row['latents']} | {row['tile']} | {row['method']} | {row['psnr_db']:.2f} | "
            f"{row['seam']:.3f} | {row['seconds']:.1f} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
