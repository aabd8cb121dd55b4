"""The ``vae_decoder`` stage: one image's latents -> uint8 pixels, whole or in tiles.

A latent decodes whole when every tensor of that decode stays under the engine's element limit
and its estimated working memory under the stage's budget (:mod:`.footprint`); otherwise it
decodes in tiles (:mod:`.tiles`), ``tiles_per_call`` tiles per engine call, with GroupNorm
statistics of the whole image (:mod:`.shared_norms`) when ``statistics`` is ``"image"``. What
needs more memory than the budget even in tiles is refused before any work, naming the size and
the largest that fits.

The engines are callables (``run(model, inputs) -> output``): Triton models through BLS in the
served stage, ONNX Runtime sessions or torch modules in tests and benchmarks. An engine may hand its
output back on another device than the latents' (a BLS output stays where its TensorRT engine ran
unless the request sets ``preferred_memory``: python_backend README, "Business Logic Scripting";
and instances of one model may sit on different GPUs): the
decoder brings every output to the latents' device, and names the engine and the device when it
cannot.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from ..export.specs import VAE_ENGINES
from .footprint import INT32_ELEMENTS, DecoderFootprint
from .shared_norms import image_statistics
from .tiles import TilePlan

WHOLE_ENGINE, TILE_STATISTICS_ENGINE, TILE_ENGINE = ENGINES = VAE_ENGINES
ENGINE_OUTPUTS = {WHOLE_ENGINE: "image", TILE_STATISTICS_ENGINE: "statistics", TILE_ENGINE: "pixels"}
SETTINGS_FILE = "vae_decode.json"
DEFAULT_IMAGE_STATISTICS = 0.75

Engine = Callable[[str, dict[str, torch.Tensor]], torch.Tensor]
"""``run(model, inputs)``: the model's one output for these inputs."""


class DecodeTooLarge(ValueError):
    """A latent whose decode cannot fit the stage's memory budget, even in tiles."""


