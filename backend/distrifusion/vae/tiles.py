"""Where the tiles of a tiled decode lie and how their pixels are blended.

Tiles are squares of ``tile`` latent pixels (smaller along a side that is itself smaller) that
overlap their neighbours by at least ``overlap``, spread evenly from border to border, so every
tile has the same size (a tile engine of one shape takes them all) and every overlap the same
width. Each tile's pixels are weighted by a raised-cosine ramp across every overlap it shares (flat
at the image border), and weights are normalised to sum to one at every pixel: a neighbour's
weight falls exactly as this one's rises, and a tile's own border pixels, where its convolutions
saw zero padding instead of the picture, count for almost nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Starts along one side of ``length``: as few tiles as overlap by at least ``overlap``, the
    first at 0 and the last ending at the border."""
    if length <= tile:
        return [0]
    count = math.ceil((length - tile) / (tile - overlap)) + 1
    return [round(index * (length - tile) / (count - 1)) for index in range(count)]


def axis_weights(tile: int, starts: list[int], scale: int) -> np.ndarray:
    """``[len(starts), tile * scale]``: each tile's blend weight along one side, in pixels
    (``scale`` pixels per latent pixel), before normalisation."""
    size = tile * scale
    weights = np.ones((len(starts), size), dtype=np.float64)
    for index, start in enumerate(starts):
        if index > 0:  # rises across the overlap with the tile before
            overlap = (starts[index - 1] + tile - start) * scale
            weights[index, :overlap] *= _ramp(overlap)
        if index + 1 < len(starts):  # falls across the overlap with the tile after
            overlap = (start + tile - starts[index + 1]) * scale
            weights[index, size - overlap :] *= _ramp(overlap)[::-1]
    return weights


def _ramp(width: int) -> np.ndarray:
    """Raised cosine from near 0 to near 1 over ``width`` pixels (sampled at pixel centres)."""
    centres = (np.arange(width) + 0.5) / width
    return np.sin(centres * np.pi / 2) ** 2


@dataclasses.dataclass(frozen=True)
class TilePlan:
    latent_height: int
    latent_width: int
    tile_height: int
    tile_width: int
    rows: tuple[int, ...]
    columns: tuple[int, ...]
    scale: int
    """Image pixels per latent pixel."""

    @classmethod
    def for_latent(cls, height: int, width: int, tile: int, overlap: int, scale: int) -> TilePlan:
        if not 0 <= overlap < tile:
            raise ValueError(f"tile overlap {overlap} must be at least 0 and below the tile size {tile}")
        tile_height, tile_width = min(tile, height), min(tile, width)
        return cls(
            height,
            width,
            tile_height,
            tile_width,
            tuple(tile_starts(height, tile_height, overlap)),
            tuple(tile_starts(width, tile_width, overlap)),
            scale,
        )

    @functools.cached_property
    def origins(self) -> list[tuple[int, int]]:
        """(row, column) latent origin of every tile, row-major."""
        return [(row, column) for row in self.rows for column in self.columns]

    def __len__(self) -> int:
        return len(self.rows) * len(self.columns)

    def crop(self, latents: torch.Tensor, indices: range, scale: int = 1) -> torch.Tensor:
        """``[C, h, w]`` -> ``[len(indices), C, tile_height, tile_width]``; with ``scale`` (the
        plan's), an image ``[C, H, W]`` -> its tiles ``[len(indices), C, H', W']`` (for an encode)."""
        origins = self.origins
        height, width = self.tile_height * scale, self.tile_width * scale
        return torch.stack(
            [
                latents[:, row * scale : row * scale + height, column * scale : column * scale + width]
                for row, column in (origins[index] for index in indices)
            ]
        )

    @functools.cached_property
    def pixel_weights(self) -> np.ndarray:
        """``[tiles, tile_height * scale, tile_width * scale]`` float32 weights that sum to one at
        every image pixel when the tiles are laid at their origins."""
        vertical = axis_weights(self.tile_height, list(self.rows), self.scale)
        horizontal = axis_weights(self.tile_width, list(self.columns), self.scale)
        weights = np.einsum("rh,cw->rchw", vertical, horizontal).reshape(
            len(self), self.tile_height * self.scale, self.tile_width * self.scale
        )
        total = np.zeros((self.latent_height * self.scale, self.latent_width * self.scale))
        for index, weight in enumerate(weights):
            total[self.pixels(index)] += weight
        for index in range(len(self)):
            weights[index] /= total[self.pixels(index)]
        return weights.astype(np.float32)

    def latent_weights(self, indices: range) -> np.ndarray:
        """``[len(indices), 1, tile_height, tile_width]``: the tiles' :attr:`pixel_weights` averaged
        over latent pixels: how much of each latent pixel's statistics a tile stands for."""
        scale = self.scale
        weights = self.pixel_weights[indices.start : indices.stop]
        pooled = weights.reshape(len(weights), self.tile_height, scale, self.tile_width, scale).mean(
            axis=(2, 4)
        )
        return np.ascontiguousarray(pooled[:, None])

    def pixels(self, index: int) -> tuple[slice, slice]:
        """Where tile ``index`` lies in the image."""
        row, column = self.origins[index]
        scale = self.scale
        return (
            slice(row * scale, (row + self.tile_height) * scale),
            slice(column * scale, (column + self.tile_width) * scale),
        )

    def blend_latents_into(self, latents: torch.Tensor, indices: range, tiles: torch.Tensor) -> None:
        """Adds encoded tiles ``indices`` (``[n, C, th, tw]``), weighted by :meth:`latent_weights`
        (which sum to one at every latent pixel, as the pixel weights they average do), to
        ``latents`` ``[C, h, w]`` (zeros); complete once every tile was added."""
        weights = torch.from_numpy(self.latent_weights(indices)).to(tiles.device)
        for index, tile, weight in zip(indices, tiles, weights, strict=True):
            row, column = self.origins[index]
            latents[:, row : row + self.tile_height, column : column + self.tile_width] += tile * weight

    def empty_image(self, device: torch.device, channels: int = 3) -> torch.Tensor:
        scale = self.scale
        return torch.zeros(self.latent_height * scale, self.latent_width * scale, channels, device=device)

    def blend_into(self, image: torch.Tensor, indices: range, tiles: torch.Tensor) -> None:
        """Adds decoded tiles ``indices`` (``[n, th * scale, tw * scale, C]`` float pixels), weighted,
        to ``image`` (from :meth:`empty_image`); complete once every tile was added."""
        for index, tile in zip(indices, tiles, strict=True):
            weight = torch.from_numpy(self.pixel_weights[index]).to(tile.device)
            image[self.pixels(index)] += tile * weight[..., None]
