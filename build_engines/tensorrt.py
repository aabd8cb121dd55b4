"""TensorRT engines for the gpu target, built from the checked ONNX files with the TensorRT Python API.

- Text encoders: fp16 (I/O stays fp32/int32), one optimization profile: batch 1..max, opt at
  the smallest listed batch size.
- VAE decoder: fp32 with TF32 (SDXL's VAE overflows in fp16), one optimization profile whose
  latent height/width range spans every ``--resolutions`` entry (opt at the first one) and
  whose batch spans 1..max. One profile keeps Triton's profile selection out of the picture:
  every listed size and batch, and any size in between, runs.
- Engines are written as ``<model>/1/model.plan`` (the name Triton's TensorRT backend loads by
  default) with ``model.plan.json`` beside it recording the TensorRT version, GPU, compute
  capability, profiles and the ONNX file's SHA-256. A plan only loads in a server with the same
  TensorRT version (and GPU architecture): check the sidecar against the server image.

Nothing here runs without TensorRT and an NVIDIA GPU; :func:`preflight` says which is missing.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from distrifusion.export import TEXT_ENCODER, TEXT_ENCODER_2, VAE_ENGINES, VAE_WHOLE, StageSpec
from distrifusion.export.specs import VAE_ENCODER_ENGINES, VAE_ENCODER_WHOLE

PLAN_NAME = "model.plan"
SIDECAR_NAME = "model.plan.json"
DEFAULT_WORKSPACE_BYTES = 8 << 30


class TensorRTUnavailable(RuntimeError):
    """The gpu target cannot build engines on this machine (TensorRT and/or a GPU missing)."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """min/opt/max shapes per input name, batch dimension included."""

    shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]


def preflight() -> dict[str, Any]:
    """Import TensorRT and find a CUDA GPU, or raise :class:`TensorRTUnavailable` naming what is missing."""
    missing = []
    trt = None
    try:
        trt = importlib.import_module("tensorrt")
    except Exception as err:  # ImportError, or OSError for a missing libnvinfer / libnvonnxparser
        missing.append(
            f"the TensorRT Python module `tensorrt` cannot be imported ({type(err).__name__}: {err})"
        )
    gpu_name = None
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            gpu_name = torch.cuda.get_device_name(0)
            capability = ".".join(map(str, torch.cuda.get_device_capability(0)))
        else:
            missing.append("no NVIDIA GPU is visible (torch.cuda.is_available() is False)")
    except Exception as err:
        missing.append(f"no NVIDIA GPU could be queried ({type(err).__name__}: {err})")
    if missing:
        raise TensorRTUnavailable(
            "--target gpu builds TensorRT engines and needs TensorRT and an NVIDIA GPU, but "
            + "; and ".join(missing)
            + ". Build on a GPU machine with the TensorRT Python package of the same version as the "
            "Triton server that will load the engines (e.g. inside the tritonserver image), or use "
            "--target cpu (ONNX Runtime, no GPU needed)."
        )
    assert trt is not None
    return {"tensorrt_version": trt.__version__, "gpu": gpu_name, "compute_capability": capability}


def encoder_profile(spec: StageSpec, batch_sizes: Sequence[int]) -> Profile:
    (tensor,) = spec.inputs
    length = tensor.dims
    return Profile(
        {
            tensor.name: (
                (1, *length),
                (min(batch_sizes), *length),
                (max(batch_sizes), *length),
            )
        }
    )


def vae_engine_profile(
    spec: StageSpec, settings: Any, requests: Any, resolutions: Sequence[tuple[int, int]]
) -> Profile:
    """The profile of one VAE engine (:class:`~distrifusion.vae.decode.DecodeSettings`): the whole
    engine takes one latent from the smallest accepted size up to the largest that decodes whole
    (opt: the first of ``resolutions``, (width, height) px); the tile engines take up to
    ``tiles_per_call`` tiles up to a tile's size. Inputs of fixed dims (GroupNorm statistics) keep them.
    The encoder's engines (``pixels`` in, at ``scale`` image pixels per latent pixel) take the same
    sizes as the decoder's: the stage encodes whole and in tiles where the decoder would."""
    scale = settings.footprint.scale_factor
    smallest = (requests.min_height // scale or 1, requests.min_width // scale or 1)
    if spec.name in (VAE_WHOLE, VAE_ENCODER_WHOLE):
        largest = settings.whole_max_latent
        opt_w, opt_h = resolutions[0]
        opt = (min(opt_h // scale, largest[0]), min(opt_w // scale, largest[1]))
        batches = (1, 1, 1)
    else:
        largest = (settings.tile, settings.tile)
        opt = largest
        batches = (1, settings.tiles_per_call, settings.tiles_per_call)
    smallest = (min(smallest[0], largest[0]), min(smallest[1], largest[1]))
    shapes = {}
    for tensor in spec.inputs:
        if tensor.dims[-2:] == (-1, -1):
            factor = scale if tensor.name == "pixels" else 1
            sizes = (smallest, opt, largest)
            shapes[tensor.name] = tuple(
                (batch, *tensor.dims[:-2], size[0] * factor, size[1] * factor)
                for batch, size in zip(batches, sizes, strict=True)
            )
        else:
            shapes[tensor.name] = tuple((batch, *tensor.dims) for batch in batches)
    return Profile(shapes)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def build_engine(
    onnx_path: Path,
    plan_path: Path,
    spec: StageSpec,
    profile: Profile,
    fp16: bool,
    workspace_bytes: int = DEFAULT_WORKSPACE_BYTES,
) -> dict[str, Any]:
    """Parse ``onnx_path``, build one engine, write it and its sidecar; returns the sidecar dict."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = int(trt.__version__.split(".")[0])
    # TensorRT 10 networks are always explicit-batch (the flag is deprecated there).
    flags = 0 if major >= 10 else 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    # From the file, so that external weights (<name>.onnx_data) beside it are found.
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"{spec.name}: TensorRT could not parse {onnx_path}: {errors}")
    names_in = [network.get_input(i).name for i in range(network.num_inputs)]
    names_out = [network.get_output(i).name for i in range(network.num_outputs)]
    if names_in != list(spec.input_names) or names_out != list(spec.output_names):
        raise RuntimeError(
            f"{spec.name}: TensorRT network has inputs {names_in} and outputs {names_out}, expected "
            f"{list(spec.input_names)} and {list(spec.output_names)}"
        )

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    else:
        # fp32 math with TF32 tensor cores (the default; set explicitly so the intent is recorded).
        config.set_flag(trt.BuilderFlag.TF32)
    trt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.shapes.items():
        trt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(trt_profile)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"{spec.name}: TensorRT failed to build the engine (see its log above)")
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_bytes(bytes(serialized))

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
    if engine is None:
        raise RuntimeError(f"{spec.name}: the engine just built does not deserialize")
    io = {engine.get_tensor_name(i) for i in range(engine.num_io_tensors)}
    if io != set(spec.input_names) | set(spec.output_names):
        raise RuntimeError(f"{spec.name}: engine tensors {sorted(io)} do not match the spec")

    import torch

    sidecar = {
        "model": spec.name,
        "tensorrt_version": trt.__version__,
        "gpu": torch.cuda.get_device_name(0),
        "compute_capability": ".".join(map(str, torch.cuda.get_device_capability(0))),
        "precision": "fp16" if fp16 else "fp32+tf32",
        "profiles": [
            {name: {"min": lo, "opt": opt, "max": hi} for name, (lo, opt, hi) in profile.shapes.items()}
        ],
        "onnx_sha256": sha256(onnx_path),
        "built_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    (plan_path.parent / SIDECAR_NAME).write_text(json.dumps(sidecar, indent=2) + "\n")
    return sidecar


def stage_precision(stage: str) -> bool:
    """True for fp16 engines (the text encoders), False for fp32+TF32 (the VAE's)."""
    if stage in (TEXT_ENCODER, TEXT_ENCODER_2):
        return True
    if stage in VAE_ENGINES or stage in VAE_ENCODER_ENGINES:
        return False
    raise KeyError(stage)