class EngineOutputError(RuntimeError):
    """An engine handed back an output the decoder cannot use."""


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How the stage decodes; ``build_engines`` writes them to ``vae_decoder/1/vae_decode.json``."""

    footprint: DecoderFootprint
    memory_budget_bytes: int
    element_limit: int | None
    """Largest tensor an engine takes (TensorRT: :data:`INT32_ELEMENTS`; ONNX Runtime: none)."""
    attention_materialised: bool
    """The engines compute the mid block's full score matrix (TensorRT: the exported MatMul-Softmax
    pattern; ONNX Runtime's fused ``MultiHeadAttention`` does not)."""
    tile: int
    """Tile side in latent pixels."""
    overlap: int
    """Least overlap of neighbouring tiles, in latent pixels."""
    tiles_per_call: int
    whole_max_pixels: int | None = None
    """Image pixels above which the whole decode is not tried (a build option; None: derived)."""
    whole_max_latent: tuple[int, int] | None = None
    """The whole-latent engine's largest (height, width) (a TensorRT profile's bound)."""
    image_statistics: float = DEFAULT_IMAGE_STATISTICS
    """Share of the image's GroupNorm statistics in each tile's (0: the tile's own, one pass)."""

    def __post_init__(self) -> None:
        if not 0 <= self.image_statistics <= 1:
            raise ValueError(f"image statistics: {self.image_statistics} must be within 0..1")
        if not 0 <= self.overlap < self.tile:
            raise ValueError(
                f"tile overlap: {self.overlap} must be at least 0 and below the tile ({self.tile})"
            )
        if self.tiles_per_call < 1:
            raise ValueError(f"tiles per call: {self.tiles_per_call} must be at least 1")
        for engine in self.tile_engines:
            if not self._call_fits(engine, self.tiles_per_call, self.tile, self.tile):
                needs = self.footprint.peak_bytes(
                    engine, self.tiles_per_call, self.tile, self.tile, self.attention_materialised
                )
                raise ValueError(
                    f"{self.tiles_per_call} tile(s) of {self.tile}x{self.tile} latent pixels per call of "
                    f"{engine} need {_gib(needs)} or more than {self.element_limit} elements; the budget is "
                    f"{_gib(self.memory_budget_bytes)}"
                )

    @classmethod
    def derive(
        cls,
        vae_config: Mapping[str, Any],
        memory_budget_bytes: int,
        tensorrt: bool,
        tile: int | None = None,
        overlap: int | None = None,
        tiles_per_call: int | None = None,
        whole_max_pixels: int | None = None,
        whole_max_latent: tuple[int, int] | None = None,
        image_statistics: float = DEFAULT_IMAGE_STATISTICS,
    ) -> DecodeSettings:
        """From the VAE's config: tiles of its ``sample_size`` (what it was trained on) with a quarter
        overlap, as many per call as the budget and the element limit allow (at most 8)."""
        footprint = DecoderFootprint.from_config(vae_config)
        tile = tile or max(1, int(vae_config.get("sample_size", 1024)) // footprint.scale_factor)
        limit = INT32_ELEMENTS if tensorrt else None
        materialised = tensorrt  # the CPU target exports attention fused (distrifusion.export.attention)
        if tiles_per_call is None:
            engines = _tile_engines(image_statistics)
            fitting = [
                n
                for n in range(1, 9)
                if all(
                    call_fits(footprint, memory_budget_bytes // 2, limit, engine, n, tile, tile, materialised)
                    for engine in engines
                )
            ]
            tiles_per_call = max(fitting, default=1)
        return cls(
            footprint=footprint,
            memory_budget_bytes=memory_budget_bytes,
            element_limit=limit,
            attention_materialised=materialised,
            tile=tile,
            overlap=tile // 4 if overlap is None else overlap,
            tiles_per_call=tiles_per_call,
            whole_max_pixels=whole_max_pixels,
            whole_max_latent=whole_max_latent,
            image_statistics=image_statistics,
        )

    @property
    def tile_engines(self) -> tuple[str, ...]:
        return _tile_engines(self.image_statistics)

    def _call_fits(self, engine: str, batch: int, height: int, width: int) -> bool:
        return call_fits(
            self.footprint,
            self.memory_budget_bytes,
            self.element_limit,
            engine,
            batch,
            height,
            width,
            self.attention_materialised,
        )

    def decodes_whole(self, height: int, width: int) -> bool:
        """Whether a latent of ``height`` x ``width`` decodes in one call of the whole-latent engine."""
        pixels = height * width * self.footprint.scale_factor**2
        if self.whole_max_pixels is not None and pixels > self.whole_max_pixels:
            return False
        if self.whole_max_latent is not None:
            max_height, max_width = self.whole_max_latent
            if height > max_height or width > max_width:
                return False
        return self._call_fits(WHOLE_ENGINE, 1, height, width)

    def tiled_bytes(self, height: int, width: int) -> int:
        """Working memory of a tiled decode: one engine call, the float image and the tiles' weights."""
        plan = self.plan(height, width)
        call = max(
            self.footprint.peak_bytes(
                engine, self.tiles_per_call, plan.tile_height, plan.tile_width, self.attention_materialised
            )
            for engine in self.tile_engines
        )
        pixels = self.footprint.scale_factor**2
        image = height * width * pixels * 3 * 4
        weights = len(plan) * plan.tile_height * plan.tile_width * pixels * 4
        return call + image + weights

    def check(self, height: int, width: int, stage: str = "vae_decoder") -> bool:
        """True to decode whole, False in tiles; raises :class:`DecodeTooLarge` when neither fits.

        The encoder stage checks its images with the decoder's estimate too: its levels have the
        decoder's channel widths with fewer layers, its largest tensor (SDXL: 128 channels at full
        resolution) half the decoder's (256), so the estimate bounds it."""
        if self.decodes_whole(height, width):
            return True
        if self.tiled_bytes(height, width) <= self.memory_budget_bytes:
            return False
        scale = self.footprint.scale_factor
        side = _largest_tiled_side(self)
        verb = "encode" if stage == "vae_encoder" else "decode"
        raise DecodeTooLarge(
            f"{stage}: a {width * scale}x{height * scale} image needs about "
            f"{_gib(self.tiled_bytes(height, width))} to {verb} even in tiles, over this stage's budget of "
            f"{_gib(self.memory_budget_bytes)}; the largest square image that fits is {side * scale}x{side * scale}"
        )

    def plan(self, height: int, width: int) -> TilePlan:
        return TilePlan.for_latent(height, width, self.tile, self.overlap, self.footprint.scale_factor)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, folder: Path) -> Path:
        path = folder / SETTINGS_FILE
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, folder: Path) -> DecodeSettings:
        values = json.loads((folder / SETTINGS_FILE).read_text())
        bound = values.get("whole_max_latent")
        return cls(
            **{
                **values,
                "footprint": DecoderFootprint(**values["footprint"]),
                "whole_max_latent": None if bound is None else tuple(bound),
            }
        )


def call_fits(
    footprint: DecoderFootprint,
    budget_bytes: int,
    element_limit: int | None,
    engine: str,
    batch: int,
    height: int,
    width: int,
    attention_materialised: bool,
) -> bool:
    """Whether one call of ``engine`` on ``batch`` latents of ``height`` x ``width`` stays under the
    element limit and the memory budget."""
    if element_limit is not None:
        largest = footprint.largest_tensor_elements(batch, height, width)
        scores = footprint.attention_score_elements(batch, height, width) if attention_materialised else 0
        if max(largest, scores) > element_limit:
            return False
    return footprint.peak_bytes(engine, batch, height, width, attention_materialised) <= budget_bytes


