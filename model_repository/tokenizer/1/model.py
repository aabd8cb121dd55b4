"""Triton Python-backend glue for SDXL's two tokenizers (the logic: distrifusion.serving.tokenize).

Loads ``tokenizer/`` and ``tokenizer_2/`` from this version folder (``build_engines`` copies
them from the model). A bad request (missing or blank prompt, text that is not UTF-8 or longer than
distrifusion.serving.tokenize.MAX_TEXT_BYTES) gets an INVALID_ARG error naming the field, before
any tokenization; the model keeps serving.
"""

from __future__ import annotations

from pathlib import Path

import triton_python_backend_utils as pb_utils
from triton_glue import error_response, output_tensor

from distrifusion.serving.tokenize import SDXLTokenizers, TokenizeError


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
                responses.append(error_response(str(err), "invalid_argument"))
                continue
            tensors = [output_tensor(name, array) for name, array in batch.as_dict().items()]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
