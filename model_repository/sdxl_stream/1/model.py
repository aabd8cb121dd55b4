"""Triton glue for the decoupled ``sdxl_stream`` model: requests, BLS calls and responses; the
work is in distrifusion.serving.stream.

Each request runs on its own thread (a decoupled model's execute() returns at once) and gets one
response per denoising step (``step``, ``total_steps``, and ``preview`` every ``preview_every``
steps), then a final one with the ensemble's outputs (``image``, ``used_seed``, ``truncated``), or
a final error response. At most ``max_active_streams`` (a parameter of this model's config) run at
once; one more is refused with UNAVAILABLE before any work.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils
from triton_glue import Metrics, error_response, log, output_tensor

from distrifusion.serving.progress_channel import StepMessage, stream_directory
from distrifusion.serving.stream import (
    METRICS,
    StepFailed,
    StreamPlan,
    StreamRunner,
    active_observations,
    finished_observations,
    initial_observations,
    message_observations,
    refused_message,
)

# TritonError code names -> failure kinds; a code this Triton lacks is skipped. (tritonserver 2.51's
# BLS hands every composing model's error back as INTERNAL, whatever its code, measured on the CPU
# server: the message is passed on unchanged, and gRPC streams carry only that anyway.)
_KINDS = {"INVALID_ARG": "invalid_argument", "CANCELLED": "cancelled", "UNAVAILABLE": "unavailable"}


def _tensor(name: str, value: object) -> pb_utils.Tensor:
    """``value`` (a BLS output, a request's input, or a numpy array) as a tensor called ``name``.
    A GPU tensor (a TensorRT engine's output) stays on its GPU; strings travel as numpy objects,
    which DLPack cannot carry."""
    if isinstance(value, np.ndarray):
        array = value
    elif not value.is_cpu():
        return pb_utils.Tensor.from_dlpack(name, value.to_dlpack())
    else:
        array = value.as_numpy()
    return pb_utils.Tensor(name, array) if array.dtype == object else output_tensor(name, array)


def _infer(model: str, inputs: dict, outputs: list[str]) -> dict:
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=outputs,
        inputs=[_tensor(name, value) for name, value in inputs.items()],
    )
    response = request.exec()
    if response.has_error():
        failure = response.error()
        kinds = {getattr(pb_utils.TritonError, name, None): kind for name, kind in _KINDS.items()}
        raise StepFailed(failure.message(), kinds.get(failure.code(), "internal"))
    return {name: pb_utils.get_output_tensor_by_name(response, name) for name in outputs}


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        parameters = json.loads(args["model_config"]).get("parameters", {})
        self.max_active = int(parameters["max_active_streams"]["string_value"])
        self.runner = StreamRunner(
            StreamPlan.load(Path(__file__).resolve().parent), _infer, stream_directory(os.getppid())
        )
        self.metrics = Metrics(
            METRICS, {"model": args["model_name"], "instance": args["model_instance_name"]}
        )
        self.metrics.record(initial_observations())
        self._active = 0
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()

    def _send(self, sender: object, response: object = None, flags: int = 0) -> None:
        # One send at a time: tritonserver 2.51 crashed (SIGSEGV, or SIGABRT from a
        # boost::interprocess::lock_exception) when 12 cancelled streams sent their final flags from
        # their threads at once (measured on the CPU server; 5 did not).
        with self._send_lock:
            sender.send(response, flags=flags)

    def execute(self, requests: list) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        for request in requests:
            sender = request.get_response_sender()
            with self._lock:
                admitted = self._active < self.max_active
                self._active += admitted
                active = self._active
            if not admitted:
                self._send(sender, error_response(refused_message(self.max_active), "unavailable"), final)
                self.metrics.record(finished_observations("refused", active))
                continue
            self.metrics.record(active_observations(active))
            threading.Thread(
                target=self._serve, args=(request, sender, time.monotonic()), name="sdxl_stream", daemon=True
            ).start()

    def _serve(self, request: pb_utils.InferenceRequest, sender: object, arrived: float) -> None:
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        inputs = {tensor.name(): tensor for tensor in request.inputs()}
        rows = next(iter(inputs.values())).shape()[0]
        sent = []

        def on_message(message: StepMessage) -> None:
            tensors = [
                output_tensor("step", np.full((rows, 1), message.step, dtype=np.int32)),
                output_tensor("total_steps", np.full((rows, 1), message.total, dtype=np.int32)),
            ]
            if message.preview is not None:
                tensors.append(output_tensor("preview", message.preview))
            self._send(sender, pb_utils.InferenceResponse(output_tensors=tensors))
            self.metrics.record(message_observations(message, None if sent else time.monotonic() - arrived))
            sent.append(message.step)

        outcome = "success"
        try:
            outputs = self.runner.run(inputs, rows, on_message, request.is_cancelled)
            tensors = [_tensor(name, value) for name, value in outputs.items()]
            self._send(sender, pb_utils.InferenceResponse(output_tensors=tensors), flags=final)
        except StepFailed as failure:
            outcome = "cancelled" if failure.kind == "cancelled" else "failed"
            if outcome == "cancelled":
                self._send(sender, flags=final)
            else:
                self._send(sender, error_response(str(failure), failure.kind), flags=final)
        except Exception as failure:  # this stream fails; the model keeps serving
            outcome = "failed"
            log("error", f"sdxl_stream: {type(failure).__name__}: {failure}")
            self._send(sender, error_response(f"sdxl_stream: {failure}"), flags=final)
        finally:
            with self._lock:
                self._active -= 1
                active = self._active
            self.metrics.record(finished_observations(outcome, active))
