"""Convolution over one band: the rows above and below it come from the neighbouring bands."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Mode
from ..context import ExchangingLayer, PatchContext


class PatchConv2d(nn.Module, ExchangingLayer):
    """Wraps an ``nn.Conv2d`` with kernel height > 1 (or the UNet's input convolution).

    The input convolution sees the full, replicated latent and cuts its own rows plus the padding
    rows out of it, so it needs no communication. Every other convolution sees only its band and
    takes ``padding`` rows from each neighbour's input (fresh during warm-up, else the previous
    step's); zero rows only at the true image border, or at every band edge in ``naive_patch``.
    """

    def __init__(self, conv: nn.Conv2d, context: PatchContext, key: str, replicated_input: bool = False):
        nn.Module.__init__(self)
        if conv.padding_mode != "zeros" or isinstance(conv.padding, str):
            raise NotImplementedError(f"{key}: only numeric zero padding is patch-parallel")
        if not replicated_input and conv.padding[0] == 0:
            raise NotImplementedError(f"{key}: a convolution taller than 1 row needs padding rows")
        self.conv = conv
        ExchangingLayer.__init__(self, context, key)
        self.replicated_input = replicated_input

    @property
    def halo(self) -> int:
        return self.conv.padding[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if not ctx.parallel:
            return self.conv(x)
        if self.replicated_input:
            padded = self._own_rows_of_full_input(x)
        elif ctx.mode is Mode.NAIVE_PATCH:
            padded = F.pad(x, (0, 0, self.halo, self.halo))
        else:
            padded = self.exchanged([x[:, :, : self.halo], x[:, :, -self.halo :]], x)
        conv = self.conv
        return F.conv2d(
            padded, conv.weight, conv.bias, conv.stride, (0, conv.padding[1]), conv.dilation, conv.groups
        )

    def _own_rows_of_full_input(self, full: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        start, end = ctx.layout.rows(ctx.band)
        rows = full[:, :, max(start - self.halo, 0) : end + self.halo]
        missing_top = max(self.halo - start, 0)
        missing_bottom = max(end + self.halo - full.shape[2], 0)
        return F.pad(rows, (0, 0, missing_top, missing_bottom))

    def combine(
        self, gathered: torch.Tensor, fresh: torch.Tensor, own: torch.Tensor | None, stale: bool
    ) -> torch.Tensor:
        """``own`` (this band's input) with the neighbours' rows above and below it."""
        # gathered: [bands, 2 (top rows, bottom rows), batch, channels, halo, width]
        assert own is not None
        band, last = self.context.band, self.context.layout.num_bands - 1
        zeros = own.new_zeros((*own.shape[:2], self.halo, own.shape[3]))
        above = gathered[band - 1, 1] if band > 0 else zeros
        below = gathered[band + 1, 0] if band < last else zeros
        return torch.cat([above, own, below], dim=2)
