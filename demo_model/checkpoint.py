"""Resumable training state: the model, its optimizer, the step reached and the random streams, saved
atomically every few minutes, so a stopped run goes on where it was."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def save(path: Path, step: int, **states: Any) -> None:
    """Writes ``states`` (each with ``state_dict()`` or plain data) and the RNGs at ``step``."""
    payload = {
        "step": step,
        "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()},
        **{
            name: state.state_dict() if hasattr(state, "state_dict") else state
            for name, state in states.items()
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(payload, partial)
    os.replace(partial, path)  # a run killed while saving keeps the previous checkpoint


def load(path: Path, **states: Any) -> int:
    """Restores ``states`` and the RNGs from ``path``; the step reached, or 0 without a checkpoint."""
    if not path.exists():
        return 0
    payload = torch.load(path, weights_only=False)
    for name, state in states.items():
        state.load_state_dict(payload[name])
    torch.set_rng_state(payload["rng"]["torch"])
    np.random.set_state(payload["rng"]["numpy"])
    random.setstate(payload["rng"]["python"])
    return int(payload["step"])
