"""The exchange point of a patch-parallel layer as one opaque operator, for ``torch.compile``.

A compiled band step must not break its graph at every exchange: with a graph break per layer
dynamo compiled the tiny UNet's band step into 79 graphs, hit its recompile limit on the
per-layer resume functions, and ran slower than eager (BENCHMARKS.md "Compiled UNet"). Instead each
layer's exchange (the all-gather or the asynchronous share, and the layer's combination of what
every band shared) is one call of ``distrifusion::exchange``: the compiler sees an operator with
known output shape and traces the whole UNet as one graph around it; the call runs the same Python
as the eager step, so what is sent, when, and what is waited for is identical.

The calls must stay in program order (see ``_CALL_ORDER``), which a mutated argument ensures:
inductor's cache does not store graphs with ordered side effects (``with_effects``), and without a
cache every restarted server would compile again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Protocol

import torch


class Exchanging(Protocol):
    def exchange_now(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        """Shares the fresh data made of ``parts`` and returns the layer's combination of what
        every band shared."""
        ...

    def combined_like(self, parts: Sequence[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
        """What :meth:`exchange_now` returns, on tensors without data (shape and dtype only)."""
        ...


_RUNNING: Mapping[str, Exchanging] = {}


@contextlib.contextmanager
def running(layers: Mapping[str, Exchanging]) -> Iterator[None]:
    """While inside, ``distrifusion::exchange`` calls reach ``layers`` (by key): the UNet whose
    step runs. A graph names its layers by key only, so the graphs of two UNets of the same shape
    are the same graph, which inductor's cache compiles once (another mode, another process)."""
    global _RUNNING
    outer, _RUNNING = _RUNNING, layers
    try:
        yield
    finally:
        _RUNNING = outer


# Every call "mutates" this tensor (it is never written): a chain of data dependencies that keeps
# the calls in program order through functionalization and inductor's scheduling. The ranks issue
# their collectives in this order, and each rank compiles its own graph; two ranks whose graphs
# swapped two same-sized exchanges would gather each other's wrong tensors.
_CALL_ORDER = torch.zeros(())


@torch.library.custom_op("distrifusion::exchange", mutates_args=("call_order",))
def _exchange(
    key: str, parts: list[torch.Tensor], own: torch.Tensor | None, call_order: torch.Tensor
) -> torch.Tensor:
    return _RUNNING[key].exchange_now(parts, own)


@_exchange.register_fake
def _(
    key: str, parts: list[torch.Tensor], own: torch.Tensor | None, call_order: torch.Tensor
) -> torch.Tensor:
    return _RUNNING[key].combined_like(parts, own)


def exchange(key: str, parts: list[torch.Tensor], own: torch.Tensor | None) -> torch.Tensor:
    """The exchange of the running UNet's layer ``key``, as one operator of the compiled graph.

    The fresh data goes in as its ``parts`` (halo rows, moments), so that the operator writes them
    straight into the send buffer at run time, rather than the graph concatenating them first."""
    return _exchange(key, parts, own, _CALL_ORDER)
