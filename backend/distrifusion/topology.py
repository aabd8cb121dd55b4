"""Which ranks form the patch group of this rank, with and without the guidance batch split."""

from __future__ import annotations

import dataclasses

import torch.distributed as dist


@dataclasses.dataclass(frozen=True)
class PatchGroup:
    """The ranks that share one image batch, each computing one band of it."""

    group: dist.ProcessGroup | None
    """None: the default (whole-world) group."""
    size: int
    band: int
    batch_part: int | None
    """With the guidance batch split: 0 for the unconditional half, 1 for the conditional half."""


@dataclasses.dataclass(frozen=True)
class Topology:
    """``world`` ranks, of which this process is ``rank``.

    ``halves``: with the guidance batch split, the process groups of the first and the second half
    of the ranks (the unconditional and the conditional batch). ``control``: the group for the
    host's small decisions (the seed, the stop vote); a gloo group beside an NCCL one, so that a
    vote neither queues behind the asynchronous all-gathers on the GPU nor syncs the host with them
    (None: the default group).

    Built with :meth:`from_process_group` in a real group; built directly, it describes ranks that
    do not exist (the benchmarks' single-process band simulation), and every collective must then
    come from a substitute :class:`~distrifusion.collectives.Collective`.
    """

    world: int = 1
    rank: int = 0
    halves: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
    control: dist.ProcessGroup | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank {self.rank} is not one of {self.world} ranks")

    @classmethod
    def from_process_group(cls, split_batch: bool) -> Topology:
        """The default process group (or a single process without one).

        With ``split_batch`` both half groups are created up front, since creating a group is a
        collective call every rank must make.
        """
        if not (dist.is_available() and dist.is_initialized()):
            return cls()
        world, rank = dist.get_world_size(), dist.get_rank()
        halves = None
        if split_batch and world > 1:
            half = world // 2
            halves = (dist.new_group(list(range(half))), dist.new_group(list(range(half, world))))
        control = None
        if world > 1 and dist.get_backend() != "gloo":
            control = dist.new_group(backend="gloo")
        return cls(world=world, rank=rank, halves=halves, control=control)

    @property
    def can_split(self) -> bool:
        return self.halves is not None

    def patch_group(self, split: bool) -> PatchGroup:
        if not split:
            return PatchGroup(group=None, size=self.world, band=self.rank, batch_part=None)
        if self.halves is None:
            raise ValueError("this topology was built without split_batch")
        half = self.world // 2
        part = self.rank // half
        return PatchGroup(group=self.halves[part], size=half, band=self.rank % half, batch_part=part)
