"""The UNet stage's Prometheus metrics as data, and what one ``execute()`` adds to them.

The model.py glue turns each :class:`Observation` into a Triton ``pb_utils`` metric call; Triton
serves them on its metrics port (8002) next to its own ``nv_*`` metrics.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ..config import ConfigError
from .faults import GroupFault, GroupUnavailable

if TYPE_CHECKING:  # the VAE stage imports this module: it starts faster without diffusers
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
    MetricSpec(
        "distrifusion_unet_compiled_steps_total",
        "UNet steps that ran compiled by torch.compile (the rest of a compiled engine's ran eager)",
        "counter",
    ),
    MetricSpec(
        "distrifusion_unet_compiles_total",
        "Graphs torch.compile compiled while serving (a recompile; the warm-up's are not counted)",
        "counter",
    ),
    MetricSpec(
        "distrifusion_pass_seconds",
        "Wall time of one denoising pass of a batch, by pass (text_to_image, image_to_image, "
        "first_pass, second_pass); a two-pass request's second includes its decode and encode",
        "histogram",
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    ),
    MetricSpec("distrifusion_passes_total", "Denoising passes of a batch, by pass", "counter"),
    MetricSpec("distrifusion_images_total", "Images whose latents the UNet stage finished", "counter"),
    MetricSpec("distrifusion_failures_total", "Failed UNet-stage requests, by kind", "counter"),
    MetricSpec("distrifusion_live_ranks", "Live ranks of this instance's patch-parallel group", "gauge"),
    MetricSpec(
        "distrifusion_group_restarts_total",
        "Rebuilds of the patch-parallel group, by the fault's reason",
        "counter",
    ),
    MetricSpec(
        "distrifusion_group_state",
        "1 for the group's current state (serving, rebuilding, gave_up), else 0",
        "gauge",
    ),
)

TEXT_TO_IMAGE, IMAGE_TO_IMAGE, FIRST_PASS, SECOND_PASS = PASSES = (
    "text_to_image",
    "image_to_image",
    "first_pass",
    "second_pass",
)
"""A two-pass request (``first_pass_size``) runs a first pass from the prompt and a second from
its upscaled image; the others run one pass, from noise or from the request's image."""
PHASES = ("warmup", "async")
FAILURE_KINDS = ("invalid_argument", "cancelled", "internal", "unavailable")
RESTART_REASONS = ("rank_exited", "rank_raised", "deadline")
GROUP_STATES = ("serving", "rebuilding", "gave_up")


@dataclasses.dataclass(frozen=True)
class PassRecord:
    """One denoising pass of a batch (one of :data:`PASSES`)."""

    name: str
    seconds: float


@dataclasses.dataclass(frozen=True)
class Observation:
    metric: str
    value: float
    labels: tuple[tuple[str, str], ...] = ()


def failure_kind(outcome: object) -> str | None:
    """None for a success; else the ``kind`` label of the failure (one of FAILURE_KINDS)."""
    from .unet_stage import Cancelled

    if isinstance(outcome, ConfigError):
        return "invalid_argument"
    if isinstance(outcome, Cancelled):
        return "cancelled"
    if isinstance(outcome, (GroupFault, GroupUnavailable)):
        return "unavailable"
    if isinstance(outcome, Exception):
        return "internal"
    return None


def initial_observations(live_ranks: int, state: str) -> list[Observation]:
    """Every series with its known labels, at load: a ``rate()`` alert needs a series from 0."""
    added = [Observation("distrifusion_images_total", 0)]
    for phase in PHASES:
        labels = (("phase", phase),)
        added.append(Observation("distrifusion_unet_steps_total", 0, labels))
    added += [Observation("distrifusion_passes_total", 0, (("pass", name),)) for name in PASSES]
    added += [Observation("distrifusion_failures_total", 0, (("kind", kind),)) for kind in FAILURE_KINDS]
    added += [
        Observation("distrifusion_group_restarts_total", 0, (("reason", reason),))
        for reason in RESTART_REASONS
    ]
    return [*added, Observation("distrifusion_live_ranks", live_ranks), *state_observations(state)]


def state_observations(state: str) -> list[Observation]:
    return [
        Observation("distrifusion_group_state", float(state == known), (("state", known),))
        for known in GROUP_STATES
    ]


def event_observations(kind: str, details: dict) -> list[Observation]:
    """What one of the group's events changes, as it happens."""
    if kind == "live_ranks":
        return [Observation("distrifusion_live_ranks", details["live"])]
    if kind == "restart":
        return [Observation("distrifusion_group_restarts_total", 1, (("reason", details["reason"]),))]
    if kind == "state" and details["state"] in GROUP_STATES:
        return state_observations(details["state"])
    return []


def observations(
    steps: Iterable[StepRecord], outcomes: Iterable[object], passes: Iterable[PassRecord] = ()
) -> list[Observation]:
    """What the UNet steps, passes and per-request outcomes of one ``execute()`` add to the metrics."""
    added: list[Observation] = []
    for record in passes:
        labels = (("pass", record.name),)
        added.append(Observation("distrifusion_pass_seconds", record.seconds, labels))
        added.append(Observation("distrifusion_passes_total", 1, labels))
    for step in steps:
        phase = (("phase", "warmup" if step.phase == "warmup" else "async"),)
        added.append(Observation("distrifusion_unet_step_seconds", step.seconds, phase))
        added.append(
            Observation(
                "distrifusion_unet_communication_wait_seconds", step.communication.wait_seconds, phase
            )
        )
        added.append(Observation("distrifusion_unet_steps_total", 1, phase))
        if step.compiled:
            added.append(Observation("distrifusion_unet_compiled_steps_total", 1))
        if step.new_graphs:
            added.append(Observation("distrifusion_unet_compiles_total", step.new_graphs))
    for outcome in outcomes:
        kind = failure_kind(outcome)
        if kind is None:
            added.append(Observation("distrifusion_images_total", len(outcome.seeds)))
        else:
            added.append(Observation("distrifusion_failures_total", 1, (("kind", kind),)))
    return added
