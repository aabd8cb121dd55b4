"""A device hook for spawned ranks (importable, as spawn requires): records where each rank would
go on CUDA, and keeps it on the CPU."""

from __future__ import annotations

import os

import torch

PLACEMENTS_FILE = "DISTRIFUSION_TEST_PLACEMENTS"
"""Environment variable: the file each rank appends ``<pid> <device> <index>`` to."""


def record_placement(device: str, index: int | None) -> torch.device:
    with open(os.environ[PLACEMENTS_FILE], "a") as log:
        log.write(f"{os.getpid()} {device} {index}\n")
    return torch.device("cpu")
