"""Command-line client of the `sdxl` ensemble over gRPC or HTTP: prompt in, PNG files out.

    python clients/sdxl_client.py --prompt "a lighthouse at dawn" --seed 42 --protocol grpc
    python clients/sdxl_client.py --prompt "a lighthouse at dawn" --stream --preview-every 5
    python clients/sdxl_client.py --prompt "a lighthouse at dawn" --image sketch.png --strength 0.6
    python clients/sdxl_client.py --prompt "a lighthouse at dawn" --first-pass 1024x1024 \
        --width 2048 --height 2048

Prints the latency, the seed of every image (drawn by the server when not given) and whether a
prompt was cut at CLIP's 77 tokens. ``--stream`` asks the decoupled `sdxl_stream` model over a gRPC
stream instead: a progress bar (steps, rate, time left) on the terminal, and the step previews
written as PNGs beside the image. (HTTP cannot receive a decoupled model's responses: Triton's
``generate_stream`` endpoint is JSON-only and provisional, so streaming is gRPC only.)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import queue
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image
from tritonclient.utils import InferenceServerException

DEFAULT_URLS = {"grpc": "localhost:8001", "http": "localhost:8000"}
OUTPUTS = ("image", "used_seed", "truncated")
QUEUE_FULL = "Exceeds maximum queue size"
"""Triton's message when the UNet stage's queue is at its bound (gRPC UNAVAILABLE, HTTP 503)."""


def queue_full(error: InferenceServerException) -> bool:
    """The server refused the request at once because its queue is full: retrying later (with
    backoff), or on another replica, is the remedy; the request itself was fine."""
    return QUEUE_FULL in (error.message() or "")


def build_inputs(
    module: Any,
    prompts: list[str],
    negative_prompts: list[str] | None = None,
    height: int | None = None,
    width: int | None = None,
    num_inference_steps: int | None = None,
    guidance_scale: float | None = None,
    seeds: list[int] | None = None,
    scheduler: str | None = None,
    input_image: np.ndarray | None = None,
    strength: float | None = None,
    first_pass_size: tuple[int, int] | None = None,
) -> list[Any]:
    """The ensemble's inputs for a batch of prompts; fields left None take the server's defaults.
    ``input_image``: uint8 ``[h, w, 3]`` for every prompt (or ``[rows, h, w, 3]``), image-to-image;
    ``first_pass_size``: ``(height, width)`` of a two-pass request's first pass."""
    rows = len(prompts)

    def array_input(name: str, array: np.ndarray, datatype: str) -> Any:
        array = np.ascontiguousarray(array)
        infer_input = module.InferInput(name, list(array.shape), datatype)
        infer_input.set_data_from_numpy(array)
        return infer_input

    def tensor(name: str, values: list, datatype: str, dtype: Any) -> Any:
        return array_input(name, np.array(values, dtype=dtype).reshape(rows, 1), datatype)

    def text(values: list[str]) -> list[bytes]:
        return [value.encode("utf-8") for value in values]

    inputs = [tensor("prompt", text(prompts), "BYTES", np.object_)]
    if negative_prompts is not None:
        inputs.append(tensor("negative_prompt", text(negative_prompts), "BYTES", np.object_))
    for name, value, datatype, dtype in (
        ("height", height, "INT32", np.int32),
        ("width", width, "INT32", np.int32),
        ("num_inference_steps", num_inference_steps, "INT32", np.int32),
        ("guidance_scale", guidance_scale, "FP32", np.float32),
    ):
        if value is not None:
            inputs.append(tensor(name, [value] * rows, datatype, dtype))
    if seeds is not None:
        inputs.append(tensor("seed", seeds, "INT64", np.int64))
    if scheduler is not None:
        inputs.append(tensor("scheduler", text([scheduler] * rows), "BYTES", np.object_))
    if strength is not None:
        inputs.append(tensor("strength", [strength] * rows, "FP32", np.float32))
    if input_image is not None:
        if input_image.ndim == 3:
            input_image = np.broadcast_to(input_image, (rows, *input_image.shape))
        inputs.append(array_input("input_image", input_image, "UINT8"))
    if first_pass_size is not None:
        sizes = np.tile(np.array(first_pass_size, dtype=np.int32), (rows, 1))
        inputs.append(array_input("first_pass_size", sizes, "INT32"))
    return inputs


