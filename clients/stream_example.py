"""Streamed progress in a few lines: the sdxl_stream model over a gRPC stream, a preview every 4
steps, the final image."""

import queue

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

client = grpcclient.InferenceServerClient("localhost:8001")
inputs = []
for name, value, datatype in (
    ("prompt", b"a red circle on a blue background", "BYTES"),
    ("preview_every", 4, "INT32"),
):
    tensor = grpcclient.InferInput(name, [1, 1], datatype)
    tensor.set_data_from_numpy(np.array([[value]], dtype=np.object_ if datatype == "BYTES" else np.int32))
    inputs.append(tensor)
responses = queue.Queue()
client.start_stream(callback=lambda result, error: responses.put((result, error)))
client.async_stream_infer("sdxl_stream", inputs)
while True:
    result, error = responses.get()
    if error is not None:
        raise error
    if result.as_numpy("image") is not None:  # the final response
        Image.fromarray(result.as_numpy("image")[0]).save("circle.png")
        break
    step, total = result.as_numpy("step")[0, 0], result.as_numpy("total_steps")[0, 0]
    print(f"step {step}/{total}")
    if result.as_numpy("preview") is not None:
        Image.fromarray(result.as_numpy("preview")[0]).save(f"preview_{step:02d}.png")
client.stop_stream()
print("-> circle.png")
