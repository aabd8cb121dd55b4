"""A device that runs behind the host, as CUDA does: a stand-in for the step clock of
:mod:`distrifusion.step_clock`, on the CPU.

On CUDA the host queues a step and returns at once; the device finishes it later. Here every step
the host marks finishes ``step_s`` seconds after the step before it finished (or after it was
marked, if the device was idle), and from ``hang_from`` on never: a kernel that does not return.
``lost`` stands for an aborted communicator: waiting for a step then raises, as CUDA reports the
error of an aborted NCCL collective.
"""

from __future__ import annotations

import threading
import time


class LaggingDevice:
    def __init__(self, step_s: float, hang_from: int | None = None) -> None:
        self.step_s = step_s
        self.hang_from = hang_from
        self.lost = threading.Event()
        self.finishes: list[float] = []
        self.most_queued = 0
        """The most steps marked and not finished, each time one was marked (the new one included)."""

    def mark(self) -> _Mark:
        now = time.monotonic()
        index = len(self.finishes)
        start = max([now, *self.finishes[-1:]])
        hung = self.hang_from is not None and index >= self.hang_from
        self.finishes.append(float("inf") if hung else start + self.step_s)
        self.most_queued = max(self.most_queued, self.queued(now))
        return _Mark(self, index)

    def finished(self, now: float | None = None) -> int:
        now = time.monotonic() if now is None else now
        return sum(finish <= now for finish in self.finishes)

    def queued(self, now: float | None = None) -> int:
        return len(self.finishes) - self.finished(now)


class _Mark:
    def __init__(self, device: LaggingDevice, index: int) -> None:
        self.device = device
        self.index = index

    def done(self) -> bool:
        return time.monotonic() >= self.device.finishes[self.index]

    def wait(self) -> None:
        while not self.done():
            if self.device.lost.is_set():
                raise RuntimeError("the device reported an error: its communicator was aborted")
            time.sleep(0.005)