def generate(
    url: str, protocol: str = "grpc", model: str = "sdxl", timeout: float = 600.0, **fields: Any
) -> dict:
    """Sends one request; returns ``images`` (uint8 [rows, H, W, 3]), ``seeds``, ``truncated``, ``seconds``."""
    module = grpcclient if protocol == "grpc" else httpclient
    if protocol == "grpc":
        client = grpcclient.InferenceServerClient(url)
        options = {"client_timeout": timeout}
    else:
        client = httpclient.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)
        options = {}
    outputs = [module.InferRequestedOutput(name) for name in OUTPUTS]
    started = time.perf_counter()
    try:
        result = client.infer(model, build_inputs(module, **fields), outputs=outputs, **options)
    finally:
        client.close()
    return _outputs(result, time.perf_counter() - started)


def _outputs(result: Any, seconds: float) -> dict:
    """The final response's tensors, as :func:`generate` and :func:`stream` return them."""
    return {
        "images": result.as_numpy("image"),
        "seeds": result.as_numpy("used_seed").reshape(-1).tolist(),
        "truncated": result.as_numpy("truncated").reshape(-1).tolist(),
        "seconds": seconds,
    }


@dataclasses.dataclass
class StepUpdate:
    step: int
    total: int
    preview: np.ndarray | None
    """uint8 ``[rows, h, w, 3]`` on the steps that carry one."""


def stream(
    url: str,
    model: str = "sdxl_stream",
    timeout: float = 600.0,
    preview_every: int | None = None,
    preview_size: int | None = None,
    on_step: Callable[[StepUpdate], bool | None] | None = None,
    **fields: Any,
) -> dict | None:
    """Sends one request to the decoupled model over a gRPC stream; ``on_step`` gets each step's
    update and may return True to cancel (then None is returned). Otherwise as :func:`generate`."""
    client = grpcclient.InferenceServerClient(url)
    responses: queue.Queue = queue.Queue()
    inputs = build_inputs(grpcclient, **fields)
    rows = len(fields["prompts"])
    for name, value in (("preview_every", preview_every), ("preview_size", preview_size)):
        if value is not None:
            extra = grpcclient.InferInput(name, [rows, 1], "INT32")
            extra.set_data_from_numpy(np.full((rows, 1), value, dtype=np.int32))
            inputs.append(extra)
    started = time.perf_counter()
    client.start_stream(callback=lambda result, error: responses.put((result, error)), stream_timeout=timeout)
    try:
        client.async_stream_infer(model, inputs)
        while True:
            result, error = responses.get(timeout=timeout)
            if error is not None:
                raise error
            names = {output.name for output in result.get_response().outputs}
            if "image" in names:
                break
            update = StepUpdate(
                int(result.as_numpy("step").reshape(-1)[0]),
                int(result.as_numpy("total_steps").reshape(-1)[0]),
                result.as_numpy("preview") if "preview" in names else None,
            )
            if on_step is not None and on_step(update):
                client.stop_stream(cancel_requests=True)
                return None
    finally:
        client.stop_stream()
        client.close()
    return _outputs(result, time.perf_counter() - started)


