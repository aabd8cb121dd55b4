"""The ``vae_encoder`` stage: one uint8 image -> the scaled latent posterior's ``moments`` (mean,
then standard deviation), whole or in tiles, at the size the request asks for.

An image of another size is first resized with Lanczos (what diffusers' ``VaeImageProcessor``
resizes with). It encodes whole where the stage's :class:`~.decode.DecodeSettings` would decode
that latent size whole, and otherwise in the decoder's tiles, with the image's GroupNorm
statistics (:mod:`.shared_norms`) and the blend weights of :mod:`.tiles` averaged to latent
pixels; beyond the budget even in tiles it is refused before any work (:class:`DecodeTooLarge`).
The posterior's sample is drawn by the UNet stage from the request's seed.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from PIL import Image

from ..export.specs import VAE_ENCODER, VAE_ENCODER_TILE_STATISTICS, VAE_ENCODER_TILES, VAE_ENCODER_WHOLE
from .decode import DecodeRecord, DecodeSettings, Engine, TiledEngines

ENCODER_ENGINE_OUTPUTS = {
    VAE_ENCODER_WHOLE: "moments",
    VAE_ENCODER_TILE_STATISTICS: "statistics",
    VAE_ENCODER_TILES: "moments",
}


def resized(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """``image`` (uint8 ``[h, w, 3]``) at ``height`` x ``width``: itself, or resized with Lanczos."""
    if image.shape[:2] == (height, width):
        return image
    return np.asarray(Image.fromarray(image).resize((width, height), Image.Resampling.LANCZOS))


class VaeEncoder(TiledEngines):
    def __init__(self, settings: DecodeSettings, run: Engine) -> None:
        super().__init__(settings, run, settings.footprint.encoder_norm_layers)

    def check(self, height: int, width: int) -> bool:
        """True to encode a ``height`` x ``width`` pixel image whole, False in tiles; raises
        :class:`~.decode.DecodeTooLarge` (naming this stage) when neither fits."""
        scale = self.settings.footprint.scale_factor
        return self.settings.check(height // scale, width // scale, stage=VAE_ENCODER)

    def encode(self, image: np.ndarray, height: int, width: int) -> tuple[torch.Tensor, DecodeRecord]:
        """uint8 ``[h, w, 3]`` -> ``moments`` ``[2C, height / 8, width / 8]`` float32, and how it ran."""
        started = time.perf_counter()
        whole = self.check(height, width)
        pixels = torch.tensor(resized(image, height, width), dtype=torch.float32).permute(2, 0, 1)
        scale = self.settings.footprint.scale_factor
        latent_height, latent_width = height // scale, width // scale
        if whole:
            moments = self._run(VAE_ENCODER_WHOLE, {"pixels": pixels[None].contiguous()}, pixels.device)[0]
            return moments, DecodeRecord(latent_height, latent_width, 0, 1, time.perf_counter() - started)
        plan = self.settings.plan(latent_height, latent_width)
        chunks = self.chunks(plan)

        def tiles(chunk: range) -> torch.Tensor:
            return plan.crop(pixels, chunk, scale).contiguous()

        statistics = self.shared_statistics(VAE_ENCODER_TILE_STATISTICS, "pixels", tiles, plan)
        moments = None
        for chunk in chunks:
            inputs = {"pixels": tiles(chunk)}
            inputs["statistics"] = self.statistics_for(statistics, inputs["pixels"])
            encoded = self._run(VAE_ENCODER_TILES, inputs, pixels.device)
            if moments is None:
                moments = encoded.new_zeros(encoded.shape[1], latent_height, latent_width)
            plan.blend_latents_into(moments, chunk, encoded)
        assert moments is not None
        calls = len(chunks) * (2 if statistics is not None else 1)
        return moments, DecodeRecord(
            latent_height, latent_width, len(plan), calls, time.perf_counter() - started
        )
