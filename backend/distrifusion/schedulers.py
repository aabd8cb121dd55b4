"""Scheduler names a request may use, each a diffusers scheduler built from the model's own config."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from .config import ConfigError

# name -> (class, config overrides); names follow the usual UI names of the samplers.
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_ancestral": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "heun": (HeunDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}


def make_scheduler(name: str, model_config: Any) -> SchedulerMixin:
    """The scheduler ``name`` with the model's training schedule (betas, offsets, prediction type)."""
    try:
        cls, overrides = SCHEDULERS[name]
    except KeyError:
        allowed = ", ".join(SCHEDULERS)
        raise ConfigError(f"scheduler: unknown scheduler {name!r}; allowed: {allowed}") from None
    return cls.from_config(model_config, **overrides)
