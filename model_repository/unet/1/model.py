"""Triton glue for the UNet stage: Triton tensors in and out; the work is in distrifusion.serving."""

import json
import os

import triton_python_backend_utils as pb_utils
from triton_glue import Metrics, error_response, log, output_tensor

from distrifusion.serving.faults import event_log
from distrifusion.serving.metrics import (
    METRICS,
    event_observations,
    failure_kind,
    initial_observations,
    observations,
)
from distrifusion.serving.unet_stage import INPUTS, UNetStage


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.metrics = Metrics(
            METRICS, {"model": args["model_name"], "instance": args["model_instance_name"]}
        )
        self.stage = UNetStage.load(
            json.loads(args["model_config"]),
            os.path.join(args["model_repository"], args["model_version"]),
            args["model_instance_name"],
            self._event,
        )
        group = self.stage.group
        self.metrics.record(initial_observations(group.live_ranks, group.state))

    def _event(self, kind: str, **details) -> None:
        # From the group's watchdog and rebuild threads too, as things happen.
        line = event_log(kind, details)
        if line is not None:
            log(*line)
        if hasattr(self, "stage"):
            self.metrics.record(event_observations(kind, details))

    def execute(self, requests: list) -> list:
        inputs = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            inputs.append(
                {name: None if tensor is None else tensor.as_numpy() for name, tensor in tensors.items()}
            )
        outcomes = self.stage.run(inputs, [request.is_cancelled for request in requests])
        self.metrics.record(observations(self.stage.take_steps(), outcomes))
        return [_response(outcome) for outcome in outcomes]

    def finalize(self) -> None:
        self.stage.close()


def _response(outcome: object) -> "pb_utils.InferenceResponse":
    kind = failure_kind(outcome)
    if kind is not None:
        return error_response(str(outcome) if kind != "internal" else f"unet: {outcome}", kind)
    return pb_utils.InferenceResponse(
        output_tensors=[output_tensor("latents", outcome.latents), output_tensor("seed", outcome.seeds)]
    )
