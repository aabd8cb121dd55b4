"""One band of an n-rank DistriFusion group, computed in a single process without communication.

Used by the benchmarks to measure the compute of one rank's band without n devices: a DistriUNet
whose topology says "n ranks, I am band r" and whose all-gathers are replaced by a local copy that
replicates this rank's tensor n times ("the other bands" are this band's data, plausible stale data
of the right shape). The layers do exactly the work a rank of an n-rank group does (its band, halos,
whole-image keys/values, moment merging, the batched send and receive buffers); nothing crosses an
interconnect and no communication kernel or thread competes with the compute. A measurement of the
compute only.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from distrifusion.topology import PatchGroup
from distrifusion.unet import DistriUNet


@dataclasses.dataclass
class SimTopology:
    """Stands in for distrifusion.topology.Topology: ``world`` ranks, of which this process is ``rank``."""

    world: int
    rank: int

    @property
    def can_split(self) -> bool:
        return False

    def patch_group(self, split: bool) -> PatchGroup:
        return PatchGroup(group=None, size=self.world, band=self.rank, batch_part=None)


class _DoneWork:
    """What an asynchronous collective returns, already complete."""

    def wait(self, timeout: Any = None) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _replicating_all_gather(output: torch.Tensor, input: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    """All-gather into ``output`` ([world * n] flat) without peers: every slot gets this rank's data."""
    world = output.numel() // input.numel()
    output.view(world, -1).copy_(input.reshape(1, -1).expand(world, -1))
    return _DoneWork() if kwargs.get("async_op") else None


@contextlib.contextmanager
def replicated_collectives() -> Iterator[None]:
    """Replaces the flat all-gathers of torch.distributed by a local copy (world-1 simulation).

    The engine calls them as ``dist.<name>`` at run time, so patching the module attribute reaches
    every call site; both names are patched in case the engine moves from one to the other.
    """
    names = [n for n in ("all_gather_single", "all_gather_into_tensor") if hasattr(dist, n)]
    saved = {n: getattr(dist, n) for n in names}
    try:
        for name in names:
            setattr(dist, name, _replicating_all_gather)
        yield
    finally:
        for name, fn in saved.items():
            setattr(dist, name, fn)


class SimulatedBandUNet(DistriUNet):
    """A DistriUNet that computes band ``rank`` of ``world`` bands in one process.

    It relies on the engine's private structure (``_exchange``, ``_exchanges``, ``_graphs``), which is
    what this simulation needs to override; :meth:`simulate` fails loudly if that changes.
    """

    def simulate(self, world: int, rank: int) -> None:
        """From the next step on, act as ``rank`` of ``world`` ranks (fresh exchanges and graphs)."""
        if not 0 <= rank < world:
            raise ValueError(f"band {rank} is not one of {world}")
        if not isinstance(getattr(self, "_exchanges", None), dict) or not hasattr(DistriUNet, "_exchange"):
            raise RuntimeError("DistriUNet no longer has _exchange/_exchanges: update band_simulation.py")
        for exchange in self._exchanges.values():
            with replicated_collectives():
                exchange.drain()
        self._exchanges.clear()
        if getattr(self, "_graphs", None) is not None:
            # Graphs are keyed by shape and phase, not by band count: drop those of the last layout.
            self._graphs = type(self._graphs)()
        self.topology = SimTopology(world, rank)

    def _exchange(self, group: PatchGroup, shape_key: tuple) -> Any:
        # Key the engine's exchange cache by the simulated layout too.
        return super()._exchange(group, (*shape_key, self.topology.world, self.topology.rank))
