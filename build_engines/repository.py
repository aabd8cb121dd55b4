"""Model repository generation: configs from the ``model_repository/`` templates, files, checks.

Layout written (both targets)::

    <repo>/sdxl/config.pbtxt, sdxl/1/                  ensemble (platform "ensemble")
    <repo>/tokenizer/config.pbtxt, 1/model.py, 1/tokenizer/, 1/tokenizer_2/
    <repo>/text_encoder/config.pbtxt, 1/...            gpu: 1/model.plan (+ model.plan.json)
    <repo>/text_encoder_2/config.pbtxt, 1/...          cpu: 1/model.py + 1/model.onnx
    <repo>/vae_decoder/config.pbtxt, 1/...             (and its engines vae_decoder_whole, ..._tile_statistics, ..._tiles)
    <repo>/vae_encoder/config.pbtxt, 1/...             image-to-image, called by unet (and its three engines)
    <repo>/unet/config.pbtxt, 1/model.py (and whatever else model_repository/unet/ holds),
          1/stage_config.json  the stage's settings (distrifusion.serving.stage_config)
          1/model/  diffusers-format: model_index.json (only unet and scheduler), unet/, scheduler/,
                    vae/config.json (the latent scaling, no weights)
          1/model/latent_rgb.json  the latent-to-RGB map for step previews (when the VAE has one)
    <repo>/sdxl_stream/config.pbtxt, 1/model.py, 1/ensemble_steps.json   decoupled, the ensemble's
          steps through BLS with step progress and previews (distrifusion.serving.stream)
    <repo>/readiness_gate/config.pbtxt, 1/model.py     loaded by the supervisor during recovery only
    <repo>/build_manifest.json                          what was built, from what, with which checks
"""

from __future__ import annotations

import copy
import json
import re
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from google.protobuf import text_format
from tritonclient.grpc.model_config_pb2 import DataType, ModelConfig, ModelInstanceGroup

from distrifusion.config import ConfigError
from distrifusion.export import StageSpec, TensorSpec
from distrifusion.latent_space import VAE_CONFIG as LATENT_SPACE_CONFIG
from distrifusion.serving.stage_config import STAGE_CONFIG_NAME, StageConfig
from distrifusion.serving.stream import PLAN_FILE, PREVIEW_INPUTS, EnsembleStep, StreamPlan
from distrifusion.serving.tokenize import OUTPUT_NAMES as TOKENIZER_OUTPUTS
from distrifusion.serving.unet_stage import IMAGE_INPUTS as UNET_IMAGE_INPUTS
from distrifusion.serving.unet_stage import OPTIONAL_INPUTS as UNET_OPTIONAL_INPUTS
from distrifusion.serving.unet_stage import OUTPUTS as UNET_OUTPUTS
from distrifusion.serving.unet_stage import REQUIRED_INPUTS as UNET_REQUIRED_INPUTS
from distrifusion.serving.unet_stage import STREAM_INPUTS as UNET_STREAM_INPUTS

TEMPLATES_DIR = Path(__file__).resolve().parents[1] / "model_repository"
ENSEMBLE = "sdxl"
STREAM = "sdxl_stream"
TOKENIZER = "tokenizer"
UNET = "unet"
ONNX_RUNTIME_TEMPLATE = "onnx_runtime"
# Copied next to every Python-backend model.py: their one shared module that imports Triton.
TRITON_GLUE = "triton_glue.py"

TRITON_TYPES = {
    "bool": "TYPE_BOOL",
    "uint8": "TYPE_UINT8",
    "int32": "TYPE_INT32",
    "int64": "TYPE_INT64",
    "float32": "TYPE_FP32",
    "bytes": "TYPE_STRING",
}


class RepositoryError(RuntimeError):
    pass


