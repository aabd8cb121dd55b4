"""A device hook for spawned ranks (importable, as spawn requires): records where each rank would
go on CUDA and whether TF32 is on in its process, and keeps it on the CPU."""

from __future__ import annotations

import os

import torch

PLACEMENTS_FILE = "DISTRIFUSION_TEST_PLACEMENTS"
"""Environment variable: the file each rank appends ``<pid> <device> <index>`` to."""


def record_placement(device: str, index: int | None) -> torch.device:
    """Writes ``<pid> <device> <index> <cuDNN TF32> <matmul TF32>``."""
    tf32 = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    with open(os.environ[PLACEMENTS_FILE], "a") as log:
        log.write(f"{os.getpid()} {device} {index} {tf32[0]} {tf32[1]}\n")
    return torch.device("cpu")
