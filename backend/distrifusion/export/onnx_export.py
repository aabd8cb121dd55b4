"""ONNX export of the SDXL text encoders and VAE decoder, and the check against PyTorch.

Exports use the TorchScript exporter (opset 17, which TensorRT 8.6+ parses), with a dynamic
batch dimension everywhere and a dynamic latent height and width for the VAE decoder. A model
whose weights exceed ``external_data_threshold`` bytes (SDXL's text_encoder_2 is ~2.8 GB in
fp32, over protobuf's 2 GB limit) keeps them in one ``<name>.onnx_data`` file beside the graph;
ONNX Runtime and TensorRT's ONNX parser find it there.

:func:`check_stage` runs the ONNX file with ONNX Runtime and compares it with the torch module it
came from: float outputs must agree within ``atol + rtol * max|reference|``, uint8 images
within 1 (rounding of values that land on .5) on at most ``max_mismatch_fraction`` of values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional

from .attention import fused_attention_export
from .specs import (
    TEXT_ENCODER,
    TEXT_ENCODER_2,
    VAE_DECODER,
    VAE_ENCODER_WHOLE,
    VAE_WHOLE,
    StageSpec,
    text_encoder_2_spec,
    text_encoder_spec,
    vae_decoder_spec,
    vae_encoder_spec,
)
from .wrappers import ExportError, TextEncoderExport, VaeDecoderExport, VaeEncoderExport

DEFAULT_OPSET = 17
# Below protobuf's hard 2 GiB limit, with room for the graph itself.
DEFAULT_EXTERNAL_DATA_THRESHOLD = 1_800_000_000

_ONNX_ELEM_TYPES = {
    "float32": 1,  # onnx.TensorProto.FLOAT
    "uint8": 2,
    "int32": 6,
    "int64": 7,
    "bool": 9,
}

_ORT_TYPES = {
    "tensor(float)": np.float32,
    "tensor(uint8)": np.uint8,
    "tensor(int32)": np.int32,
    "tensor(int64)": np.int64,
    "tensor(bool)": np.bool_,
}


@dataclasses.dataclass
class ExportedStage:
    spec: StageSpec
    path: Path
    seconds: float
    external_data: bool


@dataclasses.dataclass
class CheckResult:
    """ONNX Runtime against PyTorch for one stage, over all check cases."""

    stage: str
    max_abs_error: dict[str, float]
    limit: dict[str, float]
    mismatch_fraction: dict[str, float]
    cases: int
    seconds: float

    @property
    def passed(self) -> bool:
        return all(self.max_abs_error[name] <= self.limit[name] for name in self.max_abs_error)

    def summary(self) -> str:
        parts = []
        for name, err in self.max_abs_error.items():
            text = f"{name} max abs error {err:.3g} (limit {self.limit[name]:.3g}"
            if self.mismatch_fraction.get(name):
                text += f", {100 * self.mismatch_fraction[name]:.3f}% of values differ"
            parts.append(text + ")")
        verdict = "ok" if self.passed else "FAILED"
        return f"{self.stage}: {verdict}: " + "; ".join(parts) + f" over {self.cases} case(s)"


def load_components(model_dir: str | Path, variant: str | None = None) -> dict[str, nn.Module]:
    """The two text encoders and the VAE of a diffusers SDXL directory, in fp32, eval mode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    model_dir = Path(model_dir)
    missing = [n for n in ("text_encoder", "text_encoder_2", "vae") if not (model_dir / n).is_dir()]
    if missing:
        raise ExportError(f"{model_dir} is not an SDXL diffusers directory: missing {', '.join(missing)}/")
    kwargs: dict[str, Any] = {"local_files_only": True}
    if variant:
        kwargs["variant"] = variant
    components = {
        TEXT_ENCODER: CLIPTextModel.from_pretrained(model_dir / "text_encoder", **kwargs),
        TEXT_ENCODER_2: CLIPTextModelWithProjection.from_pretrained(model_dir / "text_encoder_2", **kwargs),
        VAE_DECODER: AutoencoderKL.from_pretrained(model_dir / "vae", **kwargs),
    }
    return {name: module.float().eval() for name, module in components.items()}