# The request's generation options. The UNet stage reads them; the tokenizer accepts and ignores
# them, so that a request without ``prompt`` still reaches it (a Python-backend model cannot
# receive a request with no input at all) and is rejected with an error naming ``prompt``.
REQUEST_OPTIONS = (
    TensorSpec("height", "int32", (1,)),
    TensorSpec("width", "int32", (1,)),
    TensorSpec("num_inference_steps", "int32", (1,)),
    TensorSpec("guidance_scale", "float32", (1,)),
    TensorSpec("seed", "int64", (1,)),
    TensorSpec("scheduler", "bytes", (1,)),
    TensorSpec("input_image", "uint8", (-1, -1, 3)),
    TensorSpec("strength", "float32", (1,)),
    TensorSpec("first_pass_size", "int32", (2,)),
)


def tokenizer_spec(max_length: int) -> StageSpec:
    """The tokenizer's tensors: ids ``int32 [max_length]`` for each encoder, flags ``bool [1]``."""
    outputs = tuple(
        TensorSpec(name, "int32", (max_length,)) if "input_ids" in name else TensorSpec(name, "bool", (1,))
        for name in TOKENIZER_OUTPUTS
    )
    inputs = (TensorSpec("prompt", "bytes", (1,)), TensorSpec("negative_prompt", "bytes", (1,)))
    return StageSpec(TOKENIZER, inputs=inputs + REQUEST_OPTIONS, outputs=outputs)


def parse_config(text: str) -> ModelConfig:
    """A ``config.pbtxt`` text as Triton's ``ModelConfig`` message (its compiled schema from tritonclient).

    protobuf's text-format parser checks the text against that schema: an unknown field, a value
    of the wrong kind, an unknown enum name or a non-repeated field given twice raises
    ``text_format.ParseError`` (line:column and the reason in its message).
    """
    return text_format.Parse(text, ModelConfig())


def format_config(msg: ModelConfig, header: str = "") -> str:
    """``msg`` in text format, after ``header`` written as ``#`` comment lines."""
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    return comments + text_format.MessageToString(msg)


def validate_config(msg: ModelConfig) -> list[str]:
    """What Triton requires of a config beyond its schema (empty when valid): a name, a platform or
    backend, a data_type and dims for every tensor, no tensor name twice."""
    errors: list[str] = []
    if not msg.name:
        errors.append("name: missing")
    if not (msg.platform or msg.backend):
        errors.append("neither platform nor backend is set")
    for kind, tensors in (("input", msg.input), ("output", msg.output)):
        for t in tensors:
            if t.data_type == DataType.TYPE_INVALID or not t.dims:
                errors.append(f"{kind} {t.name!r}: data_type and dims are required")
        names = [t.name for t in tensors]
        if len(set(names)) != len(names):
            errors.append(f"{kind}: duplicate tensor names {names}")
    return errors


def load_template(templates: Path, name: str) -> ModelConfig:
    path = templates / name / "config.pbtxt"
    if not path.is_file():
        raise RepositoryError(f"template {path} is missing")
    try:
        return parse_config(path.read_text(encoding="utf-8"))
    except text_format.ParseError as err:
        raise RepositoryError(f"{path}: {err}") from err


def _type(data_type: int) -> str:
    """``TYPE_FP32`` for ``DataType.TYPE_FP32`` (the number for a value the schema does not name)."""
    try:
        return DataType.Name(data_type)
    except ValueError:
        return str(data_type)


def _tensors(tensors: Iterable[Any]) -> dict[str, Any]:
    """``ModelInput``/``ModelOutput`` messages by name."""
    return {t.name: t for t in tensors}