def _tile_engines(image_statistics: float) -> tuple[str, ...]:
    """The engines a tiled decode calls: the record pass only when the image's statistics are mixed in."""
    return (TILE_STATISTICS_ENGINE, TILE_ENGINE) if image_statistics > 0 else (TILE_ENGINE,)


def _largest_tiled_side(settings: DecodeSettings) -> int:
    """Past one tile a tiled decode's memory grows with the image only."""
    low, high = settings.tile, 1 << 16
    while low < high:
        middle = (low + high + 1) // 2
        if settings.tiled_bytes(middle, middle) <= settings.memory_budget_bytes:
            low = middle
        else:
            high = middle - 1
    return low


def _gib(value: int) -> str:
    return f"{value / 2**30:.1f} GiB"


@dataclasses.dataclass(frozen=True)
class DecodeRecord:
    height: int
    width: int
    tiles: int
    """0: decoded whole."""
    engine_calls: int
    seconds: float

    @property
    def path(self) -> str:
        return "tiled" if self.tiles else "whole"


class TiledEngines:
    """Calls of one whole-image engine and its two tile engines (:mod:`.export`), as a stage makes
    them: outputs brought to the input's device, tiles in calls of ``tiles_per_call``."""

    def __init__(self, settings: DecodeSettings, run: Engine, norm_layers: int) -> None:
        self.settings = settings
        self.run = run
        self.norm_layers = norm_layers

    def chunks(self, plan: TilePlan) -> list[range]:
        per_call = self.settings.tiles_per_call
        return [range(start, min(start + per_call, len(plan))) for start in range(0, len(plan), per_call)]

    def _run(self, engine: str, inputs: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The engine's output on ``device``."""
        output = self.run(engine, inputs)
        if output.device == device:
            return output
        try:
            return output.to(device)
        except (NotImplementedError, RuntimeError) as error:
            raise EngineOutputError(
                f"{engine} returned its output on {output.device}, which cannot be copied to {device} "
                f"where the {type(self).__name__} runs ({error})"
            ) from None

    def shared_statistics(
        self, engine: str, input_name: str, tiles: Callable[[range], torch.Tensor], plan: TilePlan
    ) -> torch.Tensor | None:
        """The record pass over the tiles of ``plan`` (``tiles(chunk)`` crops them): the image's
        GroupNorm statistics, or None when each tile keeps its own."""
        if self.settings.image_statistics == 0:
            return None
        sums = []
        for chunk in self.chunks(plan):
            inputs = tiles(chunk)
            weights = torch.from_numpy(plan.latent_weights(chunk)).to(inputs.device)
            sums.append(self._run(engine, {input_name: inputs, "weights": weights}, inputs.device))
        return image_statistics(torch.cat(sums), self.settings.image_statistics)

    def statistics_for(self, statistics: torch.Tensor | None, tiles: torch.Tensor) -> torch.Tensor:
        """The image's statistics for every tile of a call; a share of 0 (each tile its own) without."""
        if statistics is None:
            groups = self.settings.footprint.norm_groups
            statistics = torch.zeros(self.norm_layers, groups, 3, device=tiles.device)
        return statistics[None].expand(tiles.shape[0], -1, -1, -1).contiguous()


class VaeDecoder(TiledEngines):
    def __init__(self, settings: DecodeSettings, run: Engine) -> None:
        super().__init__(settings, run, settings.footprint.norm_layers)

    def decode(self, latents: torch.Tensor) -> tuple[torch.Tensor, DecodeRecord]:
        """``[C, h, w]`` raw final latents -> ``[8h, 8w, 3]`` uint8 image, and how it was decoded."""
        started = time.perf_counter()
        height, width = latents.shape[-2:]
        if self.settings.check(height, width):
            image = self._run(WHOLE_ENGINE, {"latents": latents[None].contiguous()}, latents.device)[0]
            return image, DecodeRecord(height, width, 0, 1, time.perf_counter() - started)
        plan = self.settings.plan(height, width)
        chunks = self.chunks(plan)

        def tiles(chunk: range) -> torch.Tensor:
            return plan.crop(latents, chunk).contiguous()

        statistics = self.shared_statistics(TILE_STATISTICS_ENGINE, "latents", tiles, plan)
        image = plan.empty_image(latents.device)
        for chunk in chunks:
            inputs = {"latents": tiles(chunk)}
            inputs["statistics"] = self.statistics_for(statistics, inputs["latents"])
            plan.blend_into(image, chunk, self._run(TILE_ENGINE, inputs, latents.device))
        calls = len(chunks) * (2 if statistics is not None else 1)
        pixels = image.round_().clamp_(0, 255).to(torch.uint8)
        return pixels, DecodeRecord(height, width, len(plan), calls, time.perf_counter() - started)
