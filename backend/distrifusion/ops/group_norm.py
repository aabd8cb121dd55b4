"""GroupNorm over one band with statistics of the whole image.

Each band reduces its own rows to (mean, biased variance) per (batch, group) in fp32 and shares
them; each band's element count follows from the band layout, so it is not exchanged. Merging and
the asynchronous corrections run on raw moments (E[x], E[x^2]) in fp64 on these tiny tensors,
where E[x^2] - E[x]^2 loses only ~1e-16 * (mean / std)^2 of the variance (1e-10 at a mean of 1000
standard deviations), so the synchronous result equals ``nn.GroupNorm``. Any corrected estimate whose variance would be
negative falls back to the band's own exact statistics. The normalisation itself is one
``batch_norm`` over ``[1, batch * channels, n]`` with each channel's group statistics: one fused
read and write of the band, in the input's dtype.

The arithmetic on the moments is written as few whole-tensor operations (a weighted sum over the
bands is one matrix-vector product): it runs once per GroupNorm layer per step (46 layers in SDXL),
so every extra operation is 46 more small GPU kernels a step, a fixed cost that CUDA graphs do not
remove (halving them saved ~1.3 ms a step on an H200).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Mode
from ..context import ExchangingLayer, PatchContext
from ..geometry import BandLayout


def moment_parts(x: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[batch, groups]`` fp32 tensors: the mean and biased variance of each group."""
    grouped = x.reshape(x.shape[0], groups, -1)
    if torch.compiler.is_compiling():
        # Inductor lowers var_mean to one Welford pass (count, mean, M2) over the band, the cast to
        # fp32 fused into it. (Eager CUDA's one-kernel Welford statistics were measured no faster:
        # BENCHMARKS.md "GPU".)
        variance, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)
    else:
        # Two passes (mean, then the norm of the deviations) keep the variance exact and
        # non-negative; eager torch.var_mean does the same arithmetic but is ~20x slower on the CPU.
        mean = grouped.mean(-1, dtype=torch.float32)
        variance = torch.linalg.vector_norm(grouped - mean[..., None], dim=-1).square_()
        variance = variance.div_(grouped.shape[-1])
    return mean, variance


def local_moments(x: torch.Tensor, groups: int) -> torch.Tensor:
    """``[2, batch, groups]`` fp32: :func:`moment_parts` stacked."""
    return torch.stack(moment_parts(x, groups))


def band_weights(layout: BandLayout) -> list[float]:
    """Each band's share of the elements of a feature map: its share of the rows, the same at every
    level (bands scale by 2 per level)."""
    heights = [layout.band_height(band) for band in range(layout.num_bands)]
    return [height / sum(heights) for height in heights]


def _raw(moments: torch.Tensor) -> torch.Tensor:
    """``[..., 2, b, g]`` (mean, variance) -> ``[..., 2 * b * g]`` fp64 (E[x], E[x^2]), flattened."""
    raw = moments.to(torch.float64, copy=True)  # written in place below
    raw.select(-3, 1).addcmul_(raw.select(-3, 0), raw.select(-3, 0))
    return raw.flatten(-3)


def _moments(raw: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Flat raw moments (see :func:`_raw`) -> ``[2, b, g]`` (mean, variance), in place."""
    moments = raw.view(like.shape[-3:])
    moments[1].addcmul_(moments[0], moments[0], value=-1)
    return moments


def merge_moments(moments: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Merges ``[bands, 2, batch, groups]`` moments into the whole image's ``[2, batch, groups]``
    (mean, biased variance) in fp64; ``weights``: each band's share of the elements, fp64."""
    merged = _moments(torch.mv(_raw(moments).T, weights), moments)
    merged[1].clamp_(min=0)  # a rounding error below 0 at a constant group
    return merged


def corrected_moments(stale: torch.Tensor, fresh: torch.Tensor, change: torch.Tensor) -> torch.Tensor:
    """DistriFusion Eq. 2: last step's global moments plus this band's change since last step.

    Applied to E[x] and E[x^2]: ``sum_b w_b stale_b - stale_own + fresh``, where ``change`` holds the
    bands' weights ``w_b`` less 1 for this band (fp64). It assumes every band drifts like this one
    between adjacent steps. Returns ``[2, batch, groups]`` (mean, variance) in fp64; the variance
    may come out negative.
    """
    return _moments(torch.addmv(_raw(fresh), _raw(stale).T, change), fresh)


class PatchGroupNorm(nn.Module, ExchangingLayer):
    """Wraps an ``nn.GroupNorm`` whose input is one band of a ``[batch, channels, *spatial]`` map."""

    def __init__(self, norm: nn.GroupNorm, context: PatchContext, key: str):
        nn.Module.__init__(self)
        self.norm = norm
        ExchangingLayer.__init__(self, context, key)
        self._tiled_affine: dict[int, tuple[tuple, torch.Tensor, torch.Tensor]] = {}
        self._weights: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def always_fresh(self) -> bool:
        return self.context.mode in (Mode.FULL_SYNC, Mode.SYNC_GN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if not ctx.parallel:
            return self.norm(x)
        parts = moment_parts(x, self.norm.num_groups)
        if ctx.mode in (Mode.NAIVE_PATCH, Mode.SEPARATE_GN):
            return self._normalize(x, torch.stack(parts))
        return self._normalize(x, self.exchanged(parts))

    def combine(
        self, gathered: torch.Tensor, fresh: torch.Tensor, own: torch.Tensor | None, stale: bool
    ) -> torch.Tensor:
        """The whole image's ``[2, batch, groups]`` (mean, variance) from every band's moments."""
        weights, change = self._band_weights(fresh.device)
        if stale and self.context.mode is Mode.CORRECTED_ASYNC_GN:
            corrected = corrected_moments(gathered, fresh, change)
            return torch.where(corrected[1] >= 0, corrected, fresh)
        # stale_gn reads the other bands' previous moments but always its own current ones.
        merged = gathered.clone()
        merged[self.context.band] = fresh
        return merge_moments(merged, weights)

    def combined_like(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        # Shapes only, without the weights cache (it must hold real tensors, not the tracer's).
        return parts[0].new_empty((2, *parts[0].shape), dtype=torch.float64)

    def _band_weights(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each band's share of the elements, and the same less 1 for this band (fp64, on ``device``);
        built at the first step of a layout, then at fixed addresses."""
        ctx = self.context
        key = (ctx.layout, ctx.band, device)
        cached = self._weights.get(key)
        if cached is None:
            weights = torch.tensor(band_weights(ctx.layout), dtype=torch.float64, device=device)
            change = weights.clone()
            change[ctx.band] -= 1
            cached = self._weights[key] = weights, change
        return cached

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
