"""Kubernetes probes that know what Triton's own endpoints do not.

    python -m distrifusion.serving.probe live  [--http 127.0.0.1:8000] [--stale-s 30]
    python -m distrifusion.serving.probe ready [--http 127.0.0.1:8000]

``live`` fails (exit 1, the reason on stderr) when tritonserver is not live, when the supervisor
is gone or has not refreshed its entry on the health board within ``--stale-s``, or when it gave
up recovering: then only a restart helps. ``/v2/health/live`` alone stays 200 in all of these.
``ready`` is Triton's strict readiness, which the supervisor's gate holds false during recovery.
The board is ``$DISTRIFUSION_HEALTH_DIR`` (the supervisor sets it; the Deployment sets it for
probes too).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from .health import HEALTH_DIR_VARIABLE, SUPERVISOR, HealthBoard
from .supervisor import TritonControl


def problem(mode: str, http: str, board: HealthBoard, stale_s: float) -> str | None:
    control = TritonControl(http)
    if mode == "ready":
        return None if control.ready() else "tritonserver is not ready"
    if not control.live():
        return "tritonserver is not live"
    entry = board.read(SUPERVISOR)
    if entry is None:
        return f"no supervisor is running (no live entry in {board.directory})"
    if entry["state"] == "gave_up":
        return f"the supervisor gave up recovering: {entry.get('reason')}"
    age = time.time() - float(entry["time"])
    if age > stale_s:
        return f"the supervisor has not reported for {age:.0f} s"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distrifusion.serving.probe", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("mode", choices=("live", "ready"))
    parser.add_argument("--http", default="127.0.0.1:8000")
    parser.add_argument("--stale-s", type=float, default=30.0)
    parser.add_argument("--health-dir", default=os.environ.get(HEALTH_DIR_VARIABLE), help="default $%(dest)s")
    args = parser.parse_args(argv)
    if args.mode == "live" and not args.health_dir:
        print(f"probe: set {HEALTH_DIR_VARIABLE} or --health-dir", file=sys.stderr)
        return 1
    reason = problem(args.mode, args.http, HealthBoard(Path(args.health_dir or ".")), args.stale_s)
    if reason is not None:
        print(f"probe {args.mode}: {reason}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
