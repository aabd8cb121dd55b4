"""GroupNorm over one band with statistics of the whole image.

Each band reduces its own rows to (count, mean, biased variance) per (batch, group) in fp32; the
bands' moments are merged with the parallel-variance formula (no E[x^2] - E[x]^2 cancellation), so
the synchronous result equals ``nn.GroupNorm``. Merging and the asynchronous corrections run in
fp64 on these tiny tensors. Any estimate whose variance would be negative falls back to the band's
own exact statistics.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import Mode
from ..context import PatchContext

Moments = tuple[torch.Tensor, torch.Tensor]  # (mean, biased variance), each [batch, groups]


def local_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[3, batch, groups]`` fp32: element count, mean and biased variance of each group."""
    grouped = x.reshape(x.shape[0], groups, -1).float()
    # Two passes (mean, then the norm of the deviations) keep the variance exact and non-negative;
    # torch.var_mean does the same arithmetic but is ~20x slower on the CPU (measured).
    count = grouped.shape[-1]
    mean = grouped.mean(-1)
    variance = torch.linalg.vector_norm(grouped - mean[..., None], dim=-1).square() / count
    return torch.stack([torch.full_like(mean, count), mean, variance])


def merge_moments(moments: torch.Tensor) -> Moments:
    """Merges ``[bands, 3, batch, groups]`` moments into the whole image's (fp64)."""
    count, mean, variance = moments.double().unbind(1)
    total = count.sum(0)
    merged_mean = (count * mean).sum(0) / total
    merged_variance = (count * (variance + (mean - merged_mean) ** 2)).sum(0) / total
    return merged_mean, merged_variance


def corrected_moments(stale: torch.Tensor, fresh: torch.Tensor, band: int) -> Moments:
    """DistriFusion Eq. 2: last step's global moments plus this band's change since last step.

    Applied to E[x] and E[x^2]; it assumes every band drifts like this one between adjacent steps.
    """
    stale_mean, stale_variance = merge_moments(stale)
    _, own_mean, own_variance = stale[band].double()
    _, mean, variance = fresh.double()
    corrected_mean = stale_mean + (mean - own_mean)
    corrected_square = stale_variance + stale_mean**2 + (variance + mean**2) - (own_variance + own_mean**2)
    return corrected_mean, corrected_square - corrected_mean**2


class PatchGroupNorm(nn.Module):
    """Wraps an ``nn.GroupNorm`` whose input is one band of a ``[batch, channels, *spatial]`` map."""

    def __init__(self, norm: nn.GroupNorm, context: PatchContext, key: str):
        super().__init__()
        self.norm = norm
        self.context = context
        self.key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if not ctx.parallel:
            return self.norm(x)
        groups = self.norm.num_groups
        fresh = local_moments(x, groups)
        mode = ctx.mode
        if mode in (Mode.NAIVE_PATCH, Mode.SEPARATE_GN):
            mean, variance = fresh[1], fresh[2]
        elif mode is Mode.CORRECTED_ASYNC_GN and not ctx.synchronous:
            mean, variance = ctx.exchanged(
                self.key, fresh, lambda stale: corrected_moments(stale, fresh, ctx.band)
            )
        else:
            mean, variance = ctx.exchanged(
                self.key,
                fresh,
                lambda gathered: merge_moments(self._own_fresh(gathered, fresh)),
                always_fresh=mode in (Mode.FULL_SYNC, Mode.SYNC_GN),
            )
        usable = variance >= 0
        mean = torch.where(usable, mean, fresh[1].to(mean.dtype))
        variance = torch.where(usable, variance, fresh[2].to(variance.dtype))
        return self._normalize(x, mean.float(), variance.float())

    def _own_fresh(self, gathered: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
        # stale_gn reads the other bands' previous moments but always its own current ones.
        merged = gathered.clone()
        merged[self.context.band] = fresh
        return merged

    def _normalize(self, x: torch.Tensor, mean: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
        # Folded into one per-channel scale and shift so the big tensor is read and written once.
        batch, groups = mean.shape
        channels_per_group = x.shape[1] // groups
        scale = torch.rsqrt(variance + self.norm.eps).repeat_interleave(channels_per_group, dim=1)
        shift = -mean.repeat_interleave(channels_per_group, dim=1) * scale
        if self.norm.affine:
            weight = self.norm.weight.float()
            scale = scale * weight
            shift = shift * weight + self.norm.bias.float()
        shape = (batch, -1) + (1,) * (x.dim() - 2)
        return torch.addcmul(shift.view(shape), x.float(), scale.view(shape)).to(x.dtype)
