"""The smallest useful client: one prompt over gRPC, one PNG out."""

import numpy as np
import tritonclient.grpc as grpcclient
from PIL import Image

client = grpcclient.InferenceServerClient("localhost:8001")
prompt = grpcclient.InferInput("prompt", [1, 1], "BYTES")
prompt.set_data_from_numpy(np.array([[b"a green square on a white background"]], dtype=np.object_))
seed = grpcclient.InferInput("seed", [1, 1], "INT64")
seed.set_data_from_numpy(np.array([[42]], dtype=np.int64))
result = client.infer("sdxl", [prompt, seed])
Image.fromarray(result.as_numpy("image")[0]).save("square.png")
print("seed", result.as_numpy("used_seed")[0, 0], "-> square.png")
