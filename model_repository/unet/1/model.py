"""Triton glue for the UNet stage: Triton tensors in and out; the work is in distrifusion.serving."""

import json
import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from triton_glue import Metrics, call_model, error_response, log, output_tensor

from distrifusion.serving.faults import event_log
from distrifusion.serving.metrics import (
    METRICS,
    event_observations,
    failure_kind,
    initial_observations,
    observations,
)
from distrifusion.serving.unet_stage import INPUTS, UNetStage


class VaeStages:
    """The VAE stages through BLS, for image-to-image and two-pass requests (the stage's ImageCodec)."""

    def encode(self, images: np.ndarray, height: int, width: int) -> np.ndarray:
        rows = images.shape[0]
        inputs = {
            "image": torch.from_numpy(np.ascontiguousarray(images)),
            "height": torch.full((rows, 1), height, dtype=torch.int32),
            "width": torch.full((rows, 1), width, dtype=torch.int32),
        }
        return call_model("vae_encoder", inputs, "moments").numpy()

    def decode(self, latents: np.ndarray) -> np.ndarray:
        return call_model("vae_decoder", {"latents": torch.from_numpy(latents)}, "image").numpy()


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
        outcomes = self.stage.run(inputs, [request.is_cancelled for request in requests], VaeStages())
        self.metrics.record(observations(self.stage.take_steps(), outcomes, self.stage.take_passes()))
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
