"""Where the server's parts say how they are: one small JSON file per part in a directory that the
supervisor (:mod:`distrifusion.serving.supervisor`) and the probes read.

Files are written whole (a temporary file renamed into place), so a reader never sees half of one.
Each names the pid that wrote it: a file whose writer is gone says nothing about the present.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .processes import running

HEALTH_DIR_VARIABLE = "DISTRIFUSION_HEALTH_DIR"
SUPERVISOR = "supervisor"
"""The supervisor's entry: starting, watching, recovering or gave_up, refreshed every half second."""


def health_directory(server_pid: int) -> Path:
    """The board of the tritonserver ``server_pid`` (``$DISTRIFUSION_HEALTH_DIR`` if set)."""
    explicit = os.environ.get(HEALTH_DIR_VARIABLE)
    if explicit:
        return Path(explicit)
    return Path(tempfile.gettempdir()) / f"distrifusion-health-{server_pid}"


class HealthBoard:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def publish(self, name: str, state: str, **detail: Any) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        entry = {"state": state, "pid": os.getpid(), "time": time.time(), **detail}
        temporary = self.directory / f".{name}.{os.getpid()}.tmp"
        temporary.write_text(json.dumps(entry, default=str))
        temporary.replace(self.directory / f"{name}.json")

    def read(self, name: str) -> dict[str, Any] | None:
        """The entry of ``name``, or None if absent or written by a process that is gone."""
        try:
            entry = json.loads((self.directory / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return entry if running(int(entry.get("pid", -1))) else None

    def entries(self, prefix: str = "") -> dict[str, dict[str, Any]]:
        """Every live entry whose name starts with ``prefix``."""
        if not self.directory.is_dir():
            return {}
        found = {}
        for path in self.directory.glob(f"{prefix}*.json"):
            entry = self.read(path.stem)
            if entry is not None:
                found[path.stem] = entry
        return found


GATE = "readiness_gate"
"""The gate's entry on the board (and the name of its model): closed, open, gave_up or stopping."""


def wait_for_gate(board: HealthBoard | None = None, poll_s: float = 0.2) -> None:
    """Returns once the supervisor opens the gate; raises if it gave up, or if no supervisor runs."""
    if board is None:
        explicit = os.environ.get(HEALTH_DIR_VARIABLE)
        if not explicit:
            raise RuntimeError(f"the readiness gate needs {HEALTH_DIR_VARIABLE} (set by the supervisor)")
        board = HealthBoard(Path(explicit))
    while True:
        entry = board.read(GATE)
        if entry is None:
            raise RuntimeError(
                "the readiness gate is opened by distrifusion.serving.supervisor; none is running"
            )
        if entry["state"] == "open":
            return
        if entry["state"] == "gave_up":
            raise RuntimeError(f"the server gave up recovering: {entry.get('reason')}; it needs a restart")
        if entry["state"] == "stopping":
            raise RuntimeError("the server is stopping")
        time.sleep(poll_s)