def stage_config(
    template: ModelConfig,
    spec: StageSpec,
    max_batch_size: int,
    platform: str | None,
    instance_kind: str,
    gpus: Sequence[int] = (),
) -> ModelConfig:
    """The served config of a stage: the template's fields, the spec's tensors, the target's backend.

    The template must name the same tensors with the same types as the spec (it documents them);
    dims come from the spec (the model's config), ``optional`` flags from the template. ``gpus``:
    one instance on each of these GPUs (``KIND_GPU``; without a list Triton puts ``count`` on every
    GPU it sees: Triton's model configuration docs, "Instance Groups").
    """
    msg = copy.deepcopy(template)
    for kind, specs in (("input", spec.inputs), ("output", spec.outputs)):
        tensors = getattr(msg, kind)
        declared = _tensors(tensors)
        if list(declared) != [t.name for t in specs]:
            raise RepositoryError(
                f"template {spec.name}: {kind}s {list(declared)} differ from the exported "
                f"{[t.name for t in specs]}"
            )
        new = []
        for t in specs:
            old = declared[t.name]
            data_type = _type(old.data_type)
            if data_type != TRITON_TYPES[t.dtype]:
                raise RepositoryError(
                    f"template {spec.name}: {kind} {t.name} is {data_type}, the model's is {TRITON_TYPES[t.dtype]}"
                )
            tensor = type(old)(name=t.name, data_type=old.data_type, dims=t.dims)
            if kind == "input":
                tensor.optional = old.optional
            new.append(tensor)
        del tensors[:]
        tensors.extend(new)
    msg.name = spec.name
    msg.max_batch_size = max_batch_size
    if platform is None:
        msg.ClearField("platform")
        msg.backend = "python"
    else:
        msg.ClearField("backend")
        msg.platform = platform
    del msg.instance_group[:]
    kind = ModelInstanceGroup.Kind.Value(instance_kind)
    if kind == ModelInstanceGroup.KIND_GPU and not gpus:
        raise RepositoryError(f"{spec.name}: a KIND_GPU instance group needs its GPUs listed")
    msg.instance_group.add(count=1, kind=kind, gpus=list(gpus))
    return msg


QUEUED_BATCHES = 2
"""Default depth of the UNet stage's queue, in full batches per instance. Each instance takes up to
max_batch_size requests at once (dynamic batcher, no delay); with this many batches waiting, the
last request admitted starts within 2 batch times, so its latency stays under 3 times that of a
request on an idle server. A request beyond that is better refused at once (UNAVAILABLE) and
retried, on this replica later or on another one that the autoscaler adds; Triton refuses it
before it holds any memory. Waiting requests hold only their text conditioning (about 1.3 MB
each), so memory does not set the bound; latency does."""


def max_queue_size(max_batch_size: int, instances: int) -> int:
    """The default bound of the UNet stage's queue (:data:`QUEUED_BATCHES`)."""
    return QUEUED_BATCHES * max_batch_size * instances


def unet_config(template: ModelConfig, max_batch_size: int, instances: int, queue_size: int) -> ModelConfig:
    """The served UNet config: the template with the instance count, batch size and queue bound
    (the stage's own settings are its stage_config.json, not parameters)."""
    msg = copy.deepcopy(template)
    inputs = _tensors(msg.input)
    outputs = _tensors(msg.output)
    missing = [
        n
        for n in (*UNET_REQUIRED_INPUTS, *UNET_OPTIONAL_INPUTS, *UNET_IMAGE_INPUTS, *UNET_STREAM_INPUTS)
        if n not in inputs
    ]
    missing += [f"output {n}" for n in UNET_OUTPUTS if n not in outputs]
    if missing:
        raise RepositoryError(f"model_repository/unet/config.pbtxt lacks {', '.join(missing)}")
    if msg.parameters:
        raise RepositoryError(
            f"model_repository/unet/config.pbtxt: parameters {sorted(msg.parameters)} would not be read "
            "(the stage's settings are build_engines flags, written to stage_config.json)"
        )
    if not msg.HasField("dynamic_batching"):
        raise RepositoryError(
            "model_repository/unet/config.pbtxt lacks dynamic_batching (the queue bound lives there)"
        )
    msg.max_batch_size = max_batch_size
    msg.dynamic_batching.default_queue_policy.max_queue_size = queue_size
    del msg.instance_group[:]
    msg.instance_group.add(count=instances, kind=ModelInstanceGroup.KIND_MODEL)
    return msg


def ensemble_config(template: ModelConfig, max_batch_size: int) -> ModelConfig:
    msg = copy.deepcopy(template)
    msg.max_batch_size = max_batch_size
    return msg


def stream_config(template: ModelConfig, ensemble: ModelConfig, max_active_streams: int) -> ModelConfig:
    """The served sdxl_stream config: the ensemble's batch size, and the bound on streams."""
    msg = copy.deepcopy(template)
    msg.max_batch_size = ensemble.max_batch_size
    msg.parameters["max_active_streams"].string_value = str(max_active_streams)
    return msg


