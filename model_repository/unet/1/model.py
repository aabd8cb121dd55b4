"""Triton glue for the UNet stage: Triton tensors in and out; the work is in distrifusion.serving."""

import json
import os

import triton_python_backend_utils as pb_utils

from distrifusion.config import ConfigError
from distrifusion.serving.unet_stage import INPUTS, Cancelled, UNetStage


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        parameters = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        version_directory = os.path.join(args["model_repository"], args["model_version"])
        self.stage = UNetStage.from_parameters(parameters, version_directory, args["model_instance_name"])

    def execute(self, requests: list) -> list:
        inputs = []
        for request in requests:
            tensors = {name: pb_utils.get_input_tensor_by_name(request, name) for name in INPUTS}
            inputs.append(
                {name: None if tensor is None else tensor.as_numpy() for name, tensor in tensors.items()}
            )
        outcomes = self.stage.run(inputs, [request.is_cancelled for request in requests])
        return [_response(outcome) for outcome in outcomes]

    def is_ready(self) -> bool:
        return self.stage.ready

    def finalize(self) -> None:
        self.stage.close()


def _response(outcome: object) -> "pb_utils.InferenceResponse":
    if isinstance(outcome, ConfigError):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(outcome), pb_utils.TritonError.INVALID_ARG)
        )
    if isinstance(outcome, Cancelled):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(str(outcome), pb_utils.TritonError.CANCELLED)
        )
    if isinstance(outcome, Exception):
        return pb_utils.InferenceResponse(
            error=pb_utils.TritonError(f"unet: {outcome}", pb_utils.TritonError.INTERNAL)
        )
    return pb_utils.InferenceResponse(
        output_tensors=[pb_utils.Tensor("latents", outcome.latents), pb_utils.Tensor("seed", outcome.seeds)]
    )
