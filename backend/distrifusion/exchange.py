"""All-gathers of activations across a patch group: fresh (blocking) or batched and asynchronous.

Every patch-parallel layer shares its fresh data under a stable key and reads what every rank shared
under that key last time. A blocking share returns the fresh values at once (warm-up steps, exact
modes). An asynchronous share is queued; every ``batch_size`` queued tensors go out as one
all-gather, launched as soon as the last of them exists, and a reader waits for it only right before
it first needs the data in the next step.

The first asynchronous step records which keys form which batch (the layer order is the same every
step); from then on each batch has persistent send and receive buffers, so the addresses stay fixed
(as CUDA graphs need) and nothing is allocated per step. Blocking shares of a recorded key write into
the same receive buffer, so the first asynchronous step reads what the warm-up step gathered.
Batches are raw bytes, so tensors of different dtypes (fp16 activations, fp32 statistics) share one
all-gather.

Launches, waits and blocking gathers are host calls (:class:`~distrifusion.collectives.HostCalls`):
under CUDA graphs they run between graph segments at every replay, so the statistics count what
was really sent, and a batch launched in one step's replay is waited for in the next step's.
"""

from __future__ import annotations

import dataclasses
import functools
import time

import torch
import torch.distributed as dist

from .collectives import Collective, HostCalls, ProcessGroupCollective, Work


@dataclasses.dataclass(eq=False)
class _Batch:
    send: torch.Tensor
    receive: torch.Tensor
    last_key: str
    work: Work | None = None
    """The all-gather in flight into ``receive``, set when its launch runs (at once, or at a replay)."""


_ALIGNMENT = 16  # bytes; every slot starts aligned for any dtype's typed view


