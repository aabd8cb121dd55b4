"""The UNet stage's settings: one typed definition, written by build_engines as JSON, read at load.

``build_engines`` writes ``stage_config.json`` into the stage's version folder (``unet/1/``); the
stage reads it when Triton loads the model, and ``config.pbtxt`` keeps only what Triton itself
reads. Three parts, kept apart:

- ``engine``: how the patch-parallel group computes (:class:`~distrifusion.config.DistriConfig`
  without ``device``, which follows from the placement); its defaults and checks are the engine's.
- ``placement``: which processes and devices form each model instance's group.
- ``requests``: what a request may ask for, and what it gets when it asks nothing.
- ``faults``: how a hung rank is caught and how often the group may be rebuilt
  (:class:`~distrifusion.serving.faults.FaultPolicy`).

Plus ``warmup``: the sizes every instance runs once at load (CUDA graphs captured, NCCL
communicators formed, kernels tuned) before Triton reports it ready. Every setting has one default
(here, or the engine's) and one check; an unknown key fails with an error naming it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, DistriConfig
from .faults import FaultPolicy

STAGE_CONFIG_NAME = "stage_config.json"
"""The file, in the stage's version folder."""
MODEL_DIRECTORY = "model"
"""The diffusers directory (unet/ and scheduler/) beside it."""

_COMPILED_SIZES = 8
"""torch._dynamo.config.recompile_limit's default: graphs one compiled function keeps, one per size."""
_ENGINE_KEYS = tuple(field.name for field in dataclasses.fields(DistriConfig) if field.name != "device")


def parse_gpu_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """``"0,1;2,3"`` -> ``((0, 1), (2, 3))``: one model instance per group, one rank per GPU."""
    groups = []
    for part in text.split(";"):
        if not re.fullmatch(r"\s*\d+(\s*,\s*\d+)*\s*", part):
            raise ConfigError(
                f"gpus: expected comma-separated GPU indices per group, ';' between groups, got {text!r}"
            )
        groups.append(tuple(int(index) for index in part.split(",")))
    return tuple(groups)


def format_gpu_groups(groups: Sequence[Sequence[int]]) -> str:
    return ";".join(",".join(str(index) for index in group) for group in groups)


