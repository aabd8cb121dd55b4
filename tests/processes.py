"""Process-tree helpers for tests that check nothing is left running (Linux /proc)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from pathlib import Path


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid``."""
    found, pending = set(), [pid]
    while pending:
        current = pending.pop()
        children = Path(f"/proc/{current}/task/{current}/children")
        if children.exists():
            for child in map(int, children.read_text().split()):
                found.add(child)
                pending.append(child)
    return found


def running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited; only its parent's bookkeeping is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def still_running_after(pids: Iterable[int], seconds: float) -> set[int]:
    """The processes of ``pids`` still running once ``seconds`` have passed (or fewer, if all end)."""
    deadline = time.monotonic() + seconds
    alive = set(pids)
    while alive and time.monotonic() < deadline:
        alive = {pid for pid in alive if running(pid)}
        time.sleep(0.2)
    return {pid for pid in alive if running(pid)}
