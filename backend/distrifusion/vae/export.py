"""The two tile graphs of a tiled decode, exported beside the whole-latent ``vae_decoder`` graph,
and the same two of a tiled encode beside ``vae_encoder_whole``.

- :class:`TileStatisticsExport`: ``latents`` ``[T, C, th, tw]`` and ``weights`` ``[T, 1, th, tw]``
  -> ``statistics`` ``[T, layers, groups, 3]``: every GroupNorm's weighted sums (the record pass
  of :mod:`.shared_norms`).
- :class:`TileDecoderExport`: ``latents`` and ``statistics`` ``[T, layers, groups, 3]`` (one
  image's mean and variance and their share, repeated per tile) -> ``pixels`` float32
  ``[T, 8th, 8tw, 3]`` in 0..255, not yet rounded: tiles are blended before the image is quantised.

Both undo the latent scaling as the whole graph does (:class:`VaeDecoderExport`).

- :class:`TileEncoderStatisticsExport` and :class:`TileEncoderExport`: the same two passes over
  tiles of pixels ``[T, 3, 8th, 8tw]`` (weights at latent resolution), the second giving each
  tile's ``moments`` as :class:`VaeEncoderExport` does, blended by the stage.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..export.specs import VAE_ENCODER_TILE_STATISTICS, VAE_ENCODER_TILES, StageSpec, TensorSpec
from ..export.wrappers import ExportError, VaeDecoderExport, VaeEncoderExport
from .decode import TILE_ENGINE, TILE_STATISTICS_ENGINE
from .shared_norms import image_statistics, share_group_norms


class _SharedNorms(nn.Module):
    """A copy of a whole-image export (decoder or encoder) whose VAE ``part`` normalises as a
    :class:`~.shared_norms.NormPass` says."""

    def __init__(self, whole: nn.Module, part: str) -> None:
        super().__init__()
        self.whole = whole
        coder = getattr(whole.vae, part)
        groups = {m.num_groups for m in coder.modules() if isinstance(m, nn.GroupNorm)}
        if len(groups) != 1:
            raise ExportError(
                f"tiled coding needs one GroupNorm group count in the {part}, got {sorted(groups)}"
            )
        (self.groups,) = groups
        self.norm_pass, self.layers = share_group_norms(coder)
        self.latent_channels = whole.latent_channels
        self.scale_factor = whole.scale_factor

    def raw(self, inputs: torch.Tensor) -> torch.Tensor:
        """What the tiles are blended from."""
        raise NotImplementedError

    def record(self, inputs: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[T, layers, groups, 3]``: the record pass."""
        self.norm_pass.start(weights, None)
        self.raw(inputs)
        return torch.stack(self.norm_pass.recorded, dim=1)

    def apply(self, inputs: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        self.norm_pass.start(None, statistics)
        return self.raw(inputs)

    def example_weights(self, inputs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Blend weights at latent resolution for tiles ``inputs``."""
        height, width = self.latent_size(inputs)
        return rng.uniform(0.1, 1.0, (inputs.shape[0], 1, height, width)).astype(np.float32)

    def latent_size(self, inputs: np.ndarray) -> tuple[int, int]:
        return int(inputs.shape[-2]), int(inputs.shape[-1])

    def statistics_inputs(self, inputs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return {self.input_name: inputs, "weights": self.example_weights(inputs, np.random.default_rng(seed))}

    def tile_inputs(self, inputs: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """``inputs`` and the statistics their own record pass gives (plausible values)."""
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            sums = self.record(torch.from_numpy(inputs), torch.from_numpy(self.example_weights(inputs, rng)))
        statistics = image_statistics(sums, share=float(rng.uniform(0, 1)))
        return {
            self.input_name: inputs,
            "statistics": statistics[None].expand(inputs.shape[0], -1, -1, -1).numpy(),
        }


class _SharedNormDecoder(_SharedNorms):
    input_name = "latents"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(VaeDecoderExport(copy.deepcopy(vae)), "decoder")

    def raw(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.whole.vae.decode(self.whole.unscale(inputs), return_dict=False)[0]


class _SharedNormEncoder(_SharedNorms):
    input_name = "pixels"

    def __init__(self, vae: nn.Module) -> None:
        super().__init__(VaeEncoderExport(copy.deepcopy(vae)), "encoder")

    def raw(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.whole(inputs)

    def latent_size(self, inputs: np.ndarray) -> tuple[int, int]:
        return int(inputs.shape[-2]) // self.scale_factor, int(inputs.shape[-1]) // self.scale_factor


def tile_statistics_spec(latent_channels: int, layers: int, groups: int) -> StageSpec:
    return StageSpec(
        TILE_STATISTICS_ENGINE,
        inputs=(
            TensorSpec("latents", "float32", (latent_channels, -1, -1)),
            TensorSpec("weights", "float32", (1, -1, -1)),
        ),
        outputs=(TensorSpec("statistics", "float32", (layers, groups, 3)),),
    )


def tile_decoder_spec(latent_channels: int, layers: int, groups: int) -> StageSpec:
    return StageSpec(
        TILE_ENGINE,
        inputs=(
            TensorSpec("latents", "float32", (latent_channels, -1, -1)),
            TensorSpec("statistics", "float32", (layers, groups, 3)),
        ),
        outputs=(TensorSpec("pixels", "float32", (-1, -1, 3)),),
    )


class TileStatisticsExport(_SharedNormDecoder):
    def forward(self, latents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.record(latents, weights)

    def example_inputs(self, latents: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """Inputs of plausible values for ``latents`` (for the export and its check)."""
        return self.statistics_inputs(latents, seed)

    def spec(self) -> StageSpec:
        return tile_statistics_spec(self.latent_channels, self.layers, self.groups)


class TileDecoderExport(_SharedNormDecoder):
    def forward(self, latents: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        image = self.apply(latents, statistics)
        return ((image / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)

    def example_inputs(self, latents: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return self.tile_inputs(latents, seed)

    def spec(self) -> StageSpec:
        return tile_decoder_spec(self.latent_channels, self.layers, self.groups)


class TileEncoderStatisticsExport(_SharedNormEncoder):
    def forward(self, pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return self.record(pixels, weights)

    def example_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return self.statistics_inputs(pixels, seed)

    def spec(self) -> StageSpec:
        return StageSpec(
            VAE_ENCODER_TILE_STATISTICS,
            inputs=(
                TensorSpec("pixels", "float32", (3, -1, -1)),
                TensorSpec("weights", "float32", (1, -1, -1)),
            ),
            outputs=(TensorSpec("statistics", "float32", (self.layers, self.groups, 3)),),
        )


class TileEncoderExport(_SharedNormEncoder):
    """Tiles of pixels -> their ``moments``, not yet blended."""

    def forward(self, pixels: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        return self.apply(pixels, statistics)

    def example_inputs(self, pixels: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        return self.tile_inputs(pixels, seed)

    def spec(self) -> StageSpec:
        return StageSpec(
            VAE_ENCODER_TILES,
            inputs=(
                TensorSpec("pixels", "float32", (3, -1, -1)),
                TensorSpec("statistics", "float32", (self.layers, self.groups, 3)),
            ),
            outputs=(TensorSpec("moments", "float32", (2 * self.latent_channels, -1, -1)),),
        )
