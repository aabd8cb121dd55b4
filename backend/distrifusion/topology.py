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


class Topology:
    """The ranks of the default process group (or a single process without one).

    With ``split_batch`` the first half of the ranks can take the unconditional batch and the second
    half the conditional one; both sub-groups are created up front, since creating a group is a
    collective call every rank must make.
    """

    def __init__(self, split_batch: bool) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        self.world = dist.get_world_size() if initialized else 1
        self.rank = dist.get_rank() if initialized else 0
        self._halves: tuple[dist.ProcessGroup, dist.ProcessGroup] | None = None
        if split_batch and self.world > 1:
            half = self.world // 2
            self._halves = (dist.new_group(list(range(half))), dist.new_group(list(range(half, self.world))))

    @property
    def can_split(self) -> bool:
        return self._halves is not None

    def patch_group(self, split: bool) -> PatchGroup:
        if not split:
            return PatchGroup(group=None, size=self.world, band=self.rank, batch_part=None)
        if self._halves is None:
            raise ValueError("this topology was built without split_batch")
        half = self.world // 2
        part = self.rank // half
        return PatchGroup(group=self._halves[part], size=half, band=self.rank % half, batch_part=part)
