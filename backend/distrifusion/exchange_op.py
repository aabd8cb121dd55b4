"""The exchange point of a patch-parallel layer as one opaque operator, for ``torch.compile``.

A compiled band step must not break its graph at every exchange: with a graph break per layer
dynamo compiled the tiny UNet's band step into 79 graphs, hit its recompile limit on the
per-layer resume functions, and ran slower than eager (BENCHMARKS.md "Compiled UNet"). Instead each
layer's exchange (the all-gather or the asynchronous share, and the layer's combination of what
every band shared) is one call of ``distrifusion::exchange``: the compiler sees an operator with
known output shape and traces the whole UNet as one graph around it; the call runs the same Python
as the eager step, so what is sent, when, and what is waited for is identical.

The operator is registered as an ordered side effect: the exchange records its batches in call
order and launches a batch when its last key is shared, so the compiler must neither drop nor
reorder the calls.
"""

from __future__ import annotations

import itertools
import weakref
from typing import Protocol

import torch
from torch._higher_order_ops.effects import _EffectType, _register_effectful_op


class ExchangingLayer(Protocol):
    def exchange_now(self, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        """Shares ``fresh`` and returns the layer's combination of what every band shared."""
        ...

    def combined_like(self, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`exchange_now` returns, on tensors without data (shape and dtype only)."""
        ...


_LAYERS: weakref.WeakValueDictionary[int, ExchangingLayer] = weakref.WeakValueDictionary()
_NEXT_ID = itertools.count()


def register(layer: ExchangingLayer) -> int:
    """The handle a compiled graph calls ``layer`` by (never reused, unlike ``id``)."""
    handle = next(_NEXT_ID)
    _LAYERS[handle] = layer
    return handle


@torch.library.custom_op("distrifusion::exchange", mutates_args=())
def exchange(layer: int, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    return _LAYERS[layer].exchange_now(fresh, own)


@exchange.register_fake
def _(layer: int, fresh: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
    return _LAYERS[layer].combined_like(fresh, own)


_register_effectful_op(torch.ops.distrifusion.exchange.default, _EffectType.ORDERED)