def stream_plan(ensemble: ModelConfig) -> StreamPlan:
    """The ensemble's steps, as sdxl_stream runs them."""
    steps = tuple(
        EnsembleStep(step.model_name, dict(step.input_map), dict(step.output_map))
        for step in ensemble.ensemble_scheduling.step
    )
    return StreamPlan(steps=steps, outputs=tuple(t.name for t in ensemble.output), unet_model=UNET)


def check_stream(stream: ModelConfig, ensemble: ModelConfig, plan: StreamPlan) -> list[str]:
    """sdxl_stream takes the ensemble's inputs (plus the preview ones), returns its outputs, with the
    same types and batch size, and runs the ensemble's steps."""
    errors = []
    for role, ours, theirs in (
        ("input", stream.input, ensemble.input),
        ("output", stream.output, ensemble.output),
    ):
        ours_by_name = _tensors(ours)
        for tensor in theirs:
            mine = ours_by_name.get(tensor.name)
            if mine is None:
                errors.append(f"{STREAM}: lacks the ensemble's {role} {tensor.name!r}")
            elif mine.data_type != tensor.data_type or list(mine.dims) != list(tensor.dims):
                errors.append(f"{STREAM}: {role} {tensor.name!r} differs from the ensemble's")
    extra = set(_tensors(stream.input)) - set(_tensors(ensemble.input)) - set(PREVIEW_INPUTS)
    if extra:
        errors.append(f"{STREAM}: inputs {sorted(extra)} are neither the ensemble's nor preview settings")
    if stream.max_batch_size != ensemble.max_batch_size:
        errors.append(
            f"{STREAM}: max_batch_size {stream.max_batch_size}, the ensemble's {ensemble.max_batch_size}"
        )
    if not stream.model_transaction_policy.decoupled:
        errors.append(f"{STREAM}: not decoupled")
    if plan != stream_plan(ensemble):
        errors.append(f"{STREAM}: 1/{PLAN_FILE} is not the ensemble's steps")
    return errors


def _compatible(a: Sequence[int], b: Sequence[int]) -> bool:
    return len(a) == len(b) and all(x == y or -1 in (x, y) for x, y in zip(a, b, strict=True))


