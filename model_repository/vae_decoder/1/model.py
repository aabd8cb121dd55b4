"""Triton glue for the VAE stage: Triton tensors in and out, engine models called through BLS; the
work is in distrifusion.serving.vae_stage and distrifusion.vae.

The engine models (vae_decoder_whole, vae_decoder_tile_statistics, vae_decoder_tiles) are no part
of the ensemble, so explicit model control does not load them with it: the server's command names
them (--load-model). The model-loading API cannot do it from initialize(): while the server starts
it answers "Server not ready".
"""

from pathlib import Path

import torch
import triton_python_backend_utils as pb_utils
from triton_glue import Metrics, call_model, error_response, log, output_tensor

from distrifusion.serving.vae_stage import METRICS, VaeStage, initial_observations, log_line, observations
from distrifusion.vae.decode import ENGINE_OUTPUTS, DecodeTooLarge


def _run(model: str, inputs: dict) -> torch.Tensor:
    # This stage blends and quantises on the CPU.
    return call_model(model, inputs, ENGINE_OUTPUTS[model])


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.stage = VaeStage.load(Path(__file__).resolve().parent, _run)
        self.scale = self.stage.decoder.settings.footprint.scale_factor
        self.metrics = Metrics(
            METRICS, {"model": args["model_name"], "instance": args["model_instance_name"]}
        )
        self.metrics.record(initial_observations())

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            latents = pb_utils.get_input_tensor_by_name(request, "latents").as_numpy()
            try:
                images, records = self.stage.decode(latents)
            except DecodeTooLarge as error:
                responses.append(error_response(str(error), "invalid_argument"))
                continue
            except Exception as error:  # an engine's failure fails this request, not the stage
                responses.append(error_response(f"vae_decoder: {error}"))
                continue
            self.metrics.record(observations(records))
            for record in records:
                line = log_line(record, self.scale)
                if line is not None:
                    log("info", line)
            responses.append(pb_utils.InferenceResponse(output_tensors=[output_tensor("image", images)]))
        return responses