def stage_modules(components: Mapping[str, nn.Module]) -> dict[str, tuple[nn.Module, StageSpec]]:
    """The export wrapper and tensor spec of each ONNX stage.

    ``components`` maps ``text_encoder``, ``text_encoder_2`` and ``vae_decoder`` to the diffusers
    modules (a pipeline's ``text_encoder``, ``text_encoder_2`` and ``vae``).
    """
    te1 = TextEncoderExport(components[TEXT_ENCODER], with_projection=False)
    te2 = TextEncoderExport(components[TEXT_ENCODER_2], with_projection=True)
    if te1.max_length != te2.max_length:
        raise ExportError(f"the text encoders take {te1.max_length} and {te2.max_length} tokens")
    return {
        TEXT_ENCODER: (te1.eval(), text_encoder_spec(te1.max_length, te1.hidden_size)),
        TEXT_ENCODER_2: (
            te2.eval(),
            text_encoder_2_spec(te2.max_length, te2.hidden_size, te2.projection_dim),
        ),
        **vae_stage_modules(components[VAE_DECODER]),
    }


def vae_stage_modules(vae: nn.Module) -> dict[str, tuple[nn.Module, StageSpec]]:
    """The six VAE engines' export wrappers and specs: the decoder's and the encoder's whole-image,
    tile statistics and tile engines."""
    from ..vae.export import (  # imports this package
        TileDecoderExport,
        TileEncoderExport,
        TileEncoderStatisticsExport,
        TileStatisticsExport,
    )

    whole = VaeDecoderExport(vae)
    encoder = VaeEncoderExport(vae)
    modules = [
        TileStatisticsExport(vae),
        TileDecoderExport(vae),
        TileEncoderStatisticsExport(vae),
        TileEncoderExport(vae),
    ]
    return {
        VAE_WHOLE: (whole.eval(), vae_decoder_spec(whole.latent_channels, VAE_WHOLE)),
        VAE_ENCODER_WHOLE: (encoder.eval(), vae_encoder_spec(encoder.latent_channels)),
        **{module.spec().name: (module.eval(), module.spec()) for module in modules},
    }


def dynamic_axes(spec: StageSpec) -> dict[str, dict[int, str]]:
    """Batch on dim 0 of every tensor; named axes for each -1 dim of the spec."""
    axes: dict[str, dict[int, str]] = {}
    for tensor in (*spec.inputs, *spec.outputs):
        entry = {0: "batch"}
        for i, dim in enumerate(tensor.dims):
            if dim == -1:
                entry[i + 1] = f"{tensor.name}_dim{i + 1}"
        axes[tensor.name] = entry
    return axes


def _initializer_bytes(model: Any) -> int:
    from onnx import numpy_helper

    total = 0
    for tensor in model.graph.initializer:
        total += len(tensor.raw_data) if tensor.raw_data else numpy_helper.to_array(tensor).nbytes
    return total


def export_stage(
    module: nn.Module,
    spec: StageSpec,
    path: str | Path,
    example_inputs: Mapping[str, np.ndarray],
    opset: int = DEFAULT_OPSET,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    fused_attention: bool = False,
) -> ExportedStage:
    """Export ``module`` to ``path`` (``model.onnx``) with the spec's names and dynamic axes.

    ``example_inputs`` should have a batch of at least 2, so that no batch-1 shortcut is traced.
    ``fused_attention``: attention as ONNX Runtime's ``MultiHeadAttention`` (:mod:`.attention`;
    ONNX Runtime only).
    """
    import onnx

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    args = tuple(torch.from_numpy(np.ascontiguousarray(example_inputs[name])) for name in spec.input_names)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".export-") as tmp:
        tmp_path = Path(tmp) / "model.onnx"
        attention = fused_attention_export() if fused_attention else contextlib.nullcontext({})
        with warnings.catch_warnings(), torch.no_grad(), attention as custom_opsets:
            # The TorchScript exporter warns about itself and about traced Python conditionals
            # that are constant for the model (checked by the ONNX Runtime comparison instead).
            warnings.simplefilter("ignore")
            torch.onnx.export(
                module,
                args,
                str(tmp_path),
                dynamo=False,
                opset_version=opset,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                dynamic_axes=dynamic_axes(spec),
                do_constant_folding=True,
                custom_opsets=custom_opsets,
            )
        model = onnx.load(str(tmp_path), load_external_data=True)
        external = _initializer_bytes(model) > external_data_threshold
        for stale in (path, path.with_name(path.name + "_data")):
            stale.unlink(missing_ok=True)
        if external:
            onnx.save_model(
                model,
                str(path),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=path.name + "_data",
                size_threshold=1024,
            )
        else:
            onnx.save_model(model, str(path))
        del model
    verify_onnx_io(path, spec)
    return ExportedStage(spec, path, time.perf_counter() - start, external)


