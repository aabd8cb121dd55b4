"""The two tile graphs of a tiled decode, exported beside the whole-latent ``vae_decoder`` graph.

- :class:`TileStatisticsExport`: ``latents`` ``[T, C, th, tw]`` and ``weights`` ``[T, 1, th, tw]``
  -> ``statistics`` ``[T, layers, groups, 3]``: every GroupNorm's weighted sums (the record pass
  of :mod:`.shared_norms`).
- :class:`TileDecoderExport`: ``latents`` and ``statistics`` ``[T, layers, groups, 3]`` (one
  image's mean and variance and their share, repeated per tile) -> ``pixels`` float32
  ``[T, 8th, 8tw, 3]`` in 0..255, not yet rounded: tiles are blended before the image is quantised.

Both undo the latent scaling as the whole graph does (:class:`VaeDecoderExport`).
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from ..export.specs import StageSpec, TensorSpec
from ..export.wrappers import ExportError, VaeDecoderExport
from .decode import TILE_ENGINE, TILE_STATISTICS_ENGINE
from .shared_norms import image_statistics, share_group_norms


class _SharedNormDecoder(nn.Module):
    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.decoder = VaeDecoderExport(copy.deepcopy(vae))
        self.norm_pass, self.layers = share_group_norms(self.decoder.vae.decoder)
        groups = {m.num_groups for m in vae.decoder.modules() if isinstance(m, nn.GroupNorm)}
        if len(groups) != 1:
            raise ExportError(
                f"tiled decoding needs one GroupNorm group count in the decoder, got {sorted(groups)}"
            )
        (self.groups,) = groups
        self.latent_channels = self.decoder.latent_channels
        self.scale_factor = self.decoder.scale_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.decoder.vae.decode(self.decoder.unscale(latents), return_dict=False)[0]

    def record(self, latents: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[T, layers, groups, 3]``: the record pass."""
        self.norm_pass.start(weights, None)
        self.decode(latents)
        return torch.stack(self.norm_pass.recorded, dim=1)

    @staticmethod
    def example_weights(latents: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(0.1, 1.0, (latents.shape[0], 1, *latents.shape[2:])).astype(np.float32)


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
        return {"latents": latents, "weights": self.example_weights(latents, np.random.default_rng(seed))}

    def spec(self) -> StageSpec:
        return tile_statistics_spec(self.latent_channels, self.layers, self.groups)


class TileDecoderExport(_SharedNormDecoder):
    def forward(self, latents: torch.Tensor, statistics: torch.Tensor) -> torch.Tensor:
        self.norm_pass.start(None, statistics)
        image = self.decode(latents)
        return ((image / 2 + 0.5).clamp(0, 1) * 255).permute(0, 2, 3, 1)

    def example_inputs(self, latents: np.ndarray, seed: int) -> dict[str, np.ndarray]:
        """Inputs of plausible values for ``latents``: the statistics its own record pass gives."""
        rng = np.random.default_rng(seed)
        with torch.no_grad():
            sums = self.record(
                torch.from_numpy(latents), torch.from_numpy(self.example_weights(latents, rng))
            )
        statistics = image_statistics(sums, share=float(rng.uniform(0, 1)))
        return {
            "latents": latents,
            "statistics": statistics[None].expand(latents.shape[0], -1, -1, -1).numpy(),
        }

    def spec(self) -> StageSpec:
        return tile_decoder_spec(self.latent_channels, self.layers, self.groups)
