"""The VAE stages: ``vae_decoder`` (the ensemble's last step) turns a request's latents
``[B, C, h, w]`` into uint8 images ``[B, 8h, 8w, 3]``; ``vae_encoder`` (called by the UNet stage
for image-to-image requests) turns uint8 images ``[B, h, w, 3]`` into the scaled posterior's
``moments`` ``[B, 2C, H/8, W/8]`` at the size asked for. Each image runs whole or in tiles
(:mod:`distrifusion.vae.decode`, :mod:`distrifusion.vae.encode`) through the engine models its
model.py calls through BLS; both stages share one :class:`~distrifusion.vae.decode.DecodeSettings`
(the build writes it to both version folders) and report to Prometheus."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

from ..vae.decode import DecodeRecord, DecodeSettings, Engine, VaeDecoder
from ..vae.encode import VaeEncoder
from .metrics import MetricSpec, Observation

PATHS = ("whole", "tiled")
SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


METRICS = (
    MetricSpec(
        "distrifusion_vae_decodes_total", "Images the VAE stage decoded, by path (whole, tiled)", "counter"
    ),
    MetricSpec(
        "distrifusion_vae_decode_seconds",
        "Wall time of one image's decode, by path",
        "histogram",
        SECONDS_BUCKETS,
    ),
)
ENCODER_METRICS = (
    MetricSpec(
        "distrifusion_vae_encodes_total",
        "Images the VAE encoder stage encoded, by path (whole, tiled)",
        "counter",
    ),
    MetricSpec(
        "distrifusion_vae_encode_seconds",
        "Wall time of one image's encode, by path",
        "histogram",
        SECONDS_BUCKETS,
    ),
)
"""Each stage's (count, seconds) metrics."""


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


class VaeEncoderStage:
    def __init__(self, settings: DecodeSettings, run: Engine) -> None:
        self.encoder = VaeEncoder(settings, run)

    @classmethod
    def load(cls, version_folder: Path, run: Engine) -> VaeEncoderStage:
        return cls(DecodeSettings.load(version_folder), run)

    def encode(self, images: np.ndarray, height: int, width: int) -> tuple[np.ndarray, list[DecodeRecord]]:
        """Raises :class:`DecodeTooLarge` (before any work) for a size beyond the stage's budget."""
        self.encoder.check(height, width)
        moments, records = [], []
        for image in np.asarray(images, dtype=np.uint8):
            encoded, record = self.encoder.encode(image, height, width)
            moments.append(encoded.cpu().numpy())
            records.append(record)
        return np.stack(moments), records


def initial_observations(metrics: tuple[MetricSpec, ...] = METRICS) -> list[Observation]:
    return [Observation(metrics[0].name, 0, (("path", path),)) for path in PATHS]


def observations(
    records: Iterable[DecodeRecord], metrics: tuple[MetricSpec, ...] = METRICS
) -> list[Observation]:
    count, seconds = metrics
    added = []
    for record in records:
        path = (("path", record.path),)
        added.append(Observation(count.name, 1, path))
        added.append(Observation(seconds.name, record.seconds, path))
    return added


def log_line(record: DecodeRecord, scale: int, verb: str = "decode") -> str | None:
    """One line for a tiled decode or encode (the whole ones are the ordinary case)."""
    if not record.tiles:
        return None
    stage = "vae_decoder" if verb == "decode" else "vae_encoder"
    return (
        f"{stage}: {record.width * scale}x{record.height * scale} {verb}d in {record.tiles} tiles, "
        f"{record.engine_calls} engine calls, {record.seconds:.1f} s"
    )