def check_ensemble(ensemble: ModelConfig, models: Mapping[str, ModelConfig]) -> list[str]:
    """Inconsistencies between the ensemble's steps and its composing models' configs.

    Every mapped tensor must exist in the model config, with one producer, the same data type
    and compatible dims; every required model input must be fed, and not from an optional
    ensemble input; every composing model must allow the ensemble's batch size.
    """
    errors: list[str] = []
    name = ensemble.name
    if ensemble.platform != "ensemble":
        errors.append(f"{name}: platform is {ensemble.platform!r}, not 'ensemble'")
    batch = ensemble.max_batch_size
    # tensor -> (producer, data_type, dims, optional)
    produced: dict[str, tuple[str, str, list[int], bool]] = {}
    for t in ensemble.input:
        produced[t.name] = ("the request", _type(t.data_type), list(t.dims), t.optional)
    steps = ensemble.ensemble_scheduling.step
    if not steps:
        errors.append(f"{name}: no ensemble_scheduling steps")
    for i, step in enumerate(steps):
        model = step.model_name
        where = f"step {i} ({model})"
        config = models.get(model)
        if config is None:
            errors.append(f"{where}: no model {model!r} in the repository")
            continue
        outputs = _tensors(config.output)
        for key, value in sorted(step.output_map.items()):
            out = outputs.get(key)
            if out is None:
                errors.append(f"{where}: {model} has no output {key!r}")
                continue
            if value in produced:
                errors.append(
                    f"{where}: ensemble tensor {value!r} is already produced by {produced[value][0]}"
                )
                continue
            produced[value] = (where, _type(out.data_type), list(out.dims), False)
    for i, step in enumerate(steps):
        model = step.model_name
        where = f"step {i} ({model})"
        config = models.get(model)
        if config is None:
            continue
        model_batch = config.max_batch_size
        if batch > 0 and model_batch < batch:
            errors.append(f"{where}: {model} allows batch {model_batch}, the ensemble {batch}")
        inputs = _tensors(config.input)
        fed = set()
        for key, value in sorted(step.input_map.items()):
            target = inputs.get(key)
            if target is None:
                errors.append(f"{where}: {model} has no input {key!r}")
                continue
            fed.add(key)
            source = produced.get(value)
            if source is None:
                errors.append(f"{where}: input {key!r} reads {value!r}, which nothing produces")
                continue
            producer, data_type, dims, optional = source
            if data_type != _type(target.data_type):
                errors.append(
                    f"{where}: input {key!r} is {_type(target.data_type)}, {value!r} from {producer} is {data_type}"
                )
            if not _compatible(dims, list(target.dims)):
                errors.append(
                    f"{where}: input {key!r} has dims {list(target.dims)}, {value!r} from {producer} has {dims}"
                )
            if optional and not target.optional:
                errors.append(f"{where}: required input {key!r} is fed from optional request input {value!r}")
        for key, target in inputs.items():
            if key not in fed and not target.optional:
                errors.append(f"{where}: required input {key!r} of {model} is not mapped")
    used = {value for step in steps for value in step.input_map.values()}
    for t in ensemble.input:
        if t.name not in used:
            errors.append(f"{name}: request input {t.name!r} is not used by any step")
    for out in ensemble.output:
        source = produced.get(out.name)
        if source is None or source[0] == "the request":
            errors.append(f"{name}: output {out.name!r} is not produced by any step")
            continue
        producer, data_type, dims, _ = source
        if data_type != _type(out.data_type):
            errors.append(
                f"{name}: output {out.name!r} is {_type(out.data_type)}, {producer} gives {data_type}"
            )
        if not _compatible(dims, list(out.dims)):
            errors.append(f"{name}: output {out.name!r} has dims {list(out.dims)}, {producer} gives {dims}")
    return errors


def check_repository(repo: Path) -> dict[str, ModelConfig]:
    """Parse every ``config.pbtxt`` under ``repo`` against Triton's schema, validate it and check
    the ensembles; raise on errors."""
    configs: dict[str, ModelConfig] = {}
    errors = []
    for path in sorted(repo.glob("*/config.pbtxt")):
        try:
            msg = parse_config(path.read_text(encoding="utf-8"))
        except text_format.ParseError as err:
            errors.append(f"{path}: {err}")
            continue
        errors += [f"{path}: {e}" for e in validate_config(msg)]
        if msg.name != path.parent.name:
            errors.append(f"{path}: name {msg.name!r} differs from its folder")
        if not (path.parent / "1").is_dir():
            errors.append(f"{path.parent}: no version folder 1/")
        configs[path.parent.name] = msg
    for model, msg in configs.items():
        if msg.platform == "ensemble":
            errors += [f"{model}: {e}" for e in check_ensemble(msg, configs)]
    if UNET in configs:
        errors += check_unet_stage(configs[UNET], repo / UNET / "1")
    if STREAM in configs and ENSEMBLE in configs:
        try:
            plan = StreamPlan.load(repo / STREAM / "1")
        except (OSError, ValueError, KeyError, TypeError) as err:
            errors.append(f"{STREAM}: 1/{PLAN_FILE} does not load: {err}")
        else:
            errors += check_stream(configs[STREAM], configs[ENSEMBLE], plan)
    if errors:
        raise RepositoryError("invalid model repository:\n  " + "\n  ".join(errors))
    return configs


def check_unet_stage(msg: ModelConfig, version_folder: Path) -> list[str]:
    """The stage's settings load, and its config has one model instance per GPU group."""
    try:
        stage = StageConfig.from_json_file(version_folder / STAGE_CONFIG_NAME)
    except ConfigError as err:
        return [f"unet: {err}"]
    count = sum(group.count for group in msg.instance_group)
    if count != stage.placement.instances:
        return [
            f"unet: {count} model instance(s), but {stage.placement.instances} rank group(s) in {STAGE_CONFIG_NAME}"
        ]
    return []


