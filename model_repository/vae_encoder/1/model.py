"""Triton glue for the VAE encoder stage: Triton tensors in and out, engine models called through
BLS; the work is in distrifusion.serving.vae_stage and distrifusion.vae.encode.

The UNet stage calls this model (through BLS) for image-to-image and two-pass requests; it and its
engines (vae_encoder_whole, vae_encoder_tile_statistics, vae_encoder_tiles) are no part of the
ensemble, so the server's command names them (--load-model).
"""

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from triton_glue import Metrics, call_model, error_response, log, output_tensor

from distrifusion.serving.vae_stage import (
    ENCODER_METRICS,
    VaeEncoderStage,
    initial_observations,
    log_line,
    observations,
)
from distrifusion.vae.decode import DecodeTooLarge
from distrifusion.vae.encode import ENCODER_ENGINE_OUTPUTS


def _run(model: str, inputs: dict) -> torch.Tensor:
    return call_model(model, inputs, ENCODER_ENGINE_OUTPUTS[model])


def _size(request: object, name: str) -> int:
    values = np.unique(pb_utils.get_input_tensor_by_name(request, name).as_numpy())
    if values.size != 1:
        raise ValueError(f"{name}: one value for every image of a request, got {values.tolist()}")
    return int(values[0])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.stage = VaeEncoderStage.load(Path(__file__).resolve().parent, _run)
        self.scale = self.stage.encoder.settings.footprint.scale_factor
        self.metrics = Metrics(
            ENCODER_METRICS, {"model": args["model_name"], "instance": args["model_instance_name"]}
        )
        self.metrics.record(initial_observations(ENCODER_METRICS))

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            images = pb_utils.get_input_tensor_by_name(request, "image").as_numpy()
            try:
                moments, records = self.stage.encode(
                    images, _size(request, "height"), _size(request, "width")
                )
            except (DecodeTooLarge, ValueError) as error:
                responses.append(error_response(str(error), "invalid_argument"))
                continue
            except Exception as error:  # an engine's failure fails this request, not the stage
                responses.append(error_response(f"vae_encoder: {error}"))
                continue
            self.metrics.record(observations(records, ENCODER_METRICS))
            for record in records:
                line = log_line(record, self.scale, "encode")
                if line is not None:
                    log("info", line)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output_tensor("moments", moments)]))
        return responses
