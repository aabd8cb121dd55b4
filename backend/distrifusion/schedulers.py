"""Scheduler names a request may use, each a diffusers scheduler built from the model's own config."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import ConfigError

if TYPE_CHECKING:
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (diffusers class name, config overrides); names follow the usual UI names of the samplers.
# Classes are named, not imported, so that listing the names (distrifusion-generate's --scheduler
# choices, checked before any rank starts) does not import diffusers, which takes seconds.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_ancestral": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "heun": ("HeunDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
}


def make_scheduler(name: str, model_config: Any) -> SchedulerMixin:
    """The scheduler ``name`` with the model's training schedule (betas, offsets, prediction type)."""
    import diffusers

    try:
        class_name, overrides = SCHEDULERS[name]
    except KeyError:
        allowed = ", ".join(SCHEDULERS)
        raise ConfigError(f"scheduler: unknown scheduler {name!r}; allowed: {allowed}") from None
    return getattr(diffusers, class_name).from_config(model_config, **overrides)
