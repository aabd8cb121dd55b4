"""The decoupled ``sdxl_stream`` model, without Triton: one request through the ``sdxl`` ensemble's
own steps, with the UNet stage's progress forwarded as it comes.

The steps are the ensemble's (``build_engines`` writes them, from the ensemble's config, to
:data:`PLAN_FILE`), run one after another through the caller's ``infer`` (BLS in the model.py):
the same models with the same tensors, so the final image is the ensemble's. The UNet step also
gets a ``progress_token`` (:mod:`.progress_channel`) and the request's ``preview_every`` and
``preview_size``; while it runs, each step's message goes to ``on_message``. The VAE runs once, on
the final latents.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from .metrics import MetricSpec, Observation
from .progress_channel import TOKEN_FIELD, ProgressListener, StepMessage

PLAN_FILE = "ensemble_steps.json"
"""In sdxl_stream's version folder."""
PREVIEW_INPUTS = ("preview_every", "preview_size")
"""sdxl_stream's inputs beyond the ensemble's; passed to the UNet stage, which checks them."""

METRICS = (
    MetricSpec("distrifusion_stream_active", "Streamed requests (sdxl_stream) in progress", "gauge"),
    MetricSpec("distrifusion_stream_progress_total", "Progress responses sent to streams", "counter"),
    MetricSpec("distrifusion_stream_previews_total", "Preview images sent to streams", "counter"),
    MetricSpec(
        "distrifusion_stream_first_progress_seconds",
        "From a stream's arrival to its first progress response (queueing, text encoders, first step)",
        "histogram",
        (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0),
    ),
    MetricSpec("distrifusion_stream_requests_total", "Finished streams, by outcome", "counter"),
)
OUTCOMES = ("success", "cancelled", "refused", "failed")
"""``refused``: over max_active_streams; ``failed``: a composing model's error (bad input included:
tritonserver 2.51's BLS hands every error back as INTERNAL, so the kinds cannot be told apart)."""


class StepFailed(Exception):
    """A composing model answered with an error: its message, and its kind (a failure kind of
    :mod:`.metrics`), passed on unchanged."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass(frozen=True)
class EnsembleStep:
    model: str
    inputs: dict[str, str]
    """The model's input name -> the ensemble tensor it reads."""
    outputs: dict[str, str]
    """The model's output name -> the ensemble tensor it writes."""


@dataclasses.dataclass(frozen=True)
class StreamPlan:
    steps: tuple[EnsembleStep, ...]
    outputs: tuple[str, ...]
    """The ensemble's outputs: the final response's tensors."""
    unet_model: str

    def save(self, folder: Path) -> Path:
        path = Path(folder) / PLAN_FILE
        path.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> StreamPlan:
        values = json.loads((Path(folder) / PLAN_FILE).read_text())
        steps = tuple(EnsembleStep(**step) for step in values["steps"])
        return cls(steps=steps, outputs=tuple(values["outputs"]), unet_model=values["unet_model"])


Infer = Callable[[str, Mapping[str, Any], list[str]], dict[str, Any]]
"""``infer(model, inputs, output_names)`` -> outputs by name; raises :class:`StepFailed`. Tensors
are the caller's own objects (Triton's, passed on without a copy), or numpy arrays this module made."""


def cancelled_error() -> StepFailed:
    return StepFailed("request cancelled", "cancelled")