@dataclasses.dataclass(frozen=True)
class _Slot:
    batch: _Batch
    offset: int
    shape: torch.Size
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.shape.numel() * self.dtype.itemsize

    # Cached: the buffers never move, and rebuilding the views costs a few operations per layer.
    @functools.cached_property
    def view(self) -> torch.Tensor:
        """``[world, *shape]``: every rank's entry in the receive buffer."""
        world = self.batch.receive.shape[0]
        raw = self.batch.receive[:, self.offset : self.offset + self.nbytes]
        return raw.view(self.dtype).view(world, *self.shape)

    @functools.cached_property
    def send_view(self) -> torch.Tensor:
        return self.batch.send[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclasses.dataclass
class ExchangeStats:
    """What one rank spent on communication; reset by the caller when it wants per-step figures."""

    wait_seconds: float = 0.0
    """Host time spent in blocking gathers and in waits for asynchronous ones (on CUDA: the time
    to queue them, since the device, not the host, waits)."""
    bytes_sent: int = 0
    bytes_received: int = 0
    collectives: int = 0
    output_gather_seconds: float = 0.0
    """The part of ``wait_seconds`` spent gathering the noise prediction at the end of each step."""

    def snapshot(self) -> ExchangeStats:
        return dataclasses.replace(self)

    def since(self, earlier: ExchangeStats) -> ExchangeStats:
        """What was spent after ``earlier`` (a snapshot of these stats)."""
        return ExchangeStats(
            *(
                now - then
                for now, then in zip(dataclasses.astuple(self), dataclasses.astuple(earlier), strict=True)
            )
        )

    def count(self, sent: torch.Tensor, world: int) -> None:
        nbytes = sent.numel() * sent.element_size()
        self.bytes_sent += nbytes
        self.bytes_received += nbytes * (world - 1)
        self.collectives += 1


def gather_now(
    collective: Collective,
    stats: ExchangeStats,
    group: dist.ProcessGroup | None,
    world: int,
    output: torch.Tensor,
    input: torch.Tensor,
) -> float:
    """A blocking all-gather of ``input`` into ``output`` (both contiguous); returns its host seconds."""
    started = time.perf_counter()
    collective.all_gather(output.view(-1), input.view(-1), group, False)
    seconds = time.perf_counter() - started
    stats.wait_seconds += seconds
    stats.count(input, world)
    return seconds


class Exchange:
    """Shares tensors among the ranks of one patch group (``group`` None: the default group)."""

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        world: int,
        batch_size: int,
        stats: ExchangeStats | None = None,
        collective: Collective | None = None,
        host_calls: HostCalls | None = None,
    ) -> None:
        self.group = group
        self.world = world
        self.batch_size = batch_size
        self.stats = stats if stats is not None else ExchangeStats()
        self.collective = collective if collective is not None else ProcessGroupCollective()
        self.host_calls = host_calls if host_calls is not None else HostCalls()
        self._slots: dict[str, _Slot] = {}
        self._unbatched: dict[str, torch.Tensor] = {}
        self._recording: list[tuple[str, torch.Tensor]] = []
        self._batches: list[_Batch] = []
        self._complete_this_step: set[_Batch] = set()
        self._recorded_this_step = False
        self.planned = False
        """True once a whole asynchronous step has recorded its batches (buffers fixed from then on)."""

    def share_now(self, key: str, tensor: torch.Tensor) -> torch.Tensor:
        """Blocking all-gather; returns ``[world, *tensor.shape]`` and keeps it as the key's latest."""
        gathered = tensor.new_empty((self.world, *tensor.shape))
        fresh = tensor.contiguous()
        self.host_calls.run(
            functools.partial(
                gather_now, self.collective, self.stats, self.group, self.world, gathered, fresh
            )
        )
        slot = self._slots.get(key)
        if slot is None:
            self._unbatched[key] = gathered
        else:
            slot.view.copy_(gathered)
        return gathered

    def send_buffer(self, key: str) -> torch.Tensor | None:
        """Where ``key``'s data goes out once the batches are fixed (None before): a caller that
        writes its data here, after :meth:`latest` of this step, and passes it to
        :meth:`share_later` saves the copy into the batch."""
        slot = self._slots.get(key)
        return None if slot is None else slot.send_view

    def share_later(self, key: str, tensor: torch.Tensor) -> None:
        """Queues ``tensor`` for the asynchronous all-gather of its batch."""
        slot = self._slots.get(key)
        if slot is None:
            self._record(key, tensor)
            return
        if tensor is not slot.send_view:
            slot.send_view.copy_(tensor)
        if key == slot.batch.last_key:
            self._launch(slot.batch)

    def latest(self, key: str) -> torch.Tensor:
        """What every rank shared under ``key`` last time, ``[world, ...]``; waits if still in flight."""
        slot = self._slots.get(key)
        if slot is None:
            return self._unbatched[key]
        if slot.batch not in self._complete_this_step:
            # Once per batch and step, whatever the batch's state when this runs: a step replayed
            # from CUDA graphs must wait wherever the first replay had to.
            self._complete_this_step.add(slot.batch)
            self.host_calls.run(functools.partial(self._complete, slot.batch))
        return slot.view

    def end_step(self) -> None:
        """Sends what the recording step queued after its last full batch."""
        if self._recording:
            self._close_recorded_batch()
        self._complete_this_step.clear()
        if self._recorded_this_step:
            self._recorded_this_step = False
            self._unbatched.clear()
            self.planned = True

    def drain(self) -> None:
        """Waits for every collective in flight (before a new generation, or on shutdown)."""
        for batch in self._batches:
            self.host_calls.run(functools.partial(self._complete, batch))
        self._complete_this_step.clear()
        self._recording.clear()

    def _record(self, key: str, tensor: torch.Tensor) -> None:
        # A copy: the batch goes out only once full, and the layer may reuse its memory before that.
        self._recording.append((key, tensor.detach().clone()))
        self._recorded_this_step = True
        if len(self._recording) == self.batch_size:
            self._close_recorded_batch()

    def _close_recorded_batch(self) -> None:
        offsets, size = [], 0
        for _, tensor in self._recording:
            offsets.append(size)
            size += -(-tensor.numel() * tensor.element_size() // _ALIGNMENT) * _ALIGNMENT
        device = self._recording[0][1].device
        send = torch.zeros(size, dtype=torch.uint8, device=device)
        batch = _Batch(send=send, receive=send.new_empty((self.world, size)), last_key=self._recording[-1][0])
        for (key, tensor), offset in zip(self._recording, offsets, strict=True):
            slot = _Slot(batch=batch, offset=offset, shape=tensor.shape, dtype=tensor.dtype)
            slot.send_view.copy_(tensor)
            self._slots[key] = slot
        self._batches.append(batch)
        self._recording.clear()
        self._launch(batch)

    def _launch(self, batch: _Batch) -> None:
        self._complete_this_step.discard(batch)  # a later read in this step must wait again
        self.host_calls.run(functools.partial(self._start, batch))

    def _start(self, batch: _Batch) -> None:
        batch.work = self.collective.all_gather(batch.receive.view(-1), batch.send, self.group, True)
        self.stats.count(batch.send, self.world)

    def _complete(self, batch: _Batch) -> None:
        if batch.work is None:  # nothing in flight (its data came from a blocking share)
            return
        started = time.perf_counter()
        batch.work.wait()
        self.stats.wait_seconds += time.perf_counter() - started
        batch.work = None
