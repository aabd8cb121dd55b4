"""Triton glue for the UNet stage: Triton tensors in and out; the work is in distrifusion.serving."""

import json
import os

import triton_python_backend_utils as pb_utils

from distrifusion.serving.metrics import METRICS, failure_kind, observations
from distrifusion.serving.unet_stage import INPUTS, UNetStage

# Names, not values: pb_utils gains TritonError and MetricFamily only after the stub starts, and
# the stub also imports this file earlier (for config auto-complete).
_ERROR_CODES = {"invalid_argument": "INVALID_ARG", "cancelled": "CANCELLED", "internal": "INTERNAL"}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.stage = UNetStage.load(
            json.loads(args["model_config"]),
            os.path.join(args["model_repository"], args["model_version"]),
            args["model_instance_name"],
        )
        self.instance_labels = {"model": args["model_name"], "instance": args["model_instance_name"]}
        self.specs = {spec.name: spec for spec in METRICS}
        self.families = {
            spec.name: pb_utils.MetricFamily(
                spec.name, spec.description, getattr(pb_utils.MetricFamily, spec.kind.upper())
            )
            for spec in METRICS
        }
        self.metrics = {}
        self._record(observations([], [], self.stage.group.live_ranks))

    def execute(self, requests: list) -> list:
        inputs = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            inputs.append(
                {name: None if tensor is None else tensor.as_numpy() for name, tensor in tensors.items()}
            )
        outcomes = self.stage.run(inputs, [request.is_cancelled for request in requests])
        self._record(observations(self.stage.take_steps(), outcomes, self.stage.group.live_ranks))
        return [_response(outcome) for outcome in outcomes]

    def is_ready(self) -> bool:
        return self.stage.ready

    def finalize(self) -> None:
        self.stage.close()

    def _record(self, added: list) -> None:
        for observation in added:
            key = (observation.metric, observation.labels)
            if key not in self.metrics:
                spec = self.specs[observation.metric]
                labels = {**self.instance_labels, **dict(observation.labels)}
                buckets = {"buckets": list(spec.buckets)} if spec.buckets else {}
                self.metrics[key] = self.families[observation.metric].Metric(labels=labels, **buckets)
            metric, kind = self.metrics[key], self.specs[observation.metric].kind
            if kind == "counter":
                metric.increment(observation.value)
            elif kind == "gauge":
                metric.set(observation.value)
            else:
                metric.observe(observation.value)


def _response(outcome: object) -> "pb_utils.InferenceResponse":
    kind = failure_kind(outcome)
    if kind is not None:
        message = str(outcome) if kind != "internal" else f"unet: {outcome}"
        code = getattr(pb_utils.TritonError, _ERROR_CODES[kind])
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code))
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("latents", outcome.latents), pb_utils.Tensor("seed", outcome.seeds)]
    )
