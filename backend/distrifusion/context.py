"""What every patch-parallel layer of one UNet needs to know about the step being computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from . import exchange_op
from .config import DistriConfig, Mode
from .exchange import Exchange
from .geometry import BandLayout


@dataclasses.dataclass
class PatchContext:
    """Shared, per-step state of the patch-parallel layers of one UNet.

    ``layout`` and ``band`` say which rows this rank computes; ``exchange`` talks to the other bands.
    With a single band every layer runs the original module unchanged.
    """

    config: DistriConfig
    layout: BandLayout | None = None
    band: int = 0
    exchange: Exchange | None = None
    step: int = 0
    total_steps: int | None = None

    @property
    def parallel(self) -> bool:
        return self.layout is not None and self.layout.num_bands > 1

    @property
    def mode(self) -> Mode:
        return self.config.mode

    @property
    def synchronous(self) -> bool:
        """Fresh data at this step: the first step, the warm-up steps, and every step of full_sync."""
        return self.mode is Mode.FULL_SYNC or self.step <= self.config.warmup_steps

    @property
    def last_step(self) -> bool:
        return self.total_steps is not None and self.step >= self.total_steps - 1


class ExchangingLayer:
    """A layer that shares fresh data with the other bands under ``key`` and combines what every
    band shared with its own input (``own``) in :meth:`combine`.

    The fresh data is given as ``parts`` and written by :meth:`write_fresh` straight into the
    exchange's send buffer once the buffers are fixed (stacked halos or moments, unpadded tokens),
    so it is not first concatenated or padded and then copied in: one kernel per layer and step.

    Eager, :meth:`exchanged` runs the exchange at once; inside ``torch.compile`` it is one call of
    the opaque ``distrifusion::exchange`` operator, which runs the same exchange at run time (see
    :func:`distrifusion.exchange_op.running`).
    """

    always_fresh = False
    """Exchanged fresh at every step, warm-up or not."""

    def __init__(self, context: PatchContext, key: str) -> None:
        self.context = context
        self.key = key

    def combine(
        self, gathered: torch.Tensor, fresh: torch.Tensor, own: torch.Tensor | None, stale: bool
    ) -> torch.Tensor:
        """This layer's result from ``gathered`` ``[bands, ...]``, what every band shared: this
        step's (``stale`` False) or, for the other bands, the previous step's. It must not keep
        ``gathered`` or ``fresh``: the exchange reuses their memory."""
        raise NotImplementedError

    def fresh(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        """What this band shares, as a new tensor."""
        return torch.stack(parts)

    def write_fresh(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        """Writes :meth:`fresh` into ``out`` (the send buffer; parts nobody reads may be left)."""
        torch.stack(parts, out=out)

    def exchanged(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return exchange_op.exchange(self.key, list(parts), own)
        return self.exchange_now(parts, own)

    def exchange_now(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        """In synchronous steps (or with ``always_fresh``) every band's data is this step's;
        afterwards the other bands' are the previous step's, and this band's fresh data is queued
        for the next step (except on the last step, whose data nobody would read)."""
        ctx, exchange = self.context, self.context.exchange
        assert exchange is not None
        if self.always_fresh or ctx.synchronous:
            fresh = self.fresh(parts)
            return self.combine(exchange.share_now(self.key, fresh), fresh, own, stale=False)
        # First: it waits for the previous step's gather, which frees this key's send buffer.
        gathered = exchange.latest(self.key)
        send = None if ctx.last_step else exchange.send_buffer(self.key)
        if send is None:
            fresh = self.fresh(parts)
        else:
            self.write_fresh(parts, send)
            fresh = send
        result = self.combine(gathered, fresh, own, stale=True)
        if not ctx.last_step:
            exchange.share_later(self.key, fresh)  # may launch the gather that overwrites ``gathered``
        return result

    def combined_like(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        fresh = self.fresh(parts)
        gathered = fresh.new_empty((self.context.layout.num_bands, *fresh.shape))
        return self.combine(gathered, fresh, own, stale=False)
