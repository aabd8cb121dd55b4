"""CUDA graphs of one UNet step, one plan per (shape, phase): kernel launches cost more than NCCL here.

A step is replayed from a plan captured the first time its (shape, phase) runs; the phases are
warm-up (synchronous exchanges), steady (asynchronous exchanges) and last (asynchronous, nothing
sent). A plan is a sequence of graph segments with the step's host calls between them (every
all-gather and every wait for one, see :class:`~distrifusion.collectives.HostCalls`): the calls are
recorded, not run, while the step is captured, and run between the segments at every replay.
So no collective is inside a graph, and an asynchronous all-gather launched in one step's replay
runs under the next step's compute until that step first reads it, as in eager mode.

Capture is only valid when every buffer a step touches outside the graphs' memory pool stays at
a fixed address: the exchange has recorded its batches and the cross-attention keys/values are
cached in place per shape. Every plan shares one memory pool; plans are replayed one at a time,
in any order, and their outputs are copied out at once.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Hashable, Iterator
from typing import Any, Protocol

import torch
from torch.utils import _pytree as pytree

from .collectives import HostCalls


class Graph(Protocol):
    def replay(self) -> None: ...


class GraphBackend(Protocol):
    """How segments are captured; :class:`CudaGraphBackend` on GPUs, a stand-in in CPU tests."""

    def capturing(self) -> contextlib.AbstractContextManager[None]:
        """The context every segment of one plan is captured in."""
        ...

    def begin(self) -> Graph:
        """Starts capturing a new segment."""
        ...

    def end(self, graph: Graph) -> None: ...


class CudaGraphBackend:
    """Segments captured as ``torch.cuda.CUDAGraph`` on a side stream, all in one memory pool."""

    def __init__(self) -> None:
        self._pool: Any = None
        self._stream: torch.cuda.Stream | None = None

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        if self._stream is None:
            self._stream = torch.cuda.Stream()
            self._pool = torch.cuda.graph_pool_handle()
        torch.cuda.synchronize()
        with torch.cuda.stream(self._stream):
            yield
        torch.cuda.current_stream().wait_stream(self._stream)

    def begin(self) -> Graph:
        graph = torch.cuda.CUDAGraph()
        # thread_local: NCCL's watchdog thread queries the events of collectives in flight.
        graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
        return graph

    def end(self, graph: Graph) -> None:
        with warnings.catch_warnings():
            # Two host calls in a row leave an empty segment; replaying it is harmless.
            warnings.filterwarnings("ignore", message=".*CUDA Graph is empty.*")
            graph.capture_end()  # type: ignore[attr-defined]


class Plan:
    """One step as captured: graph segments and host calls in capture order."""

    def __init__(
        self, static_leaves: list[Any], items: list[Graph | Callable[[], None]], output: torch.Tensor
    ):
        self.static_leaves = static_leaves
        self.items = items
        self.output = output

    @property
    def segments(self) -> list[Graph]:
        return [item for item in self.items if not callable(item)]

    @property
    def host_calls(self) -> list[Callable[[], None]]:
        return [item for item in self.items if callable(item)]

    def replay(self) -> None:
        for item in self.items:
            if callable(item):
                item()
            else:
                item.replay()


class StepGraphs:
    """Captures and replays ``step(*inputs)``; tensors in ``inputs`` are copied into static buffers."""

    def __init__(self, backend: GraphBackend | None = None) -> None:
        self.backend = backend if backend is not None else CudaGraphBackend()
        self._plans: dict[Hashable, dict[Hashable, Plan]] = {}
        self.captures = 0
        """Plans captured so far (each capture costs a step's worth of host time)."""

    def run(
        self,
        shape_key: Hashable,
        phase: str,
        step: Callable[..., torch.Tensor],
        inputs: tuple,
        host_calls: HostCalls,
    ) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten(inputs)
        # Non-tensor arguments are baked into the graphs: they are part of the plan's key.
        constants = tuple(leaf for leaf in leaves if not isinstance(leaf, torch.Tensor))
        plans = self._plans.setdefault(shape_key, {})
        key = (phase, spec, constants)
        plan = plans.get(key)
        if plan is None:
            plan = plans[key] = self._capture(step, leaves, spec, host_calls)
        for static, leaf in zip(plan.static_leaves, leaves, strict=True):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        plan.replay()
        return plan.output.clone()

    def shapes(self) -> list[Hashable]:
        """The shapes that have captured plans."""
        return list(self._plans)

    def plans(self, shape_key: Hashable) -> dict[Hashable, Plan]:
        """The plans captured for one shape, by (phase, input structure, constants)."""
        return self._plans.get(shape_key, {})

    def forget(self, shape_key: Hashable) -> None:
        """Drops the plans of one shape (its exchange buffers are about to be freed)."""
        self._plans.pop(shape_key, None)

    def clear(self) -> None:
        self._plans.clear()

    def _capture(
        self,
        step: Callable[..., torch.Tensor],
        leaves: list[Any],
        spec: pytree.TreeSpec,
        host_calls: HostCalls,
    ) -> Plan:
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        items: list[Graph | Callable[[], None]] = []
        backend = self.backend
        with backend.capturing():
            segment = backend.begin()

            def cut(call: Callable[[], None]) -> None:
                nonlocal segment
                backend.end(segment)
                items.extend((segment, call))
                segment = backend.begin()

            try:
                with host_calls.recorded_by(cut):
                    output = step(*pytree.tree_unflatten(static_leaves, spec))
            except BaseException:
                with contextlib.suppress(Exception):
                    backend.end(segment)
                raise
            backend.end(segment)
            items.append(segment)
        self.captures += 1
        return Plan(static_leaves, items, output)
