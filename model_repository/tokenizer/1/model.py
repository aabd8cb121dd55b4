"""Triton Python-backend glue for SDXL's two tokenizers (the logic: distrifusion.serving.tokenize).

Loads ``tokenizer/`` and ``tokenizer_2/`` from this version folder (``build_engines`` copies
them from the model). A bad request (missing or blank prompt, text that is not UTF-8) gets an
INVALID_ARG error naming the field; the model keeps serving.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from distrifusion.serving.tokenize import SDXLTokenizers, TokenizeError


def output_tensor(name: str, array: np.ndarray) -> pb_utils.Tensor:
    """A response tensor, passed by DLPack through torch: the Python-backend stub of tritonserver
    2.51 (built against numpy 1) writes empty buffers for ``pb_utils.Tensor(name, ndarray)`` when
    numpy 2 is installed; this path works with either numpy."""
    return pb_utils.Tensor.from_dlpack(name, torch.from_numpy(np.ascontiguousarray(array)))


def _invalid(message: str) -> pb_utils.TritonError:
    code = getattr(pb_utils.TritonError, "INVALID_ARG", None)
    return pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        self.tokenizers = SDXLTokenizers.from_pretrained(Path(__file__).resolve().parent)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            prompt = pb_utils.get_input_tensor_by_name(request, "prompt")
            negative = pb_utils.get_input_tensor_by_name(request, "negative_prompt")
            try:
                batch = self.tokenizers.encode_tensors(
                    None if prompt is None else prompt.as_numpy(),
                    None if negative is None else negative.as_numpy(),
                )
            except TokenizeError as err:
                responses.append(pb_utils.InferenceResponse(error=_invalid(str(err))))
                continue
            tensors = [output_tensor(name, array) for name, array in batch.as_dict().items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
