"""What every patch-parallel layer of one UNet needs to know about the step being computed."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import TypeVar

import torch

from . import exchange_op
from .config import DistriConfig, Mode
from .exchange import Exchange
from .geometry import BandLayout

T = TypeVar("T")


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

    def exchanged(
        self,
        key: str,
        fresh: torch.Tensor,
        combine: Callable[[torch.Tensor, bool], T],
        always_fresh: bool = False,
    ) -> T:
        """``combine(gathered, stale)`` of ``gathered`` ``[bands, ...]``: what every band shares under
        ``key``.

        In synchronous steps (or with ``always_fresh``) all entries are this step's; afterwards the
        other bands' entries are from the previous step (``stale`` is then True), and ``fresh`` is
        queued for the next step (except on the last step, whose data nobody would read).
        ``combine`` must not keep the stale tensor: its memory is reused by the next exchange.
        """
        assert self.exchange is not None
        if always_fresh or self.synchronous:
            return combine(self.exchange.share_now(key, fresh), False)
        result = combine(self.exchange.latest(key), True)
        if not self.last_step:
            self.exchange.share_later(key, fresh)
        return result


class ExchangingLayer:
    """A layer that shares ``fresh`` data with the other bands under ``key`` and combines what
    every band shared with its own input (``own``) in :meth:`combine`.

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
        raise NotImplementedError

    def exchanged(self, fresh: torch.Tensor, own: torch.Tensor | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return exchange_op.exchange(self.key, fresh, own)
        return self.exchange_now(fresh, own)

    def exchange_now(self, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        return self.context.exchanged(
            self.key,
            fresh,
            lambda gathered, stale: self.combine(gathered, fresh, own, stale),
            self.always_fresh,
        )

    def combined_like(self, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        gathered = fresh.new_empty((self.context.layout.num_bands, *fresh.shape))
        return self.combine(gathered, fresh, own, stale=False)
