"""The GPU check's served request: builds a repository of the tiny model for this machine, starts
tritonserver on it (scripts/triton_server.sh, with SERVING_PYTHON), sends one request over HTTP with
the standard library (clients/rest_request.py) and writes the image.

    python scripts/gpu_served_request.py MODEL_DIR WORK_DIR OUTPUT_PNG

With TensorRT the repository is the gpu target's (TensorRT engines, the UNet on every GPU); without
it, ONNX Runtime runs the text encoders and the VAE on the CPU and the UNet still runs on GPU 0, with
CUDA graphs.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

from PIL import Image

from build_engines.build import main as build
from clients.rest_request import infer
from distrifusion.serving.cpu_server import CpuServer

SIZE, STEPS = 512, 8


def main(model_dir: Path, work: Path, image_path: Path) -> int:
    repository = work / "repository"
    tensorrt = importlib.util.find_spec("tensorrt") is not None
    target = ["--target", "gpu"] if tensorrt else ["--target", "cpu", "--unet-gpus", "0"]
    flags = ["--model", str(model_dir), "--output", str(repository), *target, "--force"]
    flags += ["--max-resolution", f"{SIZE}x{SIZE}", "--batch-sizes", "1"]
    started = time.monotonic()
    if build(flags) != 0:
        return 1
    print(f"repository ({' '.join(target)}) built in {time.monotonic() - started:.0f} s", flush=True)
    started = time.monotonic()
    with CpuServer(repository, work / "server.log") as server:
        print(f"server ready in {time.monotonic() - started:.0f} s", flush=True)
        result = infer(server.http, prompt="a red circle on a blue background", seed=7, height=SIZE,
                       width=SIZE, num_inference_steps=STEPS, timeout=300)  # fmt: skip
        print(server.log_tail(3000))
    image = result.pop("image")
    Image.fromarray(image).save(image_path)
    spread = float(image.std())
    print(json.dumps({**result, "image": str(image_path), "pixel_std": spread}))
    if image.shape != (SIZE, SIZE, 3) or spread == 0.0:
        print(f"error: the image is {image.shape} with a pixel spread of {spread}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(*(Path(argument) for argument in sys.argv[1:4])))
