"""What goes wrong in a patch-parallel group, said so that a client and an operator can act on it.

A :class:`GroupFault` names the rank, its device, the step and the cause, and says that retrying
is safe: the group is rebuilt and nothing of the request was kept. :class:`FaultInjection` lets
tests make a rank raise or fail to start, through a JSON file named by an environment variable
(nothing happens without it).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import signal
from pathlib import Path
from typing import Any

from ..config import ConfigError

INJECTION_VARIABLE = "DISTRIFUSION_FAULT_INJECTION"
"""Tests only: the path of a JSON file of faults to inject (see :class:`FaultInjection`)."""


@dataclasses.dataclass(frozen=True)
class FaultPolicy:
    """How a group notices a rank that hangs, and how often it may be rebuilt.

    ``step_deadline_s``: the floor of the per-step deadline. Above it the deadline is
    ``step_deadline_factor`` times the step expected for the generation's size: the median step of
    its latest generation, or, for a size not run yet, a timed size's scaled by the work
    (:mod:`.step_cost`).
    ``compile_deadline_s``: the deadline of a generation's first step when it compiles (the warm-up
    of a compiled engine): inductor takes minutes a graph, and a rank waits in its first
    collective for the slowest rank's compile.
    ``max_rebuilds`` failed rebuilds within ``rebuild_window_s`` seconds give up (the pod should
    then be restarted). ``collective_timeout_s`` bounds every collective of the process group.
    """

    step_deadline_s: float = 60.0
    step_deadline_factor: float = 10.0
    max_rebuilds: int = 3
    rebuild_window_s: float = 600.0
    collective_timeout_s: float = 300.0
    compile_deadline_s: float = 1800.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            integer = field.name == "max_rebuilds"
            kind = int if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, kind) or not 0 < value < float("inf"):
                what = "an integer >= 1" if integer else "a number of seconds > 0"
                raise ConfigError(f"faults.{field.name}: must be {what}, got {value!r}")
        if self.collective_timeout_s <= self.step_deadline_s:
            raise ConfigError(
                f"faults.collective_timeout_s: must exceed step_deadline_s ({self.step_deadline_s}), so that "
                f"the watchdog, not the collective's timeout, ends a hung step; got {self.collective_timeout_s}"
            )

    def deadline(self, expected_step_s: float | None, compiling: bool = False) -> float:
        if compiling:
            return max(self.compile_deadline_s, self.deadline(expected_step_s))
        if expected_step_s is None:
            return self.step_deadline_s
        return max(self.step_deadline_s, self.step_deadline_factor * expected_step_s)


class GroupFault(RuntimeError):
    """A rank of the group was lost (or the group could not finish); the group is being rebuilt."""

    def __init__(self, kind: str, rank: int | None, device: str | None, cause: str) -> None:
        self.kind = kind
        """The ``reason`` label of the restart: ``rank_exited``, ``rank_raised``, ``deadline``."""
        self.rank = rank
        self.device = device
        self.cause = cause
        self.step: int | None = None
        self.total_steps: int | None = None
        super().__init__(self.describe())

    def at_step(self, step: int | None, total_steps: int | None) -> GroupFault:
        self.step, self.total_steps = step, total_steps
        self.args = (self.describe(),)
        return self

    def describe(self) -> str:
        who = (
            "the group"
            if self.rank is None
            else f"rank {self.rank}" + (f" ({self.device})" if self.device else "")
        )
        when = ""
        if self.step is not None:
            when = f" at step {self.step}" + (f" of {self.total_steps}" if self.total_steps else "")
        return (
            f"{who} {self.cause}{when}; the request did not complete and is safe to retry "
            "(the UNet group is being rebuilt)"
        )


class GroupUnavailable(RuntimeError):
    """The group cannot serve: it gave up rebuilding, or it was closed."""


def describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "is still running"
    if exitcode < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-exitcode).name}"
        return f"was killed by signal {-exitcode}"
    return f"exited with code {exitcode}"


class FaultInjection:
    """Faults a test asks for, from the JSON file named by ``DISTRIFUSION_FAULT_INJECTION``:

    ``{"raise": [{"rank": 1, "step": 2}], "fail_start": [1]}``: rank 1 raises after step 2 of its
    next generation (each entry fires once, and is then removed from the file); rank 1 fails every
    start while it is listed in ``fail_start``.
    """

    def __init__(self, path: str | None = None) -> None:
        path = path if path is not None else os.environ.get(INJECTION_VARIABLE)
        self.path = Path(path) if path else None

    def _read(self) -> dict[str, Any]:
        try:
            return json.loads(self.path.read_text()) if self.path is not None else {}
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def check_start(self, rank: int) -> None:
        if rank in self._read().get("fail_start", []):
            raise RuntimeError(f"injected fault: rank {rank} fails to start")

    def check_step(self, rank: int, step: int) -> None:
        if self.path is None:
            return
        faults = self._read()
        pending = faults.get("raise", [])
        for entry in pending:
            if entry.get("rank") == rank and entry.get("step") == step:
                pending.remove(entry)
                temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}")
                temporary.write_text(json.dumps(faults))
                temporary.replace(self.path)
                raise RuntimeError(f"injected fault: rank {rank} raises after step {step}")


def event_log(kind: str, details: dict[str, Any]) -> tuple[str, str] | None:
    """(level, message) for the server's log about one of the group's events, or None."""
    fault = details.get("fault")
    policy = details.get("policy", FaultPolicy())
    reason = f" [reason {fault.kind}]" if isinstance(fault, GroupFault) else ""
    if kind == "fault":
        return "error", f"UNet group fault{reason}: {fault}"
    if kind == "live_ranks":
        return "warn" if details["live"] < details["ranks"] else "info", (
            f"UNet group: {details['live']} of {details['ranks']} ranks alive"
        )
    if kind == "watchdog_error":
        return "error", f"UNet group watchdog ran into {details['error']!r}; it keeps watching"
    if kind == "rebuild_failed":
        return "error", (
            f"UNet group rebuild failed ({details['failures']} of {policy.max_rebuilds} allowed within "
            f"{policy.rebuild_window_s:.0f} s): {details['error']}"
        )
    if kind == "restart":
        return (
            "info",
            f"UNet group rebuilt and serving again after {details['seconds']:.1f} s [reason {details['reason']}]",
        )
    if kind == "state" and details["state"] == "rebuilding":
        return "warn", f"UNet group rebuilding{reason}; requests wait for it"
    if kind == "state" and details["state"] == "gave_up":
        return "error", (
            f"UNet group gave up after {policy.max_rebuilds} failed rebuilds within {policy.rebuild_window_s:.0f} s "
            f"(last error: {details.get('error')}); every request now fails and the server needs a restart"
        )
    return None
