"""The torch modules that are exported to ONNX: exactly what each served stage computes.

- :class:`TextEncoderExport`: ``input_ids`` int32 ``[B, 77]`` -> ``hidden_states`` ``[B, 77, D]``,
  the penultimate layer (``hidden_states[-2]``, what SDXL conditions on), and, for the second
  encoder (with projection), ``text_embeds`` ``[B, P]``, the projected pooled output.
- :class:`VaeDecoderExport`: raw final latents ``[B, 4, h, w]`` -> ``image`` uint8
  ``[B, 8h, 8w, 3]``. The graph itself undoes the latent scaling (and the per-channel latent
  mean/std when the VAE config has them, as diffusers' SDXL pipeline does), decodes, and applies
  diffusers' post-processing: ``(x / 2 + 0.5).clamp(0, 1) * 255``, NHWC, rounded, as uint8. The
  cast to uint8 is the graph's last node: TensorRT's ONNX parser takes UINT8 tensors only as
  network inputs and outputs (``build_engines/tensorrt_parser_rules.json``).
- :class:`VaeEncoderExport`: float pixels ``[B, 3, H, W]`` -> the scaled latent posterior's
  ``moments`` ``[B, 2C, H/8, W/8]`` (mean, then standard deviation).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ExportError(RuntimeError):
    """A model cannot be exported as asked (wrong class, missing config value, failed check)."""


class TextEncoderExport(nn.Module):
    """A CLIP text encoder returning its penultimate hidden state (and projected pooled output)."""

    def __init__(self, encoder: nn.Module, with_projection: bool):
        super().__init__()
        if with_projection and not hasattr(encoder, "text_projection"):
            raise ExportError(
                f"{type(encoder).__name__} has no text projection: SDXL's text_encoder_2 is a "
                "CLIPTextModelWithProjection"
            )
        num_layers = int(encoder.config.num_hidden_layers)
        if num_layers < 2:
            raise ExportError("the penultimate hidden state needs a text encoder with at least 2 layers")
        self.encoder = encoder
        self.with_projection = with_projection

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def projection_dim(self) -> int:
        return int(self.encoder.config.projection_dim)

    @property
    def max_length(self) -> int:
        return int(self.encoder.config.max_position_embeddings)

    def output_names(self) -> tuple[str, ...]:
        return ("hidden_states", "text_embeds") if self.with_projection else ("hidden_states",)

    def forward(self, input_ids: torch.Tensor) -> Any:
        # Triton sends INT32 ids (TensorRT prefers them); the embedding lookup takes int64.
        out = self.encoder(input_ids.to(torch.int64), output_hidden_states=True, return_dict=True)
        hidden_states = out.hidden_states[-2]
        if self.with_projection:
            return hidden_states, out.text_embeds
        return hidden_states


def latent_statistics(vae_config: Any) -> tuple[list[float], list[float]] | None:
    """``(latents_mean, latents_std)`` when the VAE config has both (diffusers then uses them)."""
    mean = getattr(vae_config, "latents_mean", None)
    std = getattr(vae_config, "latents_std", None)
    if mean is None or std is None:
        return None
    return [float(v) for v in mean], [float(v) for v in std]


class _ScaledLatentsVae(nn.Module):
    """A VAE with the latent scaling of diffusers' SDXL pipelines (``scaling_factor``, and the
    per-channel ``latents_mean``/``latents_std`` when its config has them)."""

    def __init__(self, vae: nn.Module):
        super().__init__()
        config = vae.config
        scaling = getattr(config, "scaling_factor", None)
        if scaling is None or not float(scaling) > 0:
            raise ExportError(f"the VAE config has no positive scaling_factor (got {scaling!r})")
        self.vae = vae
        self.scaling_factor = float(scaling)
        self.latent_channels = int(config.latent_channels)
        self.scale_factor = 2 ** (len(config.block_out_channels) - 1)
        stats = latent_statistics(config)
        self.has_latent_statistics = stats is not None
        if stats is not None:
            mean, std = stats
            if len(mean) != self.latent_channels or len(std) != self.latent_channels:
                raise ExportError(
                    f"latents_mean/latents_std have {len(mean)}/{len(std)} values for "
                    f"{self.latent_channels} latent channels"
                )
            shape = (1, self.latent_channels, 1, 1)
            self.register_buffer("latents_mean", torch.tensor(mean).view(shape), persistent=False)
            self.register_buffer("latents_std", torch.tensor(std).view(shape), persistent=False)

    def unscale(self, latents: torch.Tensor) -> torch.Tensor:
        """What the SDXL pipeline does to the final latents before ``vae.decode``."""
        if self.has_latent_statistics:
            return latents * self.latents_std / self.scaling_factor + self.latents_mean
        return latents / self.scaling_factor

    def scale(self, mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The posterior's mean and standard deviation in the UNet's latent scale: what diffusers'
        SDXL image-to-image pipeline does to a sample of it, applied to both (it is affine)."""
        if self.has_latent_statistics:
            factor = self.scaling_factor / self.latents_std
            return (mean - self.latents_mean) * factor, std * factor
        return mean * self.scaling_factor, std * self.scaling_factor


class VaeDecoderExport(_ScaledLatentsVae):
    """Raw latents -> uint8 NHWC image, with diffusers' un-scaling and post-processing inside."""

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        image = self.vae.decode(self.unscale(latents), return_dict=False)[0]
        image = ((image / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)
        return image.round().to(torch.uint8)


class VaeEncoderExport(_ScaledLatentsVae):
    """Float pixels ``[B, 3, H, W]`` in 0..255 -> ``moments`` ``[B, 2C, H/8, W/8]``: the scaled
    posterior's mean and standard deviation. diffusers' preprocessing (to -1..1) is inside; the
    sample (mean + std x noise) is drawn by the UNet stage from the request's seed, where diffusers'
    image-to-image pipeline draws it, so that its result is diffusers' own."""

    def encode(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        posterior = self.vae.encode(pixels / 127.5 - 1, return_dict=False)[0]
        return posterior.mean, posterior.std

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.scale(*self.encode(pixels)), dim=1)
