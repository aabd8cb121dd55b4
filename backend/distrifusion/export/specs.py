"""Tensor contract of the exported stages: names, data types and per-request dims.

Dims exclude the batch dimension (every stage is batched on dim 0); -1 is dynamic. The model
repository generator writes its Triton configs from these, so the ONNX graphs, the TensorRT
engines and the configs cannot disagree on a name.
"""

from __future__ import annotations

import dataclasses

import numpy as np

TEXT_ENCODER = "text_encoder"
TEXT_ENCODER_2 = "text_encoder_2"
VAE_DECODER = "vae_decoder"
"""The ensemble's VAE stage (a Python model on both targets) that calls the three VAE engines."""
VAE_WHOLE = "vae_decoder_whole"
VAE_TILE_STATISTICS = "vae_decoder_tile_statistics"
VAE_TILES = "vae_decoder_tiles"
VAE_ENGINES = (VAE_WHOLE, VAE_TILE_STATISTICS, VAE_TILES)
VAE_ENCODER = "vae_encoder"
"""The image-to-image requests' VAE stage (a Python model the UNet stage calls through BLS) that
calls the three encoder engines."""
VAE_ENCODER_WHOLE = "vae_encoder_whole"
VAE_ENCODER_TILE_STATISTICS = "vae_encoder_tile_statistics"
VAE_ENCODER_TILES = "vae_encoder_tiles"
VAE_ENCODER_ENGINES = (VAE_ENCODER_WHOLE, VAE_ENCODER_TILE_STATISTICS, VAE_ENCODER_TILES)
ONNX_STAGES = (TEXT_ENCODER, TEXT_ENCODER_2, *VAE_ENGINES, *VAE_ENCODER_ENGINES)


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str
    """numpy name: ``int32``, ``int64``, ``float32``, ``uint8``, ``bool`` or ``bytes`` (Triton BYTES)."""
    dims: tuple[int, ...]
    """Per request, without the batch dimension; -1 is dynamic."""

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)


@dataclasses.dataclass(frozen=True)
class StageSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def tensor(self, name: str) -> TensorSpec:
        for spec in (*self.inputs, *self.outputs):
            if spec.name == name:
                return spec
        raise KeyError(f"{self.name} has no tensor {name!r}")


def text_encoder_spec(max_length: int, hidden_size: int) -> StageSpec:
    """``text_encoder``: ids -> penultimate hidden states (CLIP ViT-L: 768)."""
    return StageSpec(
        TEXT_ENCODER,
        inputs=(TensorSpec("input_ids", "int32", (max_length,)),),
        outputs=(TensorSpec("hidden_states", "float32", (max_length, hidden_size)),),
    )


def text_encoder_2_spec(max_length: int, hidden_size: int, projection_dim: int) -> StageSpec:
    """``text_encoder_2``: ids -> penultimate hidden states (OpenCLIP bigG: 1280) and pooled projection."""
    return StageSpec(
        TEXT_ENCODER_2,
        inputs=(TensorSpec("input_ids", "int32", (max_length,)),),
        outputs=(
            TensorSpec("hidden_states", "float32", (max_length, hidden_size)),
            TensorSpec("text_embeds", "float32", (projection_dim,)),
        ),
    )


def vae_decoder_spec(latent_channels: int, name: str = VAE_DECODER) -> StageSpec:
    """``vae_decoder`` (and ``vae_decoder_whole``): raw final latents ``[C, h, w]`` -> uint8 image
    ``[8h, 8w, 3]`` (NHWC)."""
    return StageSpec(
        name,
        inputs=(TensorSpec("latents", "float32", (latent_channels, -1, -1)),),
        outputs=(TensorSpec("image", "uint8", (-1, -1, 3)),),
    )


def vae_encoder_spec(latent_channels: int, name: str = VAE_ENCODER_WHOLE) -> StageSpec:
    """``vae_encoder_whole``: float32 pixels ``[3, H, W]`` in 0..255 -> ``moments`` ``[2C, H/8, W/8]``:
    the scaled latent posterior's mean (channels ``:C``) and standard deviation (``C:``)."""
    return StageSpec(
        name,
        inputs=(TensorSpec("pixels", "float32", (3, -1, -1)),),
        outputs=(TensorSpec("moments", "float32", (2 * latent_channels, -1, -1)),),
    )


def vae_encoder_stage_spec(latent_channels: int) -> StageSpec:
    """``vae_encoder`` (the Python stage): a uint8 image ``[h, w, 3]`` of any size, resized to
    ``height`` x ``width`` and encoded: ``moments`` as :func:`vae_encoder_spec`."""
    return StageSpec(
        VAE_ENCODER,
        inputs=(
            TensorSpec("image", "uint8", (-1, -1, 3)),
            TensorSpec("height", "int32", (1,)),
            TensorSpec("width", "int32", (1,)),
        ),
        outputs=(TensorSpec("moments", "float32", (2 * latent_channels, -1, -1)),),
    )
