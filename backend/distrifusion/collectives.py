"""The collectives a patch group runs, and when the host issues them.

Every all-gather of the engine goes through a :class:`Collective`, so a caller can substitute one:
the band simulation of the benchmarks replicates this rank's data instead of talking to peers.
Every host-side communication call of a UNet step (an all-gather, the wait for an asynchronous
one) goes through :class:`HostCalls`, which runs it at once, or, while a step is being captured
as CUDA graphs, records it between two graph segments so that it runs at every replay.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Protocol

import torch
import torch.distributed as dist


class Work(Protocol):
    """What an asynchronous collective returns (``torch.distributed.Work`` has this)."""

    def wait(self) -> object: ...


class Collective(Protocol):
    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool
    ) -> Work | None:
        """``output`` ([world * n] flat) receives every rank's ``input`` ([n] flat), in rank order;
        with ``async_op`` it returns the work to wait for."""
        ...


class ProcessGroupCollective:
    """torch.distributed's flat all-gather on the given group (None: the default group).

    A gloo group with ranks on CUDA (several ranks sharing one GPU, which NCCL refuses: the GPU
    tests) stages the tensors through host memory; ``stage_through_host`` forces that (True) or
    never does it (False) instead of deciding by the group's backend and the tensors' device.
    """

    def __init__(self, stage_through_host: bool | None = None) -> None:
        self.stage_through_host = stage_through_host
        self._staged: dict[tuple[dist.ProcessGroup | None, str], bool] = {}

    def _stages(self, group: dist.ProcessGroup | None, device: torch.device) -> bool:
        if self.stage_through_host is not None:
            return self.stage_through_host
        key = (group, device.type)
        if key not in self._staged:  # asked once per group: this runs for every all-gather
            self._staged[key] = device.type != "cpu" and dist.get_backend(group) == "gloo"
        return self._staged[key]

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool
    ) -> Work | None:
        # torch 2.13 deprecates all_gather_into_tensor for all_gather_single; the torch of some GPU
        # images (2.11) has only the old name.
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
        if not self._stages(group, input.device):
            return gather(output, input, group=group, async_op=async_op)
        host_output = torch.empty(output.shape, dtype=output.dtype)
        work = gather(host_output, input.cpu(), group=group, async_op=async_op)
        staged_work = _CopiedBack(work, host_output, output)
        if async_op:
            return staged_work
        staged_work.wait()
        return None


class _CopiedBack:
    """An all-gather into host memory, copied into its real output once waited for."""

    def __init__(self, work: Work | None, host_output: torch.Tensor, output: torch.Tensor) -> None:
        self._work, self._host_output, self._output = work, host_output, output

    def wait(self) -> bool:
        if self._work is not None:
            self._work.wait()
        self._output.copy_(self._host_output)
        return True


class _Completed:
    def wait(self) -> bool:
        return True


class ReplicatingCollective:
    """All-gathers without peers: every rank's slot receives this rank's data.

    With a :class:`~distrifusion.topology.Topology` of ``n`` ranks built by hand, a DistriUNet in
    one process then does exactly the work of one band of an ``n``-rank group (its rows, halos,
    whole-image keys and values, statistics merging, exchange buffers) with no peer and nothing on
    an interconnect: the benchmarks measure a band's compute this way on one device.
    """

    def all_gather(
        self, output: torch.Tensor, input: torch.Tensor, group: dist.ProcessGroup | None, async_op: bool
    ) -> Work | None:
        world = output.numel() // input.numel()
        output.view(world, -1).copy_(input.reshape(1, -1).expand(world, -1))
        return _Completed() if async_op else None


class HostCalls:
    """Runs host-side communication calls now, or hands them to a recorder (a CUDA graph capture)."""

    def __init__(self) -> None:
        self._recorder: Callable[[Callable[[], None]], None] | None = None

    def run(self, call: Callable[[], None]) -> None:
        if self._recorder is None:
            call()
        else:
            self._recorder(call)

    @property
    def recording(self) -> bool:
        return self._recorder is not None

    @contextmanager
    def recorded_by(self, recorder: Callable[[Callable[[], None]], None]) -> Iterator[None]:
        """While inside, every call goes to ``recorder`` instead of running."""
        if self._recorder is not None:
            raise RuntimeError("host calls are already being recorded")
        self._recorder = recorder
        try:
            yield
        finally:
            self._recorder = None