_WEIGHT_FILE = re.compile(
    r"^(?P<stem>diffusion_pytorch_model)(?:\.(?P<variant>[A-Za-z0-9_]+))?"
    r"(?P<shard>-\d{5}-of-\d{5})?\.(?P<ext>safetensors|bin)(?P<index>\.index\.json)?$"
)


def copy_unet_model(model_dir: Path, dest: Path, variant: str | None = None) -> dict[str, Any]:
    """Copy what the UNet stage loads into ``dest`` (diffusers format): ``unet/``, ``scheduler/`` and a
    ``model_index.json`` listing only those two (every other component null).

    With ``variant`` (e.g. ``fp16``), that variant's weight files are copied under the default
    names, so the stage loads them without a variant argument; other variants are never copied.
    Returns a summary (file count, bytes).
    """
    index_path = model_dir / "model_index.json"
    if not index_path.is_file():
        raise RepositoryError(f"{model_dir} has no model_index.json: not a diffusers directory")
    model_index = json.loads(index_path.read_text())
    for component in ("unet", "scheduler"):
        if not (model_dir / component).is_dir() or not isinstance(model_index.get(component), list):
            raise RepositoryError(f"{model_dir} has no {component}/ component")
    restricted = {
        key: (value if key in ("unet", "scheduler") or not isinstance(value, list) else [None, None])
        for key, value in model_index.items()
    }
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "model_index.json").write_text(json.dumps(restricted, indent=2) + "\n")
    shutil.copytree(model_dir / "scheduler", dest / "scheduler")
    # Its config only (distrifusion.latent_space): image-to-image reads the latent scaling.
    if (model_dir / LATENT_SPACE_CONFIG).is_file():
        (dest / LATENT_SPACE_CONFIG).parent.mkdir()
        shutil.copy2(model_dir / LATENT_SPACE_CONFIG, dest / LATENT_SPACE_CONFIG)

    source = model_dir / "unet"
    files = [p for p in sorted(source.iterdir()) if p.is_file()]
    weights = {p: _WEIGHT_FILE.match(p.name) for p in files}
    available = {m.group("variant") for m in weights.values() if m}
    if variant is not None and variant not in available:
        raise RepositoryError(f"{source} has no {variant!r} weights (found {sorted(map(str, available))})")
    if variant is None and None not in available and available:
        raise RepositoryError(
            f"{source} has only variant weights {sorted(map(str, available))}: pass --variant"
        )
    (dest / "unet").mkdir()
    copied, size = 0, 0
    for path in files:
        match = weights[path]
        name = path.name
        if match:
            if match.group("variant") != variant:
                continue
            name = (
                f"{match.group('stem')}{match.group('shard') or ''}.{match.group('ext')}"
                f"{match.group('index') or ''}"
            )
        target = dest / "unet" / name
        if match and match.group("index") and variant:
            # The shard index names the variant's shard files: point it at the renamed ones.
            index = json.loads(path.read_text())
            index["weight_map"] = {
                k: v.replace(f".{variant}-", "-").replace(f".{variant}.", ".")
                for k, v in index.get("weight_map", {}).items()
            }
            target.write_text(json.dumps(index, indent=2) + "\n")
        else:
            shutil.copy2(path, target)
        copied += 1
        size += target.stat().st_size
    return {"files": copied, "bytes": size}


def copy_tokenizers(model_dir: Path, dest: Path) -> None:
    for name in ("tokenizer", "tokenizer_2"):
        source = model_dir / name
        if not source.is_dir():
            raise RepositoryError(f"{model_dir} has no {name}/: SDXL has two tokenizers")
        shutil.copytree(source, dest / name)


def write_config(model_dir: Path, msg: ModelConfig, header: str) -> Path:
    errors = validate_config(msg)
    if errors:
        raise RepositoryError(f"{model_dir.name}: generated config is invalid: {'; '.join(errors)}")
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / "config.pbtxt"
    path.write_text(format_config(msg, header=header), encoding="utf-8")
    return path
