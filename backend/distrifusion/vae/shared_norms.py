"""GroupNorm statistics shared by every tile of an image.

A tile normalised with its own GroupNorm statistics comes out brighter or darker than its
neighbours (diffusers' ``enable_tiling`` warns of these tile-sized changes). Here the decode of a
tiled image takes two passes over its tiles:

1. *record*: each tile runs the decoder with its own statistics and reports, for every GroupNorm,
   the weighted sums of its input and of its square over the pixels it stands for (the blend
   weights, so that overlaps count once);
2. *apply*: the sums of all the image's tiles give one mean and variance per layer and group, and
   every tile is decoded again normalising with a mix of those and its own: ``own + share x
   (image - own)``.

The first pass's statistics of deeper layers come from activations that were themselves
normalised per tile, so they only approximate the whole decode's: using them fully (share 1)
helps where tiles differ (a picture with structure) and costs where they do not (noise), a mix
does better on both (BENCHMARKS.md, "VAE tiling").
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional


class NormPass:
    """What the decoder's GroupNorms do in one forward pass; one object shared by all of them."""

    def __init__(self) -> None:
        self.weights: torch.Tensor | None = None
        """Record: ``[T, 1, h, w]`` blend weights at latent resolution."""
        self.given: torch.Tensor | None = None
        """Apply: ``[T, layers, groups, 3]``: the image's mean and variance, and how much of them to
        use (0: the tile's own statistics, 1: the image's)."""
        self.recorded: list[torch.Tensor] = []
        self.layer = 0

    def start(self, weights: torch.Tensor | None, given: torch.Tensor | None) -> None:
        self.weights, self.given, self.recorded, self.layer = weights, given, [], 0


class SharedStatisticsGroupNorm(nn.Module):
    """A GroupNorm that records or applies statistics as its :class:`NormPass` says."""

    def __init__(self, norm: nn.GroupNorm, norm_pass: NormPass) -> None:
        super().__init__()
        self.groups, self.eps = norm.num_groups, norm.eps
        self.weight, self.bias = norm.weight, norm.bias
        self.norm_pass = norm_pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.norm_pass
        grouped = x.reshape(x.shape[0], self.groups, -1)
        mean = grouped.mean(dim=-1, keepdim=True)
        variance = (grouped - mean).square().mean(dim=-1, keepdim=True)
        if state.given is not None:
            statistics = state.given[:, state.layer]
            share = statistics[..., 2:3]
            mean = mean + share * (statistics[..., 0:1] - mean)
            variance = variance + share * (statistics[..., 1:2] - variance)
        if state.weights is not None:
            state.recorded.append(self._weighted_sums(x, state.weights))
        state.layer += 1
        normed = ((grouped - mean) * torch.rsqrt(variance + self.eps)).reshape(x.shape)
        if self.weight is not None:
            shape = (-1,) + (1,) * (x.dim() - 2)
            normed = normed * self.weight.reshape(shape) + self.bias.reshape(shape)
        return normed

    def _weighted_sums(self, x: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """``[T, groups, 3]``: the weighted sum of ``x``, of ``x**2`` and the total weight, per group."""
        if x.dim() == 4:
            weight = functional.interpolate(weights, size=x.shape[-2:], mode="nearest")
        else:  # [T, C, h * w]: the mid block's attention, at latent resolution
            weight = weights.reshape(weights.shape[0], 1, -1)
        weighted = x * weight
        tiles = x.shape[0]
        sums = weighted.reshape(tiles, self.groups, -1).sum(dim=-1)
        squares = (weighted * x).reshape(tiles, self.groups, -1).sum(dim=-1)
        per_group = x.shape[1] // self.groups
        total = (weight.reshape(tiles, 1, -1).sum(dim=-1) * per_group).expand(tiles, self.groups)
        return torch.stack([sums, squares, total], dim=-1)


def share_group_norms(module: nn.Module) -> tuple[NormPass, int]:
    """Replaces every GroupNorm inside ``module`` (in place) by one of a shared :class:`NormPass`;
    returns it and how many layers it covers. Layers are numbered in the order a forward pass
    reaches them, the same in both passes."""
    norm_pass = NormPass()
    count = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.GroupNorm):
                setattr(parent, name, SharedStatisticsGroupNorm(child, norm_pass))
                count += 1
    return norm_pass, count


def image_statistics(sums: torch.Tensor, share: float) -> torch.Tensor:
    """``[T, layers, groups, 3]`` recorded sums of one image's tiles -> ``[layers, groups, 3]``:
    mean and variance over the whole image, and ``share``."""
    total = sums.sum(dim=0)
    mean = total[..., 0] / total[..., 2]
    variance = (total[..., 1] / total[..., 2] - mean.square()).clamp_min(0)
    return torch.stack([mean, variance, torch.full_like(mean, share)], dim=-1)
