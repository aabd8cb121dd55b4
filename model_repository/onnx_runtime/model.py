"""Generic Triton Python-backend model running ``model.onnx`` (beside this file) with ONNX Runtime.

The CPU target of ``build_engines`` serves ``text_encoder``, ``text_encoder_2`` and
``vae_decoder`` with this file instead of TensorRT engines: same tensor names, same types, the
batch dimension included (config ``max_batch_size`` > 0), so the ensemble does not change.

Triton tensors map to ONNX Runtime inputs and outputs by name. Requests whose inputs have the
same per-request shape are concatenated into one ONNX Runtime call and split again.

Config parameters (all optional): ``onnx_file`` (default ``model.onnx``, relative to this
file's folder), ``intra_op_num_threads`` (default 0: ONNX Runtime's choice).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils
from triton_glue import error_response, output_tensor

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        self.model_name = config["name"]
        path = Path(__file__).resolve().parent / (params.get("onnx_file") or "model.onnx")
        options = ort.SessionOptions()
        # As distrifusion.export.onnx_export.ort_session (the memory the VAE stage budgets for was
        # measured with it): the priority-based order halves the tile-statistics graph's peak, and
        # without the memory pattern a shape's second call does not allocate its peak again.
        options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
        options.enable_mem_pattern = False
        threads = int(params.get("intra_op_num_threads") or 0)
        if threads > 0:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name: _ORT_TYPES[i.type] for i in self.session.get_inputs()}
        self.outputs = [o["name"] for o in config["output"]]
        config_inputs = {i["name"] for i in config["input"]}
        graph_outputs = {o.name for o in self.session.get_outputs()}
        if config_inputs != set(self.inputs) or not set(self.outputs) <= graph_outputs:
            raise pb_utils.TritonModelException(
                f"{self.model_name}: config tensors (inputs {sorted(config_inputs)}, outputs "
                f"{sorted(self.outputs)}) do not match {path.name} (inputs {sorted(self.inputs)}, "
                f"outputs {sorted(graph_outputs)})"
            )

    def _feeds(self, request: pb_utils.InferenceRequest) -> dict[str, np.ndarray]:
        feeds = {}
        for name, dtype in self.inputs.items():
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise ValueError(f"{self.model_name}: input {name} is missing")
            feeds[name] = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
        return feeds

    def execute(self, requests: list) -> list:
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[tuple[int, dict[str, np.ndarray]]]] = {}
        for index, request in enumerate(requests):
            try:
                feeds = self._feeds(request)
            except ValueError as err:
                responses[index] = error_response(str(err), "invalid_argument")
                continue
            key = tuple((name, feeds[name].shape[1:]) for name in self.inputs)
            groups.setdefault(key, []).append((index, feeds))
        for members in groups.values():
            sizes = [next(iter(feeds.values())).shape[0] for _, feeds in members]
            batch = {name: np.concatenate([feeds[name] for _, feeds in members]) for name in self.inputs}
            try:
                results = self.session.run(self.outputs, batch)
            except Exception as err:  # an ONNX Runtime failure fails these requests, not the server
                for index, _ in members:
                    responses[index] = error_response(f"{self.model_name}: {err}")
                continue
            splits = np.cumsum(sizes)[:-1]
            parts = [np.split(result, splits) for result in results]
            for k, (index, _) in enumerate(members):
                tensors = [
                    output_tensor(name, part[k]) for name, part in zip(self.outputs, parts, strict=True)
                ]
                responses[index] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def finalize(self) -> None:
        self.session = None
