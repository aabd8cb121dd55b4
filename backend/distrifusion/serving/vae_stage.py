"""The ``vae_decoder`` stage the ensemble calls: a request's latents ``[B, C, h, w]`` -> uint8
images ``[B, 8h, 8w, 3]``, each image whole or in tiles (:mod:`distrifusion.vae.decode`), through
the engine models it calls (BLS in its model.py); and what it reports to Prometheus."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..vae.decode import DecodeRecord, DecodeSettings, Engine, VaeDecoder
from .metrics import MetricSpec, Observation

PATHS = ("whole", "tiled")
METRICS = (
    MetricSpec(
        "distrifusion_vae_decodes_total", "Images the VAE stage decoded, by path (whole, tiled)", "counter"
    ),
    MetricSpec(
        "distrifusion_vae_decode_seconds",
        "Wall time of one image's decode, by path",
        "histogram",
        (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
    ),
)


class VaeStage:
    def __init__(self, settings: DecodeSettings, run: Engine) -> None:
        self.decoder = VaeDecoder(settings, run)

    @classmethod
    def load(cls, version_folder: Path, run: Engine) -> VaeStage:
        return cls(DecodeSettings.load(version_folder), run)

    def decode(self, latents: np.ndarray) -> tuple[np.ndarray, list[DecodeRecord]]:
        """Raises :class:`DecodeTooLarge` (before any work) for a size beyond the stage's budget."""
        self.decoder.settings.check(*latents.shape[-2:])
        images, records = [], []
        for image_latents in torch.from_numpy(np.ascontiguousarray(latents, dtype=np.float32)):
            image, record = self.decoder.decode(image_latents)
            images.append(image.cpu().numpy())
            records.append(record)
        return np.stack(images), records


def initial_observations() -> list[Observation]:
    return [Observation("distrifusion_vae_decodes_total", 0, (("path", path),)) for path in PATHS]


def observations(records: Iterable[DecodeRecord]) -> list[Observation]:
    added = []
    for record in records:
        path = (("path", record.path),)
        added.append(Observation("distrifusion_vae_decodes_total", 1, path))
        added.append(Observation("distrifusion_vae_decode_seconds", record.seconds, path))
    return added


def log_line(record: DecodeRecord, scale: int) -> str | None:
    """One line for a tiled decode (the whole ones are the ordinary case)."""
    if not record.tiles:
        return None
    return (
        f"vae_decoder: {record.width * scale}x{record.height * scale} decoded in {record.tiles} tiles, "
        f"{record.engine_calls} engine calls, {record.seconds:.1f} s"
    )
