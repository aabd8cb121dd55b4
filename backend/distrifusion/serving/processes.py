"""The server's process tree from Linux's /proc: children, command lines, Python-backend stubs."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

STUB_PROGRAM = "triton_python_backend_stub"


def child_pids(pid: int) -> list[int]:
    """The live children of ``pid`` (empty once it is gone)."""
    try:
        return [int(child) for child in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except (OSError, ValueError):
        return []


def cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def running(pid: int) -> bool:
    """Exists and is not a zombie (a zombie has exited; only its parent's bookkeeping is left)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def start_time(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot): a pid with another start time is another process."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def tritonserver_pid(pid: int) -> int | None:
    """``pid`` itself if it runs tritonserver, else its tritonserver child (under the supervisor)."""
    for candidate in (pid, *child_pids(pid)):
        command = cmdline(candidate)
        if command and Path(command[0]).name == "tritonserver":
            return candidate
    return None


def stub_models(server_pid: int) -> dict[int, str]:
    """Pid -> model name of every Python-backend stub of the tritonserver ``server_pid`` (a stub's
    first argument is ``<repository>/<model>/<version>/model.py``)."""
    found = {}
    for pid in child_pids(server_pid):
        command = cmdline(pid)
        if _is_stub(command) and len(command) > 1:
            found[pid] = Path(command[1]).parts[-3]
    return found


def _is_stub(command: list[str]) -> bool:
    return bool(command) and command[0].endswith(STUB_PROGRAM)


def kill_leftover_stubs(stubs: dict[int, int | None], grace_s: float) -> list[int]:
    """SIGKILLs the ``stubs`` (pid -> :func:`start_time`) still running ``grace_s`` after their
    tritonserver exited; the pids it killed. A stub busy in ``execute()`` when the server's exit
    timeout ran out is left behind (re-parented to init) and keeps its CPU or GPU. A pid whose start
    time changed belongs to another process by now and is spared."""

    def ours(pid: int) -> bool:
        return running(pid) and start_time(pid) == stubs[pid] and _is_stub(cmdline(pid))

    deadline = time.monotonic() + grace_s
    while any(ours(pid) for pid in stubs) and time.monotonic() < deadline:
        time.sleep(0.1)
    killed = []
    for pid in sorted(stubs):
        if ours(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            killed.append(pid)
    return killed