def verify_onnx_io(path: str | Path, spec: StageSpec) -> None:
    """The ONNX graph's inputs and outputs have the spec's names, types, ranks and a dynamic batch.

    A dim the graph leaves symbolic passes where the spec has a fixed size (the exporter does
    not infer every output dim); a fixed size there must equal the spec's.
    """
    import onnx

    onnx.checker.check_model(str(path))
    model = onnx.load(str(path), load_external_data=False)
    graph_inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    for kind, actual, expected in (
        ("input", graph_inputs, spec.inputs),
        ("output", model.graph.output, spec.outputs),
    ):
        names = [v.name for v in actual]
        if names != [t.name for t in expected]:
            raise ExportError(f"{spec.name}: ONNX {kind}s are {names}, expected {[t.name for t in expected]}")
        for value, tensor in zip(actual, expected, strict=True):
            ttype = value.type.tensor_type
            if ttype.elem_type != _ONNX_ELEM_TYPES[tensor.dtype]:
                raise ExportError(
                    f"{spec.name}: ONNX {kind} {tensor.name} has element type {ttype.elem_type}, "
                    f"expected {tensor.dtype}"
                )
            dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
            expected_dims = [-1, *tensor.dims]
            if len(dims) != len(expected_dims) or any(
                -1 not in (d, e) and d != e for d, e in zip(dims, expected_dims, strict=True)
            ):
                raise ExportError(
                    f"{spec.name}: ONNX {kind} {tensor.name} has dims {dims}, expected {expected_dims}"
                )
            if dims[0] != -1:
                raise ExportError(f"{spec.name}: ONNX {kind} {tensor.name} has a static batch dimension")


