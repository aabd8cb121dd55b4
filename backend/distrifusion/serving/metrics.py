"""The UNet stage's Prometheus metrics as data, and what one ``execute()`` adds to them.

The model.py glue turns each :class:`Observation` into a Triton ``pb_utils`` metric call; Triton
serves them on its metrics port (8002) next to its own ``nv_*`` metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from ..config import ConfigError
from ..unet import StepRecord

_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


@dataclasses.dataclass(frozen=True)
class MetricSpec:
    name: str
    description: str
    kind: str
    """"counter" (observations add), "gauge" (observations set) or "histogram" (observations observe)."""
    buckets: tuple[float, ...] | None = None


METRICS = (
    MetricSpec(
        "distrifusion_unet_step_seconds",
        "Wall time of one UNet step on rank 0, by phase",
        "histogram",
        _SECONDS_BUCKETS,
    ),
    MetricSpec(
        "distrifusion_unet_communication_wait_seconds",
        "Time rank 0 waited for collectives in one UNet step, by phase",
        "histogram",
        _SECONDS_BUCKETS,
    ),
    MetricSpec(
        "distrifusion_unet_steps_total", "UNet steps, by phase (warmup: synchronous; async)", "counter"
    ),
    MetricSpec("distrifusion_images_total", "Images whose latents the UNet stage finished", "counter"),
    MetricSpec("distrifusion_failures_total", "Failed UNet-stage requests, by kind", "counter"),
    MetricSpec("distrifusion_live_ranks", "Live ranks of this instance's patch-parallel group", "gauge"),
)


@dataclasses.dataclass(frozen=True)
class Observation:
    metric: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def failure_kind(outcome: object) -> str | None:
    """None for a success; else the ``kind`` label of the failure."""
    from .unet_stage import Cancelled

    if isinstance(outcome, ConfigError):
        return "invalid_argument"
    if isinstance(outcome, Cancelled):
        return "cancelled"
    if isinstance(outcome, Exception):
        return "internal"
    return None


def observations(
    steps: Iterable[StepRecord], outcomes: Iterable[object], live_ranks: int
) -> list[Observation]:
    """What the UNet steps and the per-request outcomes of one ``execute()`` add to the metrics."""
    added: list[Observation] = []
    for step in steps:
        phase = (("phase", "warmup" if step.phase == "warmup" else "async"),)
        added.append(Observation("distrifusion_unet_step_seconds", step.seconds, phase))
        added.append(
            Observation(
                "distrifusion_unet_communication_wait_seconds", step.communication.wait_seconds, phase
            )
        )
        added.append(Observation("distrifusion_unet_steps_total", 1, phase))
    for outcome in outcomes:
        kind = failure_kind(outcome)
        if kind is None:
            added.append(Observation("distrifusion_images_total", len(outcome.seeds)))
        else:
            added.append(Observation("distrifusion_failures_total", 1, (("kind", kind),)))
    added.append(Observation("distrifusion_live_ranks", live_ranks))
    return added
