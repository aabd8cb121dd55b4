"""distrifusion-generate: text-to-image with the UNet split over N ranks.

Runs under ``torchrun --nproc-per-node N`` (gloo on the CPU, NCCL on GPUs), or starts its own N
local ranks with ``--ranks N``. Rank 0 writes the PNG image(s) and the final latents (.npy).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch.distributed as dist

from ..config import DTYPES, ConfigError, DistriConfig, Mode, check_sampling
from ..geometry import ModelGeometry
from ..launch import init_from_environment, spawn_local, under_torchrun
from ..schedulers import SCHEDULERS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distrifusion-generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="diffusers model directory (SDXL or SD 1.x/2.x)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for a batch of prompts")
    parser.add_argument("--negative-prompt", action="append", help="one, or one per prompt")
    parser.add_argument("--seed", type=int, help="default: random (printed)")
    parser.add_argument("--height", type=int, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, help="pixels (default: the model's)")
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default: 30)")
    parser.add_argument("--guidance", type=float, default=5.0, help="guidance scale (default: 5.0)")
    parser.add_argument("--scheduler", choices=sorted(SCHEDULERS), help="default: the model's own")
    parser.add_argument("--mode", choices=[m.value for m in Mode], default=Mode.CORRECTED_ASYNC_GN.value)
    parser.add_argument("--warmup-steps", type=int, default=4, help="synchronous steps after the first")
    parser.add_argument("--split-batch", action="store_true", help="half the ranks per guidance branch")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="capture UNet steps as CUDA graphs (default: on for cuda; cpu cannot)",
    )
    parser.add_argument(
        "--compile",
        nargs="?",
        const=True,
        default=False,
        metavar="BACKEND",
        help="compile each rank's UNet with torch.compile (default backend: inductor)",
    )
    parser.add_argument("--ranks", type=int, default=1, help="local ranks to start when not under torchrun")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"), help="default: ./outputs")
    return parser


def distri_config(args: argparse.Namespace) -> DistriConfig:
    return DistriConfig(
        mode=args.mode,
        warmup_steps=args.warmup_steps,
        split_batch=args.split_batch,
        dtype=args.dtype,
        device=args.device,
        cuda_graphs=args.cuda_graphs,
        compile=args.compile,
    )


def check(args: argparse.Namespace, world_size: int) -> None:
    """Raises the ConfigError the ranks would raise for what the arguments and the model's configs
    decide, before any rank starts: a wrong setting then fails in about 2 s here (importing torch),
    not after the ranks have spawned and loaded the model (40 s for 4 ranks). A model that is not a
    local directory (a hub id) gets its size checks from the ranks once they have loaded it."""
    config = distri_config(args)
    config.validate_world(world_size)
    check_sampling(args.steps, args.guidance)
    model = Path(args.model)
    if model.is_dir():
        geometry = ModelGeometry.read(model)
        height = geometry.default_size if args.height is None else args.height
        width = geometry.default_size if args.width is None else args.width
        splits = config.split_batch and world_size > 1 and args.guidance > 1  # as the pipeline splits
        geometry.layout(height, width, world_size // 2 if splits else world_size)


def generate(args: argparse.Namespace) -> dict | None:
    """Runs on every rank; rank 0 writes the files and returns a summary."""
    # Imported here, on the ranks: diffusers takes seconds to import, and main() checks the
    # arguments without it.
    from ..pipeline import DistriPipeline

    pipeline = DistriPipeline.from_pretrained(args.model, distri_config(args))
    negative = args.negative_prompt
    if negative is not None and len(negative) == 1:
        negative = negative * len(args.prompt)
    started = time.perf_counter()
    result = pipeline(
        prompt=args.prompt,
        negative_prompt=negative,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
    )
    seconds = time.perf_counter() - started
    if result is None:
        return None
    args.output_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for index, image in enumerate(result.images):
        path = args.output_dir / f"image_{index}.png"
        image.save(path)
        images.append(str(path))
    latents_path = args.output_dir / "latents.npy"
    np.save(latents_path, result.latents.float().cpu().numpy())
    return {"images": images, "latents": str(latents_path), "seed": result.seed, "seconds": round(seconds, 3)}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check(args, int(os.environ["WORLD_SIZE"]) if under_torchrun() else args.ranks)
        if under_torchrun():
            init_from_environment(args.device)
            summary = generate(args)
            dist.destroy_process_group()
        elif args.ranks > 1:
            summary = spawn_local(generate, args.ranks, (args,), device=args.device)
        else:
            summary = generate(args)
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