def ort_session(path: str | Path, threads: int | None = None) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    # The priority-based order frees the tile-statistics graph's activations sooner: its peak
    # halves (measured on the tiny model, 8 tiles of 64 x 64 latent pixels: 2773 -> 1403 MiB).
    options.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    # With its memory pattern on, ONNX Runtime allocates the planned peak again at a shape's second
    # call while its arena keeps the first's (measured: 1.6 -> 3.2 GiB for 8 tiles); no slower off.
    options.enable_mem_pattern = False
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_ort(session: Any, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Run an ONNX Runtime session, casting each feed to the type the graph declares."""
    inputs = {
        i.name: np.ascontiguousarray(feeds[i.name], dtype=_ORT_TYPES[i.type]) for i in session.get_inputs()
    }
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=True))


def run_torch(module: nn.Module, spec: StageSpec, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    args = [torch.from_numpy(np.ascontiguousarray(feeds[name])) for name in spec.input_names]
    with torch.no_grad():
        out = module(*args)
    if isinstance(out, torch.Tensor):
        out = (out,)
    return {name: t.numpy() for name, t in zip(spec.output_names, out, strict=True)}


def check_stage(
    module: nn.Module,
    spec: StageSpec,
    path: str | Path,
    cases: Sequence[Mapping[str, np.ndarray]],
    atol: float = 1e-3,
    rtol: float = 1e-3,
    max_mismatch_fraction: float = 0.01,
    threads: int | None = None,
) -> CheckResult:
    """Compare ONNX Runtime with PyTorch on every case; see the module docstring for the limits."""
    start = time.perf_counter()
    session = ort_session(path, threads)
    max_err = dict.fromkeys(spec.output_names, 0.0)
    scale = dict.fromkeys(spec.output_names, 0.0)
    mismatch = dict.fromkeys(spec.output_names, 0.0)
    for feeds in cases:
        got = run_ort(session, feeds)
        want = run_torch(module, spec, feeds)
        for tensor in spec.outputs:
            name = tensor.name
            a, b = got[name], want[name]
            if a.shape != b.shape or a.dtype != b.dtype:
                raise ExportError(
                    f"{spec.name}: ONNX Runtime output {name} is {a.dtype}{list(a.shape)}, "
                    f"PyTorch's is {b.dtype}{list(b.shape)}"
                )
            if not a.size:
                continue
            if tensor.dtype == "uint8":
                diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
                max_err[name] = max(max_err[name], float(diff.max()))
                mismatch[name] = max(mismatch[name], float((diff > 0).mean()))
            elif not np.isfinite(a).all():
                max_err[name] = float("inf")
            else:
                max_err[name] = max(max_err[name], float(np.abs(a.astype(np.float64) - b).max()))
                scale[name] = max(scale[name], float(np.abs(b).max()))
    limit = {}
    for tensor in spec.outputs:
        if tensor.dtype == "uint8":
            # Values landing on .5 may round either way; many of them would mean a real error.
            limit[tensor.name] = 1.0 if mismatch[tensor.name] <= max_mismatch_fraction else 0.0
        else:
            limit[tensor.name] = atol + rtol * scale[tensor.name]
    return CheckResult(spec.name, max_err, limit, mismatch, len(cases), time.perf_counter() - start)


def text_encoder_cases(input_ids: np.ndarray) -> list[dict[str, np.ndarray]]:
    """Check cases for a text encoder: the whole batch, then its first row alone (batch 1)."""
    input_ids = np.asarray(input_ids, dtype=np.int32)
    return [{"input_ids": input_ids}, {"input_ids": input_ids[:1]}]


def vae_encoder_cases(
    sizes: Sequence[tuple[int, int, int]], seed: int = 0, module: nn.Module | None = None
) -> list[dict[str, np.ndarray]]:
    """Random pictures ``(batch, H, W)`` per case: float pixels in 0..255, smooth (a random field
    upsampled, as pictures are) with pixel noise, and for a tile engine (``module``) its other inputs."""
    rng = np.random.default_rng(seed)
    cases = []
    for batch, height, width in sizes:
        coarse = torch.from_numpy(rng.uniform(0, 255, (batch, 3, max(1, height // 8), max(1, width // 8))))
        smooth = functional.interpolate(coarse, size=(height, width), mode="bilinear").numpy()
        pixels = (smooth + rng.normal(0, 8, smooth.shape)).clip(0, 255).astype(np.float32)
        cases.append({"pixels": pixels})
    if module is None or not hasattr(module, "example_inputs"):
        return cases
    return [module.example_inputs(case["pixels"], seed + index) for index, case in enumerate(cases)]


def vae_decoder_cases(
    latent_channels: int,
    sizes: Sequence[tuple[int, int, int]],
    seed: int = 0,
    module: nn.Module | None = None,
) -> list[dict[str, np.ndarray]]:
    """Random latents ``(batch, h, w)`` per case, at the scale of real final latents, and for a tile
    engine (``module``) the other inputs it takes."""
    rng = np.random.default_rng(seed)
    # Real final latents are the scaled VAE latents: roughly unit variance.
    cases = [
        {"latents": rng.standard_normal((b, latent_channels, h, w)).astype(np.float32)} for b, h, w in sizes
    ]
    if module is None or not hasattr(module, "example_inputs"):
        return cases
    return [module.example_inputs(case["latents"], seed + index) for index, case in enumerate(cases)]
