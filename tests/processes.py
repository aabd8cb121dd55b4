"""Process-tree helpers for tests that check nothing is left running (Linux /proc)."""

from __future__ import annotations

import time
from collections.abc import Iterable

from distrifusion.serving.processes import child_pids, running


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    found, pending = set(), [pid]
    while pending:
        for child in child_pids(pending.pop()):
            found.add(child)
            pending.append(child)
    return found


def still_running_after(pids: Iterable[int], seconds: float) -> set[int]:
    """The processes of ``pids`` still running once ``seconds`` have passed (or fewer, if all end)."""
    deadline = time.monotonic() + seconds
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if running(pid)}
        time.sleep(0.2)
    return {pid for pid in alive if running(pid)}
