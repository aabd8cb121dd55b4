"""What every model.py of this repository does with Triton the same way: errors, output tensors,
logs and metrics. build_engines copies this file next to each Python-backend model.py; it is the
only module besides those that imports triton_python_backend_utils.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

# Names, not values: pb_utils gains TritonError's codes and MetricFamily only once the stub runs,
# and the stub also imports model.py earlier (for config auto-complete).
_ERROR_CODES = {
    "invalid_argument": "INVALID_ARG",
    "cancelled": "CANCELLED",
    "unavailable": "UNAVAILABLE",
    "internal": "INTERNAL",
}


def error(message: str, kind: str = "internal") -> pb_utils.TritonError:
    """A Triton error of ``kind`` (a key of the failure kinds: invalid_argument, cancelled,
    unavailable, internal); INTERNAL where this Triton lacks the code."""
    code = getattr(pb_utils.TritonError, _ERROR_CODES[kind], None)
    if code is None:
        code = pb_utils.TritonError.INTERNAL
    return pb_utils.TritonError(message, code)


def error_response(message: str, kind: str = "internal") -> pb_utils.InferenceResponse:
    return pb_utils.InferenceResponse(error=error(message, kind))


def output_tensor(name: str, array: np.ndarray) -> pb_utils.Tensor:
    """A response tensor, passed by DLPack through torch: the Python-backend stub of tritonserver
    2.51 (built against numpy 1) writes empty buffers for ``pb_utils.Tensor(name, ndarray)`` when
    numpy 2 is installed; this path works with either numpy."""
    import torch  # here, not at the top: the readiness gate, which starts during recovery, needs none

    return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(array)))


def log(level: str, message: str) -> None:
    """Through Triton's own logger (its log file and format): level is info, warn or error."""
    {"info": pb_utils.Logger.log_info, "warn": pb_utils.Logger.log_warn, "error": pb_utils.Logger.log_error}[
        level
    ](message)


class Metrics:
    """Triton metric families from specs (``name``, ``description``, ``kind``, ``buckets``), and
    observations (``metric``, ``value``, ``labels``) applied to them; every series also carries
    ``labels`` (model, instance)."""

    def __init__(self, specs: Iterable[Any], labels: dict[str, str]) -> None:
        self.specs = {spec.name: spec for spec in specs}
        self.labels = labels
        self.families = {
            spec.name: pb_utils.MetricFamily(
                spec.name, spec.description, getattr(pb_utils.MetricFamily, spec.kind.upper())
            )
            for spec in self.specs.values()
        }
        self._series: dict[tuple, Any] = {}

    def record(self, observations: Iterable[Any]) -> None:
        for observation in observations:
            key = (observation.metric, observation.labels)
            spec = self.specs[observation.metric]
            if key not in self._series:
                labels = {**self.labels, **dict(observation.labels)}
                buckets = {"buckets": list(spec.buckets)} if spec.buckets else {}
                self._series[key] = self.families[observation.metric].Metric(labels=labels, **buckets)
            series = self._series[key]
            if spec.kind == "counter":
                series.increment(observation.value)
            elif spec.kind == "gauge":
                series.set(observation.value)
            else:
                series.observe(observation.value)


class ModelCallError(RuntimeError):
    """A model called through BLS answered with an error."""


def call_model(model: str, inputs: dict, output: str):  # -> torch.Tensor
    """``model``'s output ``output`` for ``inputs`` (name -> torch tensor), through BLS, in CPU
    memory: a BLS output otherwise stays on the device its model produced it on (a TensorRT
    engine's GPU; python_backend README, "Business Logic Scripting")."""
    import torch

    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=[output],
        inputs=[pb_utils.Tensor.from_dlpack(name, tensor.contiguous()) for name, tensor in inputs.items()],
        preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
    )
    response = request.exec()
    if response.has_error():
        raise ModelCallError(f"{model}: {response.error().message()}")
    return torch.from_dlpack(pb_utils.get_output_tensor_by_name(response, output).to_dlpack())
