"""The VAE's latent space as the UNet stage knows it: its config, not its weights.

The served VAE runs in its own stages (``vae_encoder``, ``vae_decoder``); the UNet stage's ranks
load no VAE. diffusers' image-to-image pipeline still reads ``vae.config`` (the latent statistics
and the scale factor) even when it is handed latents, and a pipeline's device is its first
module's, so :class:`LatentSpace` is a module with the VAE's config and no weights that moves with
the pipeline. :class:`LatentPosterior` is what the encoder stage hands the UNet stage.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.utils.torch_utils import randn_tensor

VAE_CONFIG = Path("vae") / "config.json"
"""Where the UNet stage's model folder keeps the VAE's config (the build copies it)."""


class LatentSpace(ModelMixin, ConfigMixin):
    """Stands in for the VAE in the UNet stage's pipelines: ``config`` only (decoding raises)."""

    def __init__(self, **vae_config: object) -> None:
        super().__init__()
        self.register_to_config(**vae_config)
        self.register_buffer("anchor", torch.empty(0), persistent=False)  # the pipeline's device

    @classmethod
    def load(cls, model_directory: str | Path) -> LatentSpace | None:
        path = Path(model_directory) / VAE_CONFIG
        if not path.is_file():
            return None
        config = {
            key: value for key, value in json.loads(path.read_text()).items() if not key.startswith("_")
        }
        return cls(**config)

    def decode(self, *args: object, **kwargs: object) -> object:
        raise RuntimeError("the UNet stage has no VAE weights: it returns latents (output_type='latent')")


@dataclasses.dataclass(frozen=True)
class LatentPosterior:
    """Each image's VAE posterior in the UNet's latent scale, from the ``vae_encoder`` stage:
    ``moments`` ``[B, 2C, h, w]``, the mean then the standard deviation."""

    moments: torch.Tensor

    def sample(self, generator: torch.Generator | list[torch.Generator]) -> torch.Tensor:
        """``mean + std * noise`` with the noise drawn as diffusers' posterior draws it (before the
        pipeline's own noise, from the same generators): the image-to-image result is diffusers'."""
        mean, std = self.moments.chunk(2, dim=1)
        noise = randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + std * noise