def _size(text: str) -> tuple[int, int]:
    """``WxH`` -> ``(height, width)``, the order of the ``first_pass_size`` tensor."""
    try:
        width, height = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, got {text!r}") from None
    return height, width


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Generate images with the sdxl ensemble on Triton.")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch")
    parser.add_argument("--negative-prompt", action="append", help="one per prompt (or one for all)")
    parser.add_argument(
        "--height", type=int, help="pixels (server default: the model's native size, 1024 for SDXL)"
    )
    parser.add_argument(
        "--width", type=int, help="pixels (server default: the model's native size, 1024 for SDXL)"
    )
    parser.add_argument("--steps", type=int, help="denoising steps (server default: 30)")
    parser.add_argument("--guidance", type=float, help="guidance scale (server default: 5.0)")
    parser.add_argument("--seed", type=int, action="append", help="one per prompt (server default: random)")
    parser.add_argument(
        "--scheduler", help="ddim, euler, euler_ancestral, dpmpp_2m, ... (default: the model's)"
    )
    parser.add_argument(
        "--image", type=Path, help="image-to-image: start from this picture (resized to --height x --width)"
    )
    parser.add_argument(
        "--strength",
        type=float,
        help="with --image or --first-pass: share of the steps that run (default 0.6)",
    )
    parser.add_argument(
        "--first-pass",
        type=_size,
        metavar="WxH",
        help="two-pass: generate at WxH first, upscale and refine at --width x --height",
    )
    parser.add_argument("--protocol", choices=["grpc", "http"], default="grpc")
    parser.add_argument("--url", help="host:port (default: localhost:8001 for gRPC, localhost:8000 for HTTP)")
    parser.add_argument("--model", help="default: sdxl (sdxl_stream with --stream)")
    parser.add_argument(
        "--stream", action="store_true", help="stream progress and previews (gRPC; the sdxl_stream model)"
    )
    parser.add_argument("--preview-every", type=int, help="with --stream: a preview every N steps")
    parser.add_argument(
        "--preview-size", type=int, help="with --stream: a preview's longer side (default 256)"
    )
    parser.add_argument("--cancel-after", type=int, help="with --stream: cancel after this many steps")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds (default: 600)")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="default: ./outputs")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    negative = args.negative_prompt
    if negative is not None and len(negative) == 1:
        negative = negative * len(args.prompt)
    for name, values in (("--negative-prompt", negative), ("--seed", args.seed)):
        if values is not None and len(values) != len(args.prompt):
            print(f"error: {name}: give one per --prompt ({len(args.prompt)})", file=sys.stderr)
            return 2
    if args.stream and args.protocol != "grpc":
        print(
            "error: --stream: gRPC only (HTTP cannot receive a decoupled model's responses)", file=sys.stderr
        )
        return 2
    if not args.stream and (args.preview_every, args.preview_size, args.cancel_after) != (None, None, None):
        print("error: --preview-every, --preview-size, --cancel-after: only with --stream", file=sys.stderr)
        return 2
    if args.image is not None and args.first_pass is not None:
        print(
            "error: --image, --first-pass: a two-pass request starts from the prompt; give one",
            file=sys.stderr,
        )
        return 2
    if args.strength is not None and args.image is None and args.first_pass is None:
        print("error: --strength: only with --image or --first-pass", file=sys.stderr)
        return 2
    input_image = None
    if args.image is not None:
        with Image.open(args.image) as picture:
            input_image = np.asarray(picture.convert("RGB"))
    fields = {
        "prompts": args.prompt,
        "negative_prompts": negative,
        "height": args.height,
        "width": args.width,
        "num_inference_steps": args.steps,
        "guidance_scale": args.guidance,
        "seeds": args.seed,
        "scheduler": args.scheduler,
        "input_image": input_image,
        "strength": args.strength,
        "first_pass_size": args.first_pass,
    }
    args.output_dir.mkdir(parents=True, exist_ok=True)
    try:
        if args.stream:
            result = _stream_with_progress(args, fields)
            if result is None:
                print(json.dumps({"cancelled_after_steps": args.cancel_after}))
                return 0
        else:
            result = generate(
                args.url or DEFAULT_URLS[args.protocol],
                protocol=args.protocol,
                model=args.model or "sdxl",
                timeout=args.timeout,
                **fields,
            )
    except InferenceServerException as error:
        print(f"error: {error.status()}: {error.message()}", file=sys.stderr)
        if queue_full(error):
            print(
                "the server is at its queue bound: retry later with backoff, or on another replica",
                file=sys.stderr,
            )
        return 1
    paths = []
    for index, (image, seed) in enumerate(zip(result["images"], result["seeds"], strict=True)):
        path = args.output_dir / f"image_{index}_seed{seed}.png"
        Image.fromarray(image).save(path)
        paths.append(str(path))
    summary = {
        "seconds": round(result["seconds"], 3),
        "seeds": result["seeds"],
        "truncated": result["truncated"],
    }
    print(json.dumps({**summary, "images": paths}, indent=2))
    return 0


def _stream_with_progress(args: argparse.Namespace, fields: dict) -> dict | None:
    from tqdm import tqdm

    with tqdm(unit="step", desc="denoising", dynamic_ncols=True) as bar:

        def on_step(update: StepUpdate) -> bool:
            bar.total = update.total
            bar.update(update.step - bar.n)
            if update.preview is not None:
                for row, pixels in enumerate(update.preview):
                    Image.fromarray(pixels).save(args.output_dir / f"preview_{row}_step{update.step:03d}.png")
            return args.cancel_after is not None and update.step >= args.cancel_after

        return stream(
            args.url or DEFAULT_URLS["grpc"],
            model=args.model or "sdxl_stream",
            timeout=args.timeout,
            preview_every=args.preview_every,
            preview_size=args.preview_size,
            on_step=on_step,
            **fields,
        )


if __name__ == "__main__":
    sys.exit(main())
