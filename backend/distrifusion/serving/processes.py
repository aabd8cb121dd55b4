"""The server's process tree from Linux's /proc: children, command lines, Python-backend stubs."""

from __future__ import annotations

from pathlib import Path


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
        if command and command[0].endswith("triton_python_backend_stub") and len(command) > 1:
            found[pid] = Path(command[1]).parts[-3]
    return found