def _integer(path: str, value: Any, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{path}: must be an integer >= {minimum}, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class Placement:
    """The ranks of each model instance.

    ``gpus``: one tuple of GPU indices per instance, one rank per GPU (indices count the GPUs the
    server sees, after any ``CUDA_VISIBLE_DEVICES``). None: one instance of ``ranks`` CPU processes
    with gloo, ``threads_per_rank`` torch threads each.
    """

    gpus: tuple[tuple[int, ...], ...] | None = None
    ranks: int | None = None
    threads_per_rank: int | None = None

    def __post_init__(self) -> None:
        if self.gpus is None:
            object.__setattr__(
                self, "ranks", _integer("placement.ranks", 2 if self.ranks is None else self.ranks, 1)
            )
            threads = 1 if self.threads_per_rank is None else self.threads_per_rank
            object.__setattr__(self, "threads_per_rank", _integer("placement.threads_per_rank", threads, 1))
            return
        if self.ranks is not None or self.threads_per_rank is not None:
            raise ConfigError(
                "placement: 'ranks' and 'threads_per_rank' are for the CPU; with 'gpus' each GPU is a rank"
            )
        groups = self.gpus
        if isinstance(groups, str):
            groups = parse_gpu_groups(groups)
        try:
            groups = tuple(tuple(_integer("placement.gpus", index, 0) for index in group) for group in groups)
        except TypeError:
            raise ConfigError(f"placement.gpus: expected groups of GPU indices, got {self.gpus!r}") from None
        every = [index for group in groups for index in group]
        if not groups or not all(groups):
            raise ConfigError(f"placement.gpus: every instance needs at least one GPU, got {self.gpus!r}")
        if len(set(every)) != len(every):
            raise ConfigError(
                f"placement.gpus: a GPU appears in more than one place in {format_gpu_groups(groups)!r}"
            )
        if len({len(group) for group in groups}) != 1:
            raise ConfigError(
                f"placement.gpus: every instance needs the same number of GPUs, got {format_gpu_groups(groups)!r}"
            )
        object.__setattr__(self, "gpus", groups)

    @property
    def device(self) -> str:
        return "cpu" if self.gpus is None else "cuda"

    @property
    def instances(self) -> int:
        return 1 if self.gpus is None else len(self.gpus)

    @property
    def ranks_per_instance(self) -> int:
        return self.ranks if self.gpus is None else len(self.gpus[0])

    @property
    def engine_gpus(self) -> tuple[int, ...]:
        """Where the TensorRT engines (text encoders, VAE) get an instance each: the first GPU of
        every UNet instance, so that its memory check, on that rank, sees what they hold; none on
        the CPU."""
        return () if self.gpus is None else tuple(group[0] for group in self.gpus)

    def instance_gpus(self, instance: int, available: int) -> tuple[int, ...] | None:
        """The GPUs of model instance ``instance`` (None on the CPU); checks they exist."""
        if self.gpus is None:
            return None
        if instance >= len(self.gpus):
            raise ConfigError(
                f"placement.gpus: {len(self.gpus)} group(s) in {format_gpu_groups(self.gpus)!r}, "
                f"but this is instance {instance}"
            )
        missing = [index for index in self.gpus[instance] if index >= available]
        if missing:
            raise ConfigError(
                f"placement.gpus: {format_gpu_groups(self.gpus)!r} names GPU(s) {missing} this machine lacks "
                f"(it has {available})"
            )
        return self.gpus[instance]


@dataclasses.dataclass(frozen=True)
class RequestSettings:
    """Bounds and defaults of a request's size, steps and guidance (pixels)."""

    max_width: int = 4096
    max_height: int = 4096
    min_width: int = 1
    """Smaller sizes are refused before any work (on GPUs: the VAE engine's profile starts here)."""
    min_height: int = 1
    default_width: int = 1024
    default_height: int = 1024
    default_steps: int = 30
    default_guidance_scale: float = 5.0

    def __post_init__(self) -> None:
        for axis in ("width", "height"):
            low = _integer(f"requests.min_{axis}", getattr(self, f"min_{axis}"), 1)
            high = _integer(f"requests.max_{axis}", getattr(self, f"max_{axis}"), low)
            default = getattr(self, f"default_{axis}")
            if not isinstance(default, int) or isinstance(default, bool) or not low <= default <= high:
                raise ConfigError(
                    f"requests.default_{axis}: must be an integer from {low} to {high}, got {default!r}"
                )
        _integer("requests.default_steps", self.default_steps, 1)
        guidance = self.default_guidance_scale
        if (
            isinstance(guidance, bool)
            or not isinstance(guidance, (int, float))
            or not 0 <= guidance < float("inf")
        ):
            raise ConfigError(
                f"requests.default_guidance_scale: must be a finite number >= 0, got {guidance!r}"
            )
        object.__setattr__(self, "default_guidance_scale", float(guidance))


@dataclasses.dataclass(frozen=True)
class StageConfig:
    engine: DistriConfig
    placement: Placement = dataclasses.field(default_factory=Placement)
    requests: RequestSettings = dataclasses.field(default_factory=RequestSettings)
    faults: FaultPolicy = dataclasses.field(default_factory=FaultPolicy)
    warmup: tuple[tuple[int, int], ...] = ()
    """(width, height) of each size run once at load, at batch 1."""

    def __post_init__(self) -> None:
        if self.engine.device != self.placement.device:
            raise ConfigError(
                f"engine: runs on {self.engine.device!r} but the placement is on {self.placement.device!r}"
            )
        try:
            self.engine.validate_world(self.placement.ranks_per_instance)
        except ConfigError as error:
            raise ConfigError(f"engine.{error}") from None
        sizes = []
        for size in self.warmup:
            if not (isinstance(size, Sequence) and len(size) == 2):
                raise ConfigError(f"warmup: expected [width, height] pairs, got {size!r}")
            width, height = (_integer("warmup", value, 1) for value in size)
            requests = self.requests
            if not (
                requests.min_width <= width <= requests.max_width
                and requests.min_height <= height <= requests.max_height
            ):
                raise ConfigError(f"warmup: {width}x{height} is outside the sizes requests may ask for")
            sizes.append((width, height))
        if self.engine.compile and len(sizes) > _COMPILED_SIZES:
            raise ConfigError(
                f"warmup: at most {_COMPILED_SIZES} sizes with engine.compile (torch.compile's "
                f"recompile limit; the engine compiles fullgraph, so a size beyond it would fail), got {len(sizes)}"
            )
        object.__setattr__(self, "warmup", tuple(sizes))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageConfig:
        """Builds the config from its JSON form; unknown keys and bad values raise ConfigError."""
        _known("", data, ("engine", "placement", "requests", "faults", "warmup"))
        placement_data = data.get("placement", {})
        _known("placement.", placement_data, tuple(field.name for field in dataclasses.fields(Placement)))
        placement = Placement(**placement_data)
        engine_data = data.get("engine", {})
        _known("engine.", engine_data, _ENGINE_KEYS)
        try:
            engine = DistriConfig(**engine_data, device=placement.device)
        except ConfigError as error:
            raise ConfigError(f"engine.{error}") from None
        requests_data = data.get("requests", {})
        _known("requests.", requests_data, tuple(field.name for field in dataclasses.fields(RequestSettings)))
        faults_data = data.get("faults", {})
        _known("faults.", faults_data, tuple(field.name for field in dataclasses.fields(FaultPolicy)))
        warmup = data.get("warmup", ())
        if not isinstance(warmup, Sequence) or isinstance(warmup, str):
            raise ConfigError(f"warmup: expected a list of [width, height] pairs, got {warmup!r}")
        return cls(
            engine=engine,
            placement=placement,
            requests=RequestSettings(**requests_data),
            faults=FaultPolicy(**faults_data),
            warmup=tuple(warmup),
        )

    @classmethod
    def from_json_file(cls, path: str | Path) -> StageConfig:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: the UNet stage's settings are missing (written by build_engines)"
            ) from None
        except json.JSONDecodeError as error:
            raise ConfigError(f"{path}: not valid JSON ({error})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a JSON object")
        try:
            return cls.from_dict(data)
        except ConfigError as error:
            raise ConfigError(f"{path}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        engine = {key: getattr(self.engine, key) for key in _ENGINE_KEYS}
        engine["mode"] = self.engine.mode.value
        placement = {
            key: value for key, value in dataclasses.asdict(self.placement).items() if value is not None
        }
        if self.placement.gpus is not None:
            placement["gpus"] = [list(group) for group in self.placement.gpus]
        return {
            "engine": engine,
            "placement": placement,
            "requests": dataclasses.asdict(self.requests),
            "faults": dataclasses.asdict(self.faults),
            "warmup": [list(size) for size in self.warmup],
        }

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / STAGE_CONFIG_NAME
        path.write_text(self.to_json_string())
        return path


def _known(prefix: str, data: Any, keys: Sequence[str]) -> None:
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a JSON object, got {data!r}")
    unknown = sorted(set(data) - set(keys))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown setting; known: {', '.join(keys)}")
