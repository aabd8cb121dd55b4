"""The demo model's latent-to-RGB preview map (distrifusion.vae.preview), fitted by least squares
against its own VAE on rendered scenes and stored in its ``vae/`` folder. ``python -m
demo_model.train`` writes it; this command refits it for a model already trained:

    python -m demo_model.preview_map [--model demo_model/sdxl-shapes]
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL

from distrifusion.vae.preview import LatentToRgb

from . import SHIPPED
from .scenes import random_scene, render

FIT_SCENES = 64
FIT_SIZE = 256


def encoded_scenes(vae: AutoencoderKL, seeds: range, size: int) -> torch.Tensor:
    """``[N, C, h, w]`` latents of rendered scenes as the UNet sees them (scaled)."""
    pixels = np.stack([np.asarray(render(random_scene(seed), size, size)) for seed in seeds])
    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        return vae.encode(images).latent_dist.mean * vae.config.scaling_factor


def fit_preview_map(vae: AutoencoderKL, scenes: int = FIT_SCENES, size: int = FIT_SIZE) -> LatentToRgb:
    latents = encoded_scenes(vae, range(scenes), size)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return LatentToRgb.fit(lambda z: vae.decode(z / vae.config.scaling_factor).sample, latents, scale)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m demo_model.preview_map", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--model", type=Path, default=SHIPPED, help="the diffusers directory")
    args = parser.parse_args(argv)
    vae = AutoencoderKL.from_pretrained(args.model / "vae", dtype=torch.float32).eval()
    print(f"wrote {fit_preview_map(vae).save(args.model / 'vae')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
