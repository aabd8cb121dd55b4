"""GroupNorm over one band with statistics of the whole image.

Each band reduces its own rows to (count, mean, biased variance) per (batch, group) in fp32; the
bands' moments are merged with the parallel-variance formula (no E[x^2] - E[x]^2 cancellation), so
the synchronous result equals ``nn.GroupNorm``. Merging and the asynchronous corrections run in
fp64 on these tiny tensors. Any estimate whose variance would be negative falls back to the band's
own exact statistics. The normalisation itself is one ``batch_norm`` over ``[1, batch * channels, n]``
with each channel's group statistics: one fused read and write of the band, in the input's dtype.

The arithmetic on the moments is written as few whole-tensor operations: it runs once per GroupNorm
layer per step (about 90 layers in SDXL), so every extra operation is ~90 more small GPU kernels a
step, a fixed cost that CUDA graphs do not remove (halving them saved ~1.3 ms a step on an H200).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Mode
from ..context import ExchangingLayer, PatchContext


def moment_parts(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Three ``[batch, groups]`` fp32 tensors: element count, mean and biased variance of each group."""
    grouped = x.reshape(x.shape[0], groups, -1)
    count = grouped.shape[-1]
    if torch.compiler.is_compiling():
        # Inductor lowers var_mean to one Welford pass (count, mean, M2) over the band, the cast to
        # fp32 fused into it.
        variance, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)
    else:
        # Two passes (mean, then the norm of the deviations) keep the variance exact and
        # non-negative; eager torch.var_mean does the same arithmetic but is ~20x slower on the CPU.
        mean = grouped.mean(-1, dtype=torch.float32)
        variance = torch.linalg.vector_norm(grouped - mean[..., None], dim=-1).square_().div_(count)
    return torch.full_like(mean, count), mean, variance


def local_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[3, batch, groups]`` fp32: :func:`moment_parts` stacked."""
    return torch.stack(moment_parts(x, groups))


def merge_moments(moments: torch.Tensor) -> torch.Tensor:
    """Merges ``[bands, 3, batch, groups]`` moments into the whole image's ``[2, batch, groups]``
    (mean, biased variance) in fp64."""
    count, mean, variance = moments.double().unbind(1)
    weight = count / count.sum(0)
    merged_mean = (weight * mean).sum(0)
    merged_variance = (weight * (variance + (mean - merged_mean).square())).sum(0)
    return torch.stack([merged_mean, merged_variance])


def _raw_moments(moments: torch.Tensor) -> torch.Tensor:
    """``[..., 3, b, g]`` (count, mean, variance) -> ``[..., 2, b, g]`` fp64 (E[x], E[x^2])."""
    raw = moments[..., 1:, :, :].to(torch.float64, copy=True)  # written in place below
    raw[..., 1, :, :].addcmul_(raw[..., 0, :, :], raw[..., 0, :, :])
    return raw


def corrected_moments(stale: torch.Tensor, fresh: torch.Tensor, band: int) -> torch.Tensor:
    """DistriFusion Eq. 2: last step's global moments plus this band's change since last step.

    Applied to E[x] and E[x^2]; it assumes every band drifts like this one between adjacent steps.
    Returns ``[2, batch, groups]`` (mean, variance) in fp64; the variance may come out negative.
    """
    count = stale[:, 0].double()
    weight = (count / count.sum(0)).unsqueeze(1)
    stale_raw = _raw_moments(stale)
    corrected = (weight * stale_raw).sum(0).add_(_raw_moments(fresh)).sub_(stale_raw[band])
    corrected[1].addcmul_(corrected[0], corrected[0], value=-1)
    return corrected


class PatchGroupNorm(nn.Module, ExchangingLayer):
    """Wraps an ``nn.GroupNorm`` whose input is one band of a ``[batch, channels, *spatial]`` map."""

    def __init__(self, norm: nn.GroupNorm, context: PatchContext, key: str):
        nn.Module.__init__(self)
        self.norm = norm
        ExchangingLayer.__init__(self, context, key)
        self._tiled_affine: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}

    @property
    def always_fresh(self) -> bool:
        return self.context.mode in (Mode.FULL_SYNC, Mode.SYNC_GN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if not ctx.parallel:
            return self.norm(x)
        parts = moment_parts(x, self.norm.num_groups)
        if ctx.mode in (Mode.NAIVE_PATCH, Mode.SEPARATE_GN):
            return self._normalize(x, torch.stack(parts[1:]))
        return self._normalize(x, self.exchanged(parts))

    def combine(
        self, gathered: torch.Tensor, fresh: torch.Tensor, own: torch.Tensor | None, stale: bool
    ) -> torch.Tensor:
        """The whole image's ``[2, batch, groups]`` (mean, variance) from every band's moments."""
        if stale and self.context.mode is Mode.CORRECTED_ASYNC_GN:
            corrected = corrected_moments(gathered, fresh, self.context.band)
            # Only the correction can estimate a negative variance; merged ones are exact.
            return torch.where(corrected[1] >= 0, corrected, fresh[1:])
        # stale_gn reads the other bands' previous moments but always its own current ones.
        merged = gathered.clone()
        merged[self.context.band] = fresh
        return merge_moments(merged)

    def _per_sample_affine(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The affine weight and bias in fp32, tiled once per sample (``[batch * channels]``)."""
        weight, bias = self.norm.weight, self.norm.bias
        if torch.compiler.is_compiling():  # inductor folds the tiling into the kernel's indexing
            return weight.float().repeat(batch), bias.float().repeat(batch)
        # Cached per batch size: two kernels fewer per layer and step. Keyed by the parameters'
        # storage and version counters: moving, loading or editing the weights re-tiles them.
        key = (batch, weight.data_ptr(), weight._version, bias.data_ptr(), bias._version)
        cached = self._tiled_affine.get(batch)
        if cached is None or cached[0] != key:
            cached = self._tiled_affine[batch] = (
                key,
                weight.float().repeat(batch),
                bias.float().repeat(batch),
            )
        return cached[1], cached[2]

    def _normalize(self, x: torch.Tensor, moments: torch.Tensor) -> torch.Tensor:
        """``x`` normalised with ``moments`` ``[2, batch, groups]`` (mean, variance) and the affine map.

        Every (sample, channel) pair is a batch_norm channel whose running statistics are its group's
        moments, so the whole normalisation is one fused kernel.
        """
        batch, groups = moments.shape[1:]
        channels = self.norm.num_channels
        mean, variance = moments.float().repeat_interleave(channels // groups, dim=2).view(2, -1)
        weight, bias = self._per_sample_affine(batch) if self.norm.affine else (None, None)
        normalized = F.batch_norm(
            x.reshape(1, batch * channels, -1),
            mean,
            variance,
            weight,
            bias,
            training=False,
            eps=self.norm.eps,
        )
        return normalized.view_as(x)
