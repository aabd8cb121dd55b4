"""How good a tiled decode is: PSNR against the whole decode, and a seam score; diffusers' own
tiled decode at a given tile size to compare with; a latent whose decode has structure."""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
from diffusers import AutoencoderKL

from ..export.wrappers import VaeDecoderExport


def psnr(image: np.ndarray, reference: np.ndarray) -> float:
    """dB, on 0..255 pixels (float pixels are rounded first, as the stage rounds them)."""
    difference = np.round(image.astype(np.float64)) - np.round(reference.astype(np.float64))
    mse = float(np.mean(difference**2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


def border_contrast(image: np.ndarray, rows: Iterable[int], columns: Iterable[int]) -> float:
    """Mean absolute step between neighbouring pixel rows (columns) across the given borders,
    divided by the mean step everywhere else."""
    pixels = np.round(image.astype(np.float64))
    vertical = np.abs(np.diff(pixels, axis=0)).mean(axis=(1, 2))  # step from row y to y + 1
    horizontal = np.abs(np.diff(pixels, axis=1)).mean(axis=(0, 2))
    on_rows = sorted({row - 1 for row in rows if 0 < row < pixels.shape[0]})
    on_columns = sorted({column - 1 for column in columns if 0 < column < pixels.shape[1]})
    across = np.concatenate([vertical[on_rows], horizontal[on_columns]])
    elsewhere = np.concatenate([np.delete(vertical, on_rows), np.delete(horizontal, on_columns)])
    return float(across.mean() / elsewhere.mean())


def seam_score(tiled: np.ndarray, whole: np.ndarray, rows: Iterable[int], columns: Iterable[int]) -> float:
    """:func:`border_contrast` of the tiled decode over that of the whole decode at the same
    borders (the picture itself has edges there too): 1, the borders look like the rest; above 1,
    seams (steps at the borders); below 1, the borders are smoother than the picture."""
    rows, columns = list(rows), list(columns)
    return border_contrast(tiled, rows, columns) / border_contrast(whole, rows, columns)


def tile_borders(starts: Iterable[int], tile: int) -> list[int]:
    """Pixel rows (or columns) where tiles start or end."""
    return sorted({edge for start in starts for edge in (start, start + tile)})


def diffusers_tiled_decode(vae: AutoencoderKL, latents: torch.Tensor, tile_pixels: int) -> np.ndarray:
    """``[C, h, w]`` raw latents -> uint8 ``[H, W, 3]`` through ``AutoencoderKL.enable_tiling`` with
    tiles of ``tile_pixels`` (its default overlap, 0.25), post-processed as the stage does."""
    saved = vae.tile_sample_min_size, vae.tile_latent_min_size, vae.use_tiling
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile_pixels, tile_pixels // scale
    vae.enable_tiling()
    try:
        with torch.no_grad():
            return VaeDecoderExport(vae)(latents[None])[0].numpy()
    finally:
        vae.tile_sample_min_size, vae.tile_latent_min_size, vae.use_tiling = saved


def diffusers_tile_borders(latent_size: int, tile_pixels: int, scale: int) -> list[int]:
    """Where diffusers' tiles start and end (stride 0.75 of a tile) along one side, in pixels."""
    stride = int(tile_pixels // scale * 0.75)
    return tile_borders([start * scale for start in range(0, latent_size, stride)], tile_pixels)


def structured_picture(height: int, width: int) -> torch.Tensor:
    """``[1, 3, H, W]`` in -1..1: gradients, a checkerboard, a sine pattern and a hard diagonal."""
    y, x = np.mgrid[0:height, 0:width] / np.array([height, width])[:, None, None]
    picture = np.stack([x, y, 0.5 + 0.5 * np.sin(12 * np.pi * x * y)])
    picture[:, (np.floor(x * 9) + np.floor(y * 7)) % 2 == 0] *= 0.6
    picture[:, np.abs(x - y) < 0.01] = 1.0
    return torch.tensor(picture[None] * 2 - 1, dtype=torch.float32)


def structured_latents(vae: AutoencoderKL, height: int, width: int | None = None) -> torch.Tensor:
    """``[C, h, w]`` raw latents (scaled as a pipeline's) of :func:`structured_picture`, by the VAE's encoder."""
    with torch.no_grad():
        encoded = vae.encode(structured_picture(height, width or height)).latent_dist.mean
    return encoded[0] * vae.config.scaling_factor
