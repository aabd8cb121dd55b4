"""CUDA graphs of one UNet step, one per (shape, phase): kernel launches cost more than NCCL here.

A step is replayed from a graph captured the first time its (shape, phase) runs; the phases are
warm-up (synchronous exchanges), steady (asynchronous exchanges) and last (asynchronous, nothing
sent). Capture is only valid when every buffer a step touches stays at a fixed address: the
exchange has recorded its batches, the cross-attention keys/values are cached in place, and every
asynchronous all-gather of a step is waited for before the step ends (a graph must join the
communication stream before capture ends), so no work crosses a graph boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any

import torch
from torch.utils import _pytree as pytree


class StepGraphs:
    """Captures and replays ``step(*inputs)``; tensors in ``inputs`` are copied into static buffers."""

    def __init__(self) -> None:
        self._graphs: dict[Hashable, tuple[torch.cuda.CUDAGraph, list[Any], torch.Tensor]] = {}
        self._pool: Any = None

    def run(self, key: Hashable, step: Callable[..., torch.Tensor], inputs: tuple) -> torch.Tensor:
        leaves, spec = pytree.tree_flatten(inputs)
        # Non-tensor arguments are baked into the graph: they are part of its key.
        constants = tuple(leaf for leaf in leaves if not isinstance(leaf, torch.Tensor))
        full_key = (key, spec, constants)
        if full_key not in self._graphs:
            self._graphs[full_key] = self._capture(step, leaves, spec)
        graph, static_leaves, output = self._graphs[full_key]
        for static, leaf in zip(static_leaves, leaves, strict=True):
            if isinstance(leaf, torch.Tensor):
                static.copy_(leaf)
        graph.replay()
        return output.clone()

    def forget(self, key: Hashable) -> None:
        self._graphs = {full_key: entry for full_key, entry in self._graphs.items() if full_key[0] != key}

    def _capture(
        self, step: Callable[..., torch.Tensor], leaves: list[Any], spec: pytree.TreeSpec
    ) -> tuple[torch.cuda.CUDAGraph, list[Any], torch.Tensor]:
        static_leaves = [leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = step(*pytree.tree_unflatten(static_leaves, spec))
        self._pool = graph.pool()
        return graph, static_leaves, output
