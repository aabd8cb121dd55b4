"""``python -m build_engines``: a diffusers SDXL directory -> a complete Triton model repository.

Stages (each reports its progress on stderr):

1. load the text encoders, VAE and tokenizers (fp32);
2. export ``text_encoder``, ``text_encoder_2`` and ``vae_decoder`` to ONNX (dynamic batch; dynamic
   latent height/width for the VAE) and check each against PyTorch with ONNX Runtime (max abs
   error reported; the build fails over the tolerance);
3. gpu target: build TensorRT engines from those ONNX files (fp16 encoders, fp32+TF32 VAE);
   cpu target: serve the ONNX files with ONNX Runtime from a Python-backend model;
4. tokenizer files, the UNet stage's diffusers directory (unet/ + scheduler/) and model code;
5. every config.pbtxt, then a check of the whole repository (schemas, ensemble tensor names,
   types and dims), then ``build_manifest.json``.

The repository is assembled in a sibling folder and moved into place only when everything
passed, so a failed build never leaves a half-written repository behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

MAX_SIDE = 4096
EXIT_USAGE = 2
EXIT_FAILED = 1


class BuildError(RuntimeError):
    pass


class Progress:
    """Numbered stage lines with timings on stderr."""

    def __init__(self, total: int, stream: Any = None):
        self.total = total
        self.index = 0
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter()

    def log(self, message: str) -> None:
        print(f"        {message}", file=self.stream, flush=True)

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        self.index += 1
        print(f"[{self.index}/{self.total}] {title} ...", file=self.stream, flush=True)
        began = time.perf_counter()
        yield
        print(
            f"[{self.index}/{self.total}] {title}: done in {time.perf_counter() - began:.1f} s",
            file=self.stream,
            flush=True,
        )


def parse_resolutions(text: str, flag: str = "--resolutions") -> list[tuple[int, int]]:
    """``"1024x1024,2048x1536"`` -> ``[(1024, 1024), (2048, 1536)]``, each WIDTHxHEIGHT in pixels."""
    out = []
    for item in text.split(","):
        parts = item.strip().lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
            raise ValueError(f"{flag}: {item.strip()!r} is not WIDTHxHEIGHT (e.g. 1024x1024)")
        width, height = (int(p) for p in parts)
        if width <= 0 or height <= 0:
            raise ValueError(f"{flag}: {item.strip()!r} must be positive")
        out.append((width, height))
    return out


def parse_batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",")]
    except ValueError:
        raise ValueError(f"--batch-sizes: {text!r} is not a comma-separated list of integers") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--batch-sizes: every size must be >= 1, got {text!r}")
    return sorted(set(sizes))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m build_engines",
        description="Turn a diffusers SDXL directory into a Triton model repository (ensemble 'sdxl').",
    )
    parser.add_argument("--model", required=True, type=Path, help="diffusers SDXL directory")
    parser.add_argument("--output", required=True, type=Path, help="model repository to write")
    parser.add_argument(
        "--target",
        required=True,
        choices=("cpu", "gpu"),
        help="gpu: TensorRT engines (needs TensorRT and an NVIDIA GPU); cpu: ONNX Runtime",
    )
    parser.add_argument(
        "--resolutions",
        help="WIDTHxHEIGHT list in pixels, e.g. 1024x1024,2048x2048: the default request size (the "
        "first), the warm-up sizes and, on gpu, the sizes the VAE engine's profile spans (opt at the "
        "first); default: the model's native size (its UNet's sample_size x the VAE scale, 1024x1024 "
        "for SDXL), within --max-resolution",
    )
    parser.add_argument(
        "--max-resolution",
        help="WIDTHxHEIGHT: the largest image the UNet stage accepts (its max_width/max_height "
        "parameters); gpu: also the VAE engine profile's upper bound (default: gpu, the largest "
        "--resolutions; cpu, the UNet template's own limit)",
    )
    parser.add_argument(
        "--batch-sizes",
        default="1,2,4",
        help="request batch sizes; the largest is every model's max_batch_size (default %(default)s)",
    )
    ranks = parser.add_mutually_exclusive_group()
    ranks.add_argument(
        "--unet-ranks", type=int, help="cpu: UNet ranks (gloo processes) per instance (default 2)"
    )
    ranks.add_argument(
        "--unet-gpus",
        help='GPUs per UNet instance, ";" between instances, e.g. "0,1;2,3" (gpu default: every '
        "GPU visible at build time, one instance); with --target cpu the UNet runs on these GPUs "
        "and the text encoders and VAE on ONNX Runtime on the CPU (a machine without TensorRT)",
    )
    parser.add_argument("--threads-per-rank", type=int, help="cpu: torch threads per UNet rank (default 1)")
    engine = parser.add_argument_group("UNet engine (default: the engine's own, DistriConfig)")
    engine.add_argument("--mode", help="DistriFusion mode (default corrected_async_gn)")
    engine.add_argument("--warmup-steps", type=int, help="synchronous steps after the first (default 4)")
    engine.add_argument(
        "--split-batch",
        action=argparse.BooleanOptionalAction,
        help="split the CFG batch over half the ranks each (default off)",
    )
    engine.add_argument("--unet-dtype", choices=("fp32", "fp16", "bf16"), help="default: gpu fp16, cpu fp32")
    engine.add_argument(
        "--comm-batch-size", type=int, help="tensors per asynchronous all-gather (default 60)"
    )
    engine.add_argument(
        "--cuda-graphs",
        action=argparse.BooleanOptionalAction,
        help="capture UNet steps as CUDA graphs (default: on for gpu; cpu cannot)",
    )
    engine.add_argument(
        "--compile",
        nargs="?",
        const=True,
        metavar="BACKEND",
        help="compile the UNet with torch.compile at load, for the warm-up sizes (backend default: "
        "inductor; default off)",
    )
    requests = parser.add_argument_group("requests")
    requests.add_argument(
        "--min-resolution",
        help="WIDTHxHEIGHT: smaller requests are refused before any work (default: gpu, the smallest "
        "--resolutions, where the VAE engine's profile starts; cpu, none)",
    )
    requests.add_argument(
        "--default-resolution",
        help="WIDTHxHEIGHT of a request that names none (default: the first --resolutions)",
    )
    requests.add_argument("--default-steps", type=int, help="steps of a request that names none (default 30)")
    requests.add_argument(
        "--max-queue-size",
        type=int,
        help="requests that may wait at the UNet stage; more are refused at once with UNAVAILABLE "
        "(default: 2 full batches per UNet instance, so that a request waits at most 2 batch times "
        "before its own starts; build_engines.repository.QUEUED_BATCHES)",
    )
    requests.add_argument(
        "--default-guidance-scale", type=float, help="guidance of a request that names none (default 5.0)"
    )
    faults = parser.add_argument_group("faults (default: FaultPolicy's own)")
    faults.add_argument("--step-deadline-s", type=float, help="floor of the per-step deadline (default 60)")
    faults.add_argument(
        "--step-deadline-factor",
        type=float,
        help="deadline = factor x the step expected for a size: measured, or scaled from a measured "
        "size by its work (default 10)",
    )
    faults.add_argument(
        "--max-rebuilds", type=int, help="failed rebuilds within the window that give up (default 3)"
    )
    faults.add_argument("--rebuild-window-s", type=float, help="the window of --max-rebuilds (default 600)")
    faults.add_argument("--collective-timeout-s", type=float, help="bound on every collective (default 300)")
    faults.add_argument(
        "--compile-deadline-s", type=float, help="deadline of a warm-up step that compiles (default 1800)"
    )
    vae = parser.add_argument_group(
        "VAE stage (a latent decodes whole where it fits, else in tiles; default: derived from the VAE config)"
    )
    vae.add_argument(
        "--vae-memory-gb",
        type=float,
        help="working memory one decode may use (default: gpu 16, cpu 4); every tensor also stays "
        "under TensorRT's 2^31 - 1 elements on gpu",
    )
    vae.add_argument(
        "--vae-tile-above",
        help="WIDTHxHEIGHT: images of more pixels decode in tiles even where the whole decode fits",
    )
    vae.add_argument("--vae-tile", type=int, help="tile side in pixels (default: the VAE's sample_size)")
    vae.add_argument(
        "--vae-tile-overlap",
        type=int,
        help="least overlap of neighbouring tiles in pixels (default: a quarter tile)",
    )
    vae.add_argument(
        "--vae-tiles-per-call", type=int, help="tiles per engine call (default: as many as fit, at most 8)"
    )
    vae.add_argument(
        "--vae-image-statistics",
        type=float,
        help="share of the whole image's GroupNorm statistics in each tile's, 0..1 (0: one pass, "
        "each tile its own; default 0.75)",
    )
    parser.add_argument(
        "--warmup-resolutions",
        help="WIDTHxHEIGHT list run once per UNet instance at load, before the server is ready "
        "(default: --resolutions; 'none' for no warm-up)",
    )
    parser.add_argument("--variant", help="load/copy this weight variant of the model, e.g. fp16")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default %(default)s)")
    parser.add_argument("--atol", type=float, default=1e-3, help="ONNX check: absolute tolerance")
    parser.add_argument(
        "--rtol", type=float, default=1e-3, help="ONNX check: tolerance relative to the largest |value|"
    )
    parser.add_argument("--workspace-gb", type=float, default=8.0, help="gpu: TensorRT workspace per build")
    parser.add_argument(
        "--templates",
        type=Path,
        default=None,
        help="model_repository templates (default: this checkout's model_repository/)",
    )
    parser.add_argument(
        "--unet-template",
        type=Path,
        default=None,
        help="the UNet stage's model folder to copy (default: <templates>/unet)",
    )
    parser.add_argument("--force", action="store_true", help="replace --output if it exists")
    return parser


def unet_stage_config(
    args: argparse.Namespace,
    resolutions: Sequence[tuple[int, int]],
    max_resolution: tuple[int, int] | None,
    gpu_count: int | None,
) -> Any:
    """The UNet stage's :class:`~distrifusion.serving.stage_config.StageConfig` from the flags; a flag
    left out takes the config's (or the engine's) own default."""
    from distrifusion.config import ConfigError, DistriConfig
    from distrifusion.serving.faults import FaultPolicy
    from distrifusion.serving.stage_config import Placement, RequestSettings, StageConfig

    def given(**values: Any) -> dict[str, Any]:
        return {key: value for key, value in values.items() if value is not None}

    try:
        if args.target == "cpu" and args.unet_gpus is None:
            placement = Placement(**given(ranks=args.unet_ranks, threads_per_rank=args.threads_per_rank))
        else:
            if args.threads_per_rank is not None:
                raise ValueError(
                    "--threads-per-rank: only for UNet ranks on the CPU (--target cpu without --unet-gpus)"
                )
            if args.unet_gpus is not None:
                gpus: Any = args.unet_gpus
            else:
                count = args.unet_ranks if args.unet_ranks is not None else gpu_count
                if not count or count < 1:
                    raise ValueError("--unet-ranks: must be >= 1 (no GPU visible to count)")
                gpus = [list(range(count))]
            placement = Placement(gpus=gpus)
        engine = DistriConfig(
            **given(
                mode=args.mode,
                warmup_steps=args.warmup_steps,
                split_batch=args.split_batch,
                dtype=args.unet_dtype,
                comm_batch_size=args.comm_batch_size,
                cuda_graphs=args.cuda_graphs,
                compile=args.compile,
            ),
            device=placement.device,
        )
        limits: dict[str, Any] = {}
        if max_resolution is not None:
            limits["max_width"], limits["max_height"] = max_resolution
        minimum = (
            parse_resolutions(args.min_resolution, "--min-resolution")[0] if args.min_resolution else None
        )
        if minimum is None and args.target == "gpu":
            minimum = (min(w for w, _ in resolutions), min(h for _, h in resolutions))
        if minimum is not None:
            limits["min_width"], limits["min_height"] = minimum
        default = (
            parse_resolutions(args.default_resolution, "--default-resolution")[0]
            if args.default_resolution
            else resolutions[0]
        )
        limits["default_width"], limits["default_height"] = default
        requests = RequestSettings(
            **limits,
            **given(default_steps=args.default_steps, default_guidance_scale=args.default_guidance_scale),
        )
        if args.warmup_resolutions is None:
            warmup = list(resolutions)
        elif args.warmup_resolutions.strip().lower() == "none":
            warmup = []
        else:
            warmup = parse_resolutions(args.warmup_resolutions, "--warmup-resolutions")
        faults = FaultPolicy(
            **given(
                step_deadline_s=args.step_deadline_s,
                step_deadline_factor=args.step_deadline_factor,
                max_rebuilds=args.max_rebuilds,
                rebuild_window_s=args.rebuild_window_s,
                collective_timeout_s=args.collective_timeout_s,
                compile_deadline_s=args.compile_deadline_s,
            )
        )
        return StageConfig(
            engine=engine, placement=placement, requests=requests, faults=faults, warmup=tuple(warmup)
        )
    except ConfigError as error:
        raise ValueError(f"UNet stage: {error}") from None


def _check_resolutions(resolutions: Sequence[tuple[int, int]], multiple: int) -> None:
    bad = [f"{w}x{h}" for w, h in resolutions if w % multiple or h % multiple]
    if bad:
        raise ValueError(f"resolutions {', '.join(bad)}: not multiples of {multiple} px (this model's UNet)")
    too_big = [f"{w}x{h}" for w, h in resolutions if max(w, h) > MAX_SIDE]
    if too_big:
        raise ValueError(f"resolutions {', '.join(too_big)}: at most {MAX_SIDE} px per side")


def vae_decode_settings(args: argparse.Namespace, model_dir: Path, requests: Any) -> Any:
    """The VAE stage's :class:`~distrifusion.vae.decode.DecodeSettings` from the flags and the VAE
    config; every size the UNet stage accepts must decode, whole or in tiles."""
    from distrifusion.vae.decode import DEFAULT_IMAGE_STATISTICS, DecodeSettings, DecodeTooLarge

    config = json.loads((model_dir / "vae" / "config.json").read_text())
    scale = 2 ** (len(config["block_out_channels"]) - 1)
    gpu = args.target == "gpu"
    budget_gb = args.vae_memory_gb if args.vae_memory_gb is not None else (16.0 if gpu else 4.0)
    if budget_gb <= 0:
        raise ValueError(f"--vae-memory-gb: must be positive, got {budget_gb}")
    pixel_flags = {"--vae-tile": args.vae_tile, "--vae-tile-overlap": args.vae_tile_overlap}
    for flag, value in pixel_flags.items():
        if value is not None and (value < 0 or value % scale):
            raise ValueError(
                f"{flag}: {value} is not a non-negative multiple of {scale} px (the VAE's scale)"
            )
    if args.vae_tile == 0:
        raise ValueError("--vae-tile: must be positive")
    whole_max_pixels = None
    if args.vae_tile_above:
        width, height = parse_resolutions(args.vae_tile_above, "--vae-tile-above")[0]
        whole_max_pixels = width * height
    largest = (requests.max_height // scale, requests.max_width // scale)
    try:
        settings = DecodeSettings.derive(
            config,
            int(budget_gb * 2**30),
            tensorrt=gpu,
            tile=None if args.vae_tile is None else args.vae_tile // scale,
            overlap=None if args.vae_tile_overlap is None else args.vae_tile_overlap // scale,
            tiles_per_call=args.vae_tiles_per_call,
            whole_max_pixels=whole_max_pixels,
            image_statistics=DEFAULT_IMAGE_STATISTICS
            if args.vae_image_statistics is None
            else args.vae_image_statistics,
        )
        if gpu:  # the whole engine's profile: the largest square that decodes whole, within the limits
            side = max((n for n in range(1, max(largest) + 1) if settings.decodes_whole(n, n)), default=0)
            if side == 0:
                raise ValueError("no latent decodes whole within --vae-memory-gb")
            settings = dataclasses.replace(
                settings, whole_max_latent=(min(side, largest[0]), min(side, largest[1]))
            )
        settings.check(*largest)
    except DecodeTooLarge as error:
        raise ValueError(
            f"--max-resolution {requests.max_width}x{requests.max_height} with --vae-memory-gb {budget_gb:g}: {error}"
        ) from None
    except ValueError as error:
        raise ValueError(f"VAE stage: {error}") from None
    return settings


def build_sizes(
    args: argparse.Namespace, model_dir: Path, max_resolution: tuple[int, int] | None
) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """``--resolutions`` (default: the model's native size, within ``max_resolution``) and the largest
    request size (gpu default: the largest of them; cpu default: None, the UNet stage's own)."""
    if args.resolutions:
        resolutions = parse_resolutions(args.resolutions)
        if max_resolution is not None:
            too_big = [f"{w}x{h}" for w, h in resolutions if w > max_resolution[0] or h > max_resolution[1]]
            if too_big:
                raise ValueError(
                    f"--resolutions {', '.join(too_big)} exceed --max-resolution {args.max_resolution}"
                )
    else:
        from distrifusion.geometry import ModelGeometry

        side = ModelGeometry.read(model_dir).default_size  # the UNet's sample_size, in pixels
        native = (side, side)
        if max_resolution is not None:
            native = (min(native[0], max_resolution[0]), min(native[1], max_resolution[1]))
        resolutions = [native]
    if max_resolution is None and args.target == "gpu":
        max_resolution = (max(w for w, _ in resolutions), max(h for _, h in resolutions))
    return resolutions, max_resolution


def _size_multiple(model_dir: Path) -> int:
    """Pixel sizes must be multiples of this: the VAE factor times the UNet's downsampling."""
    factor = 1
    for component in ("vae", "unet"):
        path = model_dir / component / "config.json"
        if not path.is_file():
            raise ValueError(f"--model: {model_dir} has no {component}/config.json")
        levels = len(json.loads(path.read_text()).get("block_out_channels", [0]))
        factor *= 2 ** (levels - 1)
    return factor


def _sample_ids(tokenizers: Any) -> dict[str, Any]:
    """Token ids for the encoder checks: ordinary, truncated (over 77 tokens) and empty text."""
    import numpy as np

    batch = tokenizers.encode(
        [
            "a photograph of an astronaut riding a horse on the moon, highly detailed",
            "lighthouse at dawn!!! " * 20,  # truncated; "!" shares tokenizer_2's pad id
        ],
        ["blurry, low quality", None],  # None: the empty prompt's ids
    )
    return {
        "text_encoder": np.concatenate([batch.input_ids, batch.negative_input_ids]),
        "text_encoder_2": np.concatenate([batch.input_ids_2, batch.negative_input_ids_2]),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Build the repository; returns the manifest. Raises ValueError for bad arguments,
    TensorRTUnavailable / BuildError / RepositoryError / ExportError for failed builds."""
    from . import tensorrt as trt_build
    from .repository import TEMPLATES_DIR

    model_dir: Path = args.model
    output: Path = args.output
    templates: Path = args.templates or TEMPLATES_DIR
    unet_template: Path = args.unet_template or templates / "unet"
    max_resolution = (
        parse_resolutions(args.max_resolution, "--max-resolution")[0] if args.max_resolution else None
    )
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"--model: {model_dir} is not a diffusers directory (no model_index.json)")
    if args.max_queue_size is not None and args.max_queue_size < 1:
        raise ValueError(
            f"--max-queue-size must be at least 1, got {args.max_queue_size} (Triton reads 0 as no bound)"
        )
    size_multiple = _size_multiple(model_dir)  # also: unet/ and vae/ have their configs
    resolutions, max_resolution = build_sizes(args, model_dir, max_resolution)
    batch_sizes = parse_batch_sizes(args.batch_sizes)
    max_batch = max(batch_sizes)
    if output.exists() and any(output.iterdir()) and not args.force:
        raise ValueError(f"--output: {output} exists and is not empty (pass --force to replace it)")
    _check_resolutions(resolutions + ([max_resolution] if max_resolution else []), size_multiple)
    if not (unet_template / "config.pbtxt").is_file():
        raise ValueError(
            f"--unet-template: {unet_template} has no config.pbtxt (the UNet stage's model folder)"
        )

    gpu_info = None
    if args.target == "gpu":
        # Fail before minutes of export when TensorRT or the GPU is missing.
        gpu_info = trt_build.preflight()
    gpu_count = None
    if args.target == "gpu":
        import torch

        gpu_count = torch.cuda.device_count()
    unet_stage = unet_stage_config(args, resolutions, max_resolution, gpu_count)
    requests = unet_stage.requests
    _check_resolutions([(requests.default_width, requests.default_height), *unet_stage.warmup], size_multiple)
    vae_settings = vae_decode_settings(args, model_dir, requests)

    progress = Progress(total=7 if args.target == "gpu" else 6)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = output.parent / f".{output.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = _build(
            args,
            progress,
            staging,
            templates,
            unet_template,
            resolutions,
            max_resolution,
            batch_sizes,
            max_batch,
            unet_stage,
            vae_settings,
            gpu_info,
        )
        if output.exists():
            old = output.parent / f".{output.name}.old-{os.getpid()}"
            output.rename(old)
            shutil.rmtree(old)
        staging.rename(output)
    except ValueError as err:
        shutil.rmtree(staging, ignore_errors=True)
        # Arguments were checked above: a ValueError now is a failure inside the build.
        raise BuildError(f"{type(err).__name__}: {err}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    print(
        f"model repository ready: {output} (target {args.target}, "
        f"{time.perf_counter() - progress.start:.1f} s)",
        file=progress.stream,
        flush=True,
    )
    return manifest


def _build(
    args: argparse.Namespace,
    progress: Progress,
    repo: Path,
    templates: Path,
    unet_template: Path,
    resolutions: list[tuple[int, int]],
    max_resolution: tuple[int, int] | None,
    batch_sizes: list[int],
    max_batch: int,
    unet_stage: Any,
    vae_settings: Any,
    gpu_info: dict[str, Any] | None,
) -> dict[str, Any]:
    from distrifusion.export import (
        ONNX_STAGES,
        VAE_DECODER,
        VAE_ENCODER,
        VAE_ENCODER_ENGINES,
        VAE_ENGINES,
        VAE_TILE_STATISTICS,
        VAE_TILES,
        VAE_WHOLE,
        check_stage,
        export_stage,
        load_components,
        stage_modules,
        text_encoder_cases,
        vae_decoder_cases,
        vae_decoder_spec,
        vae_encoder_cases,
        vae_encoder_stage_spec,
    )
    from distrifusion.export.specs import VAE_ENCODER_TILE_STATISTICS, VAE_ENCODER_TILES, VAE_ENCODER_WHOLE
    from distrifusion.serving.health import GATE
    from distrifusion.serving.stage_config import MODEL_DIRECTORY
    from distrifusion.serving.tokenize import SDXLTokenizers

    from . import parser_rules
    from . import tensorrt as trt_build
    from .repository import (
        ENSEMBLE,
        ONNX_RUNTIME_TEMPLATE,
        STREAM,
        TOKENIZER,
        TRITON_GLUE,
        UNET,
        check_repository,
        copy_tokenizers,
        copy_unet_model,
        ensemble_config,
        load_template,
        max_queue_size,
        stage_config,
        stream_config,
        stream_plan,
        tokenizer_spec,
        unet_config,
        write_config,
    )

    model_dir: Path = args.model
    manifest: dict[str, Any] = {
        "target": args.target,
        "model": str(model_dir.resolve()),
        "variant": args.variant,
        "resolutions": [f"{w}x{h}" for w, h in resolutions],
        "max_resolution": f"{max_resolution[0]}x{max_resolution[1]}" if max_resolution else None,
        "batch_sizes": batch_sizes,
        "max_batch_size": max_batch,
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "stages": {},
    }

    with progress.stage(f"loading text encoders, VAE and tokenizers from {model_dir}"):
        components = load_components(model_dir, variant=args.variant)
        modules = stage_modules(components)
        tokenizers = SDXLTokenizers.from_pretrained(model_dir)
        ids = _sample_ids(tokenizers)
        for name, (_, spec) in modules.items():
            dims = {t.name: list(t.dims) for t in (*spec.inputs, *spec.outputs)}
            progress.log(f"{name}: {dims}")
        if tokenizers.max_length != modules["text_encoder"][1].inputs[0].dims[0]:
            raise BuildError(
                f"the tokenizers pad to {tokenizers.max_length} tokens, the text encoders take "
                f"{modules['text_encoder'][1].inputs[0].dims[0]}"
            )

    onnx_paths: dict[str, Path] = {}
    onnx_dir = repo / ".onnx" if args.target == "gpu" else None
    profiles = {}
    if args.target == "gpu":
        for name in ONNX_STAGES:
            spec = modules[name][1]
            profiles[name] = (
                trt_build.vae_engine_profile(spec, vae_settings, unet_stage.requests, resolutions)
                if name in VAE_ENGINES or name in VAE_ENCODER_ENGINES
                else trt_build.encoder_profile(spec, batch_sizes)
            )
    with progress.stage(
        "exporting ONNX, checking it against PyTorch with ONNX Runtime and against TensorRT's parser rules"
    ):
        for name in ONNX_STAGES:
            module, spec = modules[name]
            if name in VAE_ENGINES:
                channels = spec.inputs[0].dims[0]
                example = vae_decoder_cases(channels, [(2, 16, 16)], seed=1, module=module)[0]
                # Batch 2 and 1, two latent sizes (one not square): the dynamic axes are exercised.
                cases = vae_decoder_cases(channels, [(2, 16, 16), (1, 24, 16)], seed=2, module=module)
            elif name in VAE_ENCODER_ENGINES:
                example = vae_encoder_cases([(2, 128, 128)], seed=1, module=module)[0]
                cases = vae_encoder_cases([(2, 128, 128), (1, 192, 128)], seed=2, module=module)
            else:
                example = {"input_ids": ids[name][:2]}
                cases = text_encoder_cases(ids[name])
            folder = (onnx_dir / name) if onnx_dir is not None else (repo / name / "1")
            # ONNX Runtime runs the VAE's attention fused; TensorRT's parser knows no com.microsoft op.
            fused = args.target == "cpu" and (name in VAE_ENGINES or name in VAE_ENCODER_ENGINES)
            exported = export_stage(
                module, spec, folder / "model.onnx", example, opset=args.opset, fused_attention=fused
            )
            for path in folder.glob("model.onnx*"):
                path.chmod(0o644)
            result = check_stage(module, spec, exported.path, cases, atol=args.atol, rtol=args.rtol)
            progress.log(
                f"{name}: exported in {exported.seconds:.1f} s"
                + (" (weights in model.onnx_data)" if exported.external_data else "")
                + f"; {result.summary()}"
            )
            manifest["stages"][name] = {
                "onnx_opset": args.opset,
                "onnx_external_data": exported.external_data,
                "onnx_fused_attention": fused,
                "onnx_check": {
                    "max_abs_error": result.max_abs_error,
                    "limit": result.limit,
                    "mismatch_fraction": result.mismatch_fraction,
                    "cases": result.cases,
                },
                "tensors": {
                    "inputs": {t.name: [t.dtype, list(t.dims)] for t in spec.inputs},
                    "outputs": {t.name: [t.dtype, list(t.dims)] for t in spec.outputs},
                },
            }
            if not result.passed:
                raise BuildError(f"ONNX check failed: {result.summary()}")
            # The gpu target checks every tensor at its engine profile's largest shapes too.
            largest = {n: shapes[2] for n, shapes in profiles[name].shapes.items()} if profiles else None
            violations = parser_rules.check_graph(
                exported.path, largest, stand_ins=parser_rules.FUSED_ATTENTION if fused else ()
            )
            if violations:
                raise BuildError(
                    f"{name}: TensorRT's ONNX parser would refuse {exported.path.name}:\n  "
                    + "\n  ".join(str(violation) for violation in violations)
                )
            progress.log(
                f"{name}: TensorRT parser rules ok"
                + (f", every tensor within the element limit at {largest}" if largest else "")
            )
            manifest["stages"][name]["tensorrt_parser_rules"] = {
                "passed": True,
                "stand_ins": sorted(parser_rules.FUSED_ATTENTION) if fused else [],
                "element_limit_checked_at": largest,
            }
            onnx_paths[name] = exported.path
    del components

    if args.target == "gpu":
        assert onnx_dir is not None and gpu_info is not None
        with progress.stage(
            f"building TensorRT {gpu_info['tensorrt_version']} engines on {gpu_info['gpu']} "
            f"(sm {gpu_info['compute_capability']})"
        ):
            for name in ONNX_STAGES:
                spec = modules[name][1]
                fp16 = trt_build.stage_precision(name)
                profile = profiles[name]
                began = time.perf_counter()
                sidecar = trt_build.build_engine(
                    onnx_paths[name],
                    repo / name / "1" / trt_build.PLAN_NAME,
                    spec,
                    profile,
                    fp16=fp16,
                    workspace_bytes=int(args.workspace_gb * (1 << 30)),
                )
                progress.log(f"{name}: {sidecar['precision']} engine in {time.perf_counter() - began:.1f} s")
                manifest["stages"][name]["tensorrt"] = sidecar
            shutil.rmtree(onnx_dir)

    with progress.stage("tokenizer files and model code"):
        copy_tokenizers(model_dir, repo / TOKENIZER / "1")
        shutil.copy2(templates / TOKENIZER / "1" / "model.py", repo / TOKENIZER / "1" / "model.py")
        shutil.copy2(templates / TRITON_GLUE, repo / TOKENIZER / "1" / TRITON_GLUE)
        if args.target == "cpu":
            for name in ONNX_STAGES:
                shutil.copy2(templates / ONNX_RUNTIME_TEMPLATE / "model.py", repo / name / "1" / "model.py")
                shutil.copy2(templates / TRITON_GLUE, repo / name / "1" / TRITON_GLUE)
        # The ensemble's VAE stage: whole or tiled decodes through the engines, on both targets.
        (repo / VAE_DECODER / "1").mkdir(parents=True)
        shutil.copy2(templates / VAE_DECODER / "1" / "model.py", repo / VAE_DECODER / "1" / "model.py")
        shutil.copy2(templates / TRITON_GLUE, repo / VAE_DECODER / "1" / TRITON_GLUE)
        vae_settings.save(repo / VAE_DECODER / "1")
        progress.log(f"{VAE_DECODER}/1/vae_decode.json: {json.dumps(vae_settings.to_dict())}")
        manifest["stages"][VAE_DECODER] = {"decode_settings": vae_settings.to_dict()}
        # Image-to-image's VAE stage encodes whole and in tiles where the decoder would decode.
        (repo / VAE_ENCODER / "1").mkdir(parents=True)
        shutil.copy2(templates / VAE_ENCODER / "1" / "model.py", repo / VAE_ENCODER / "1" / "model.py")
        shutil.copy2(templates / TRITON_GLUE, repo / VAE_ENCODER / "1" / TRITON_GLUE)
        vae_settings.save(repo / VAE_ENCODER / "1")
        (repo / ENSEMBLE / "1").mkdir(parents=True)
        # Loaded only by the supervisor, while some part of the server is broken.
        shutil.copytree(templates / GATE, repo / GATE, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        shutil.copy2(templates / TRITON_GLUE, repo / GATE / "1" / TRITON_GLUE)

    with progress.stage(f"UNet stage: copying {model_dir / 'unet'} and scheduler/"):
        shutil.copytree(
            unet_template,
            repo / UNET,
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc", MODEL_DIRECTORY),
        )
        if not (repo / UNET / "1").is_dir():
            raise BuildError(f"{unet_template} has no version folder 1/ (with the stage's model.py)")
        shutil.copy2(templates / TRITON_GLUE, repo / UNET / "1" / TRITON_GLUE)
        summary = copy_unet_model(model_dir, repo / UNET / "1" / MODEL_DIRECTORY, variant=args.variant)
        written = unet_stage.save(repo / UNET / "1")
        # The stage refuses an image-to-image request the VAE stages could not run, before any work.
        vae_settings.save(repo / UNET / "1")
        latent_map = _latent_map(model_dir / "vae")
        if latent_map is None:
            progress.log("no latent-to-RGB map for this VAE: sdxl_stream streams progress without previews")
        else:
            progress.log(f"previews: {latent_map.save(repo / UNET / '1' / MODEL_DIRECTORY)}")
        progress.log(
            f"unet/1/{MODEL_DIRECTORY}: {summary['files']} unet file(s), {summary['bytes'] / 2**20:.1f} MiB"
        )
        progress.log(f"unet/1/{written.name}:\n" + unet_stage.to_json_string().rstrip())
        manifest["stages"][UNET] = {"stage_config": unet_stage.to_dict(), **summary}

    with progress.stage("writing config.pbtxt files and checking the repository"):
        generated = "Generated by `python -m build_engines` from model_repository/{name}/config.pbtxt."
        platform = "tensorrt_plan" if args.target == "gpu" else None
        kind = "KIND_GPU" if args.target == "gpu" else "KIND_CPU"
        engine_gpus = unet_stage.placement.engine_gpus if args.target == "gpu" else ()
        engine_batch = {
            VAE_WHOLE: 1,
            VAE_TILE_STATISTICS: vae_settings.tiles_per_call,
            VAE_TILES: vae_settings.tiles_per_call,
            VAE_ENCODER_WHOLE: 1,
            VAE_ENCODER_TILE_STATISTICS: vae_settings.tiles_per_call,
            VAE_ENCODER_TILES: vae_settings.tiles_per_call,
        }
        for name in ONNX_STAGES:
            spec = modules[name][1]
            msg = stage_config(
                load_template(templates, name),
                spec,
                engine_batch.get(name, max_batch),
                platform,
                kind,
                engine_gpus,
            )
            write_config(repo / name, msg, generated.format(name=name) + f"\nTarget: {args.target}.")
        latent_channels = modules[VAE_WHOLE][1].inputs[0].dims[0]
        python_stages = (
            (TOKENIZER, tokenizer_spec(tokenizers.max_length)),
            (VAE_DECODER, vae_decoder_spec(latent_channels)),
            (VAE_ENCODER, vae_encoder_stage_spec(latent_channels)),
        )
        for name, spec in python_stages:
            msg = stage_config(load_template(templates, name), spec, max_batch, None, "KIND_CPU")
            write_config(repo / name, msg, generated.format(name=name))
        unet_template_config = load_template(unet_template.parent, unet_template.name)
        instances = unet_stage.placement.instances
        queue = (
            args.max_queue_size if args.max_queue_size is not None else max_queue_size(max_batch, instances)
        )
        msg = unet_config(unet_template_config, max_batch, instances, queue)
        write_config(
            repo / UNET,
            msg,
            f"Generated by `python -m build_engines` from {unet_template}/config.pbtxt (instance_group,\n"
            f"max_batch_size and max_queue_size filled in). The stage's own settings are in\n"
            f"unet/1/stage_config.json.",
        )
        msg = ensemble_config(load_template(templates, ENSEMBLE), max_batch)
        write_config(repo / ENSEMBLE, msg, generated.format(name=ENSEMBLE))
        # A stream beyond what the UNet stage holds (its batches in flight and its queue) would be
        # refused by that queue, after its text encoding.
        max_streams = queue + max_batch * instances
        (repo / STREAM / "1").mkdir(parents=True)
        shutil.copy2(templates / STREAM / "1" / "model.py", repo / STREAM / "1" / "model.py")
        shutil.copy2(templates / TRITON_GLUE, repo / STREAM / "1" / TRITON_GLUE)
        stream_plan(msg).save(repo / STREAM / "1")
        stream = stream_config(load_template(templates, STREAM), msg, max_streams)
        write_config(repo / STREAM, stream, generated.format(name=STREAM))
        configs = check_repository(repo)
        progress.log(f"{len(configs)} models: {', '.join(sorted(configs))}; ensemble tensors consistent")

    manifest["versions"] = _versions()
    if gpu_info:
        manifest["gpu"] = gpu_info
    (repo / "build_manifest.json").write_text(json.dumps(manifest, indent=2, default=_json_default) + "\n")
    return manifest


def _latent_map(vae_folder: Path) -> Any:
    """The VAE's latent-to-RGB map (stored beside it, or SDXL's published one), or None."""
    from distrifusion.vae.preview import LatentToRgb

    try:
        return LatentToRgb.for_vae(vae_folder, json.loads((vae_folder / "config.json").read_text()))
    except FileNotFoundError:
        return None


def _json_default(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in ("torch", "diffusers", "transformers", "onnx", "onnxruntime", "distrifusion-triton"):
        with suppress(PackageNotFoundError):
            out[package] = version(package)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    parser = build_parser()
    args = parser.parse_args(argv)
    from distrifusion.export import ExportError

    from .repository import RepositoryError
    from .tensorrt import TensorRTUnavailable

    try:
        run(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except TensorRTUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    except (BuildError, RepositoryError, ExportError) as err:
        print(f"error: build failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    return 0
