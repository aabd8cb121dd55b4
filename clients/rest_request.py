"""One request to the `sdxl` ensemble over Triton's HTTP/REST API (KServe v2, JSON), with the Python
standard library and numpy alone: for machines without tritonclient (a lent GPU machine's check, a
bare container).

    python clients/rest_request.py --url localhost:8000 --prompt "a lighthouse at dawn" --seed 42 \\
        --output lighthouse.png

Fields left out take the server's defaults (the model's native size, 30 steps, a random seed).
Prints the latency, the seed used and whether the prompt was cut at CLIP's 77 tokens, as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from typing import Any

import numpy as np

_FIELDS = {  # request field -> (Triton data type, Python type)
    "prompt": ("BYTES", str),
    "negative_prompt": ("BYTES", str),
    "height": ("INT32", int),
    "width": ("INT32", int),
    "num_inference_steps": ("INT32", int),
    "guidance_scale": ("FP32", float),
    "seed": ("INT64", int),
    "scheduler": ("BYTES", str),
}
OUTPUTS = ("image", "used_seed", "truncated")


class RequestFailed(RuntimeError):
    """The server answered with an error (its status and message)."""


def infer(url: str, timeout: float = 600.0, model: str = "sdxl", **fields: Any) -> dict[str, Any]:
    """One image; returns ``image`` (uint8 [H, W, 3]), ``seed``, ``truncated`` and ``seconds``."""
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"{unknown[0]}: not an input of the sdxl ensemble; known: {', '.join(_FIELDS)}")
    inputs = [
        {"name": name, "shape": [1, 1], "datatype": _FIELDS[name][0], "data": [_FIELDS[name][1](value)]}
        for name, value in fields.items()
        if value is not None
    ]
    body = {"inputs": inputs, "outputs": [{"name": name} for name in OUTPUTS]}
    request = urllib.request.Request(
        f"http://{url}/v2/models/{model}/infer",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read())
    except urllib.error.HTTPError as error:
        with error:
            raise RequestFailed(f"HTTP {error.code}: {error.read().decode(errors='replace')}") from None
    seconds = time.perf_counter() - started
    outputs = {output["name"]: output for output in answer["outputs"]}
    image = outputs["image"]
    return {
        "image": np.asarray(image["data"], dtype=np.uint8).reshape(image["shape"])[0],
        "seed": int(outputs["used_seed"]["data"][0]),
        "truncated": bool(outputs["truncated"]["data"][0]),
        "seconds": seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="localhost:8000", help="host:port of Triton's HTTP endpoint")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt")
    parser.add_argument("--height", type=int)
    parser.add_argument("--width", type=int)
    parser.add_argument("--steps", type=int, dest="num_inference_steps")
    parser.add_argument("--guidance", type=float, dest="guidance_scale")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--scheduler")
    parser.add_argument("--output", required=True, help="the PNG to write")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default %(default)s)")
    args = vars(parser.parse_args(argv))
    url, output, timeout = args.pop("url"), args.pop("output"), args.pop("timeout")
    try:
        result = infer(url, timeout=timeout, **args)
    except RequestFailed as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    from PIL import Image

    Image.fromarray(result.pop("image")).save(output)
    print(json.dumps({**result, "image": output}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
