"""When a denoising step has finished on the device, as opposed to when the host launched it.

On CUDA the host only queues a step: kernel launches, stream waits, NCCL collectives and graph
replays return at once (torch's CUDA semantics notes, "Asynchronous execution"), and the host
learns that the step ran from an event recorded after it. A
:class:`StepClock` marks the end of each step. The pipeline lets the host run at most
:data:`STEPS_AHEAD` steps ahead of the device, so a stop vote, a cancellation and NCCL's timeout
(which counts from enqueue) lag the device by at most that; a watchdog heartbeats on the marks that
completed, not on the steps the host queued. On the CPU every mark is complete when it is made.
"""

from __future__ import annotations

from typing import Protocol

import torch

STEPS_AHEAD = 2
"""Steps the host may queue beyond the last one the device finished: one keeps the device busy
while the host queues the next, the second absorbs the host's jitter."""


class StepMark(Protocol):
    def done(self) -> bool:
        """Whether the device has finished everything queued before the mark (never blocks; any
        thread may ask)."""
        ...

    def wait(self) -> None:
        """Blocks until :meth:`done`."""
        ...


class StepClock(Protocol):
    def mark(self) -> StepMark:
        """Marks the end of the work queued so far on this rank's device."""
        ...


class _Finished:
    def done(self) -> bool:
        return True

    def wait(self) -> None:
        pass


class HostClock:
    """The CPU: a step has run when the host returns from it."""

    def mark(self) -> StepMark:
        return _Finished()


class _CudaMark:
    def __init__(self) -> None:
        self._event = torch.cuda.Event()
        self._event.record()  # on the current stream, after the step's work

    def done(self) -> bool:
        return self._event.query()

    def wait(self) -> None:
        self._event.synchronize()


class CudaClock:
    """An event on the current stream after each step."""

    def mark(self) -> StepMark:
        return _CudaMark()


def clock_for(device: torch.device) -> StepClock:
    return CudaClock() if device.type == "cuda" else HostClock()