class StreamRunner:
    """Runs streams one at a time, in turn; the others wait (cancellable) for theirs.

    Why one at a time: tritonserver 2.51 (the CPU server) crashed (SIGSEGV in tritonserver; once
    SIGABRT, a boost::interprocess::lock_exception) with 12 and with 5 streams making BLS calls from
    this stub's threads at once, and not with 2 or 8 (measured; 13 with the turn, no crash). The
    UNet stage runs one batch at a time anyway: what the turn costs is that streams are not batched
    together, and a waiting stream's text encoding starts only when its turn comes.
    """

    def __init__(self, plan: StreamPlan, infer: Infer, directory: Path, poll_s: float = 0.2) -> None:
        self.plan = plan
        self.infer = infer
        self.directory = directory
        self.poll_s = poll_s
        self._turn = threading.Lock()

    def run(
        self,
        inputs: Mapping[str, Any],
        rows: int,
        on_message: Callable[[StepMessage], None],
        cancelled: Callable[[], bool],
    ) -> dict[str, Any]:
        """The ensemble's outputs for one request of ``rows`` prompts; raises :class:`StepFailed`."""
        with self._turn_of(cancelled):
            return self._steps(inputs, rows, on_message, cancelled)

    @contextlib.contextmanager
    def _turn_of(self, cancelled: Callable[[], bool]) -> Iterator[None]:
        while not self._turn.acquire(timeout=self.poll_s):
            if cancelled():
                raise cancelled_error()
        try:
            yield
        finally:
            self._turn.release()

    def _steps(self, inputs: Mapping[str, Any], rows: int, on_message: Callable[[StepMessage], None],
               cancelled: Callable[[], bool]) -> dict[str, Any]:  # fmt: skip
        tensors = {name: value for name, value in inputs.items() if name not in PREVIEW_INPUTS}
        for step in self.plan.steps:
            if cancelled():
                raise cancelled_error()
            step_inputs = {key: tensors[value] for key, value in step.inputs.items() if value in tensors}
            if step.model == self.plan.unet_model:
                previews = {name: inputs[name] for name in PREVIEW_INPUTS if name in inputs}
                outputs = self._unet(step, {**step_inputs, **previews}, rows, on_message, cancelled)
            else:
                outputs = self.infer(step.model, step_inputs, list(step.outputs))
            for key, value in step.outputs.items():
                tensors[value] = outputs[key]
        return {name: tensors[name] for name in self.plan.outputs}

    def _unet(
        self,
        step: EnsembleStep,
        inputs: dict[str, Any],
        rows: int,
        on_message: Callable[[StepMessage], None],
        cancelled: Callable[[], bool],
    ) -> dict[str, Any]:
        listener = ProgressListener(self.directory)
        inputs[TOKEN_FIELD] = np.array([[listener.token]] * rows, dtype=object)
        outcome: dict[str, Any] = {}

        def call() -> None:
            try:
                outcome["outputs"] = self.infer(step.model, inputs, list(step.outputs))
            except Exception as error:
                outcome["error"] = error

        caller = threading.Thread(target=call, name="sdxl_stream-unet", daemon=True)
        caller.start()
        try:
            for message in listener.messages(finished=lambda: not caller.is_alive(), cancelled=cancelled):
                on_message(message)
        finally:
            listener.close()
            caller.join()
        if cancelled():  # whatever the UNet stage answered: its error code does not survive BLS
            raise cancelled_error()
        if "error" in outcome:
            raise outcome["error"]
        return outcome["outputs"]


def refused_message(max_active: int) -> str:
    return (
        f"sdxl_stream: {max_active} streams are in progress, the most this deployment holds "
        "(max_active_streams); retry later"
    )


def active_observations(active: int) -> list[Observation]:
    return [Observation("distrifusion_stream_active", active)]


def initial_observations() -> list[Observation]:
    """Every series from 0 at load: a ``rate()`` alert needs it."""
    return [
        *active_observations(0),
        Observation("distrifusion_stream_progress_total", 0),
        Observation("distrifusion_stream_previews_total", 0),
        *(Observation("distrifusion_stream_requests_total", 0, (("outcome", o),)) for o in OUTCOMES),
    ]


def message_observations(message: StepMessage, first_after_s: float | None) -> list[Observation]:
    """A progress response sent; ``first_after_s``: the stream's first, this long after it arrived."""
    added = [Observation("distrifusion_stream_progress_total", 1)]
    if message.preview is not None:
        added.append(Observation("distrifusion_stream_previews_total", len(message.preview)))
    if first_after_s is not None:
        added.append(Observation("distrifusion_stream_first_progress_seconds", first_after_s))
    return added


def finished_observations(outcome: str, active: int) -> list[Observation]:
    return [
        Observation("distrifusion_stream_requests_total", 1, (("outcome", outcome),)),
        *active_observations(active),
    ]
