"""Previews of a denoising step that cost almost nothing: a linear map from the latent's channels to
RGB, in place of a VAE decode.

A preview is the step's predicted clean latent (x0, not the noisy latent: at early steps that one is
mostly noise) through ``rgb = latents · weights + bias`` per latent pixel, then ``(rgb + 1) / 2``
clamped, one preview pixel per latent pixel, resized to the size asked for. For SDXL's VAE the map
is the published one (ComfyUI's factors); for another VAE it is fitted once by least squares against
its own decodes (:meth:`LatentToRgb.fit`) and stored beside it (:data:`MAP_FILE` in the VAE's folder).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

MAP_FILE = "latent_rgb.json"
"""The fitted map, in the VAE's folder of a diffusers directory."""

SDXL_SCALING_FACTOR = 0.13025
"""SDXL's VAE (``scaling_factor`` in its config): the published factors are for its latents."""


@dataclasses.dataclass(frozen=True)
class LatentToRgb:
    weights: tuple[tuple[float, float, float], ...]
    """One row per latent channel: its contribution to R, G and B (in -1..1)."""
    bias: tuple[float, float, float]

    @classmethod
    def sdxl(cls) -> LatentToRgb:
        """ComfyUI's factors for SDXL's VAE, on the latents the UNet denoises (scaled)."""
        return cls(
            weights=(
                (0.3651, 0.4232, 0.4341),
                (-0.2533, -0.0042, 0.1068),
                (0.1076, 0.1111, -0.0362),
                (-0.3165, -0.2492, -0.2188),
            ),
            bias=(0.1084, -0.0175, -0.0011),
        )

    @classmethod
    def fit(cls, decode: Any, latents: torch.Tensor, scale: int) -> LatentToRgb:
        """Least squares of ``decode(latents)`` (``[N, 3, h * scale, w * scale]`` in -1..1, pooled
        to one pixel per latent pixel) on ``latents`` (``[N, C, h, w]``, as the UNet sees them)."""
        with torch.no_grad():
            pixels = F.avg_pool2d(decode(latents).double(), scale)
        channels = latents.shape[1]
        inputs = latents.double().permute(0, 2, 3, 1).reshape(-1, channels)
        inputs = torch.cat([inputs, torch.ones(len(inputs), 1, dtype=torch.float64)], dim=1)
        targets = pixels.permute(0, 2, 3, 1).reshape(-1, 3)
        solution = torch.linalg.lstsq(inputs, targets).solution
        return cls(
            weights=tuple(tuple(float(v) for v in row) for row in solution[:channels].tolist()),
            bias=tuple(float(v) for v in solution[channels].tolist()),
        )

    @classmethod
    def load(cls, folder: Path) -> LatentToRgb | None:
        """The map stored in ``folder``, if any."""
        path = Path(folder) / MAP_FILE
        if not path.is_file():
            return None
        values = json.loads(path.read_text())
        return cls(weights=tuple(map(tuple, values["weights"])), bias=tuple(values["bias"]))

    @classmethod
    def for_vae(cls, folder: Path, config: dict[str, Any]) -> LatentToRgb:
        """The map stored in ``folder``; SDXL's published one for SDXL's VAE; else an error saying
        how to fit one."""
        stored = cls.load(folder)
        if stored is not None:
            return stored
        if config.get("latent_channels") == 4 and config.get("scaling_factor") == SDXL_SCALING_FACTOR:
            return cls.sdxl()
        raise FileNotFoundError(
            f"no latent-to-RGB map for the VAE in {folder}: not SDXL's VAE and no {MAP_FILE}; fit one with "
            "LatentToRgb.fit and save it there"
        )

    def save(self, folder: Path) -> Path:
        path = Path(folder) / MAP_FILE
        path.write_text(json.dumps({"weights": self.weights, "bias": self.bias}, indent=2) + "\n")
        return path

    def rgb(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, h, w]`` -> ``[B, 3, h, w]`` float in 0..1."""
        weights = torch.tensor(self.weights, dtype=torch.float32, device=latents.device)
        bias = torch.tensor(self.bias, dtype=torch.float32, device=latents.device)
        mapped = torch.einsum("bchw,cr->brhw", latents.float(), weights) + bias[None, :, None, None]
        return ((mapped + 1) / 2).clamp(0, 1)

    def preview(self, latents: torch.Tensor, longer_side: int) -> np.ndarray:
        """``[B, C, h, w]`` -> uint8 ``[B, H, W, 3]`` whose longer side is ``longer_side`` (the
        aspect ratio kept, each side at least 1)."""
        return self.preview_pixels(latents, longer_side).cpu().numpy()

    def preview_pixels(self, latents: torch.Tensor, longer_side: int) -> torch.Tensor:
        """:meth:`preview` on the latents' device, without waiting for it (a GPU's copy to the host
        would stall the host until the step has run)."""
        height, width = latents.shape[-2:]
        ratio = longer_side / max(height, width)
        size = (max(1, round(height * ratio)), max(1, round(width * ratio)))
        resized = F.interpolate(
            self.rgb(latents), size=size, mode="bilinear", antialias=True, align_corners=False
        )
        return (resized * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
