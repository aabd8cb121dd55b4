"""Requests straight to the unet model, as the ensemble and sdxl_stream send them."""

from __future__ import annotations

import numpy as np
import tritonclient.grpc as grpcclient


def unet_inputs(steps: int, **extra: np.ndarray) -> list:
    """A request straight to the unet model (what the ensemble sends it), with zero encodings."""
    shapes = {"hidden_states_1": (1, 77, 32), "hidden_states_2": (1, 77, 64), "text_embeds": (1, 64)}
    arrays = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    arrays.update({f"negative_{name}": array for name, array in arrays.items()})
    arrays["negative_given"] = np.array([[False]])
    arrays.update({"height": np.array([[512]], np.int32), "width": np.array([[512]], np.int32)})
    arrays["num_inference_steps"] = np.array([[steps]], np.int32)
    arrays.update(extra)
    inputs = []
    for name, array in arrays.items():
        datatype = {np.float32: "FP32", np.int32: "INT32", np.bool_: "BOOL", np.object_: "BYTES"}[
            array.dtype.type
        ]
        infer_input = grpcclient.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        inputs.append(infer_input)
    return inputs
