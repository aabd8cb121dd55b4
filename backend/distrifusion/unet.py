"""A diffusers ``UNet2DConditionModel`` whose denoising runs as DistriFusion patch parallelism.

Every rank receives the full inputs and returns the full noise prediction, so a diffusers pipeline
(CFG, any scheduler) runs unchanged and replicated on every rank; inside, each rank computes one
band of rows and the bands talk through the patch-parallel operators in :mod:`distrifusion.ops`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel, UNet2DConditionOutput
from torch import nn

from . import exchange_op
from .collectives import Collective, HostCalls, ProcessGroupCollective
from .config import DistriConfig, Mode
from .context import ExchangingLayer, PatchContext
from .cuda_graphs import StepGraphs
from .exchange import Exchange, ExchangeStats, gather_now
from .geometry import BandLayout
from .ops import PatchAttnProcessor, PatchConv2d, PatchGroupNorm
from .topology import PatchGroup, Topology

_CACHED_SHAPES = 4


class Generation(Protocol):
    """What the UNet needs to know about the generation calling it (a diffusers pipeline has both)."""

    @property
    def do_classifier_free_guidance(self) -> bool: ...

    @property
    def num_timesteps(self) -> int: ...


@dataclasses.dataclass(frozen=True)
class GenerationInfo:
    """A :class:`Generation` for callers that run their own denoising loop."""

    do_classifier_free_guidance: bool
    num_timesteps: int


class StepRecord:
    """One UNet evaluation of the current generation, as this rank saw it."""

    def __init__(
        self,
        step: int,
        phase: str,
        started: Any,
        ended: Any,
        communication: ExchangeStats,
        compiled: bool = False,
        new_graphs: int = 0,
    ) -> None:
        self.step = step
        self.phase = phase
        """"warmup" (synchronous exchanges), "steady" (asynchronous) or "last" (asynchronous, nothing sent)."""
        self.communication = communication
        self.compiled = compiled
        """Whether the band's UNet ran as compiled by ``torch.compile``."""
        self.new_graphs = new_graphs
        """Graphs ``torch.compile`` compiled during this step (a compile or a recompile)."""
        self._marks = (started, ended)
        self._seconds: float | None = None

    @property
    def seconds(self) -> float:
        """Host wall time on the CPU; on CUDA the device time between the step's start and end
        (events on the compute stream; reading it waits for the step to finish)."""
        if self._seconds is None:
            started, ended = self._marks
            if isinstance(started, torch.cuda.Event):
                ended.synchronize()
                self._seconds = started.elapsed_time(ended) / 1000.0
            else:
                self._seconds = ended - started
        return self._seconds


def _mark(device: torch.device) -> Any:
    if device.type == "cuda":
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event
    return time.perf_counter()


class DistriUNet(nn.Module):
    """Wraps ``unet`` in place; call :meth:`begin_generation` before each denoising loop.

    ``topology``: the ranks (default: the default process group). ``collective``: what runs the
    all-gathers (default: torch.distributed). ``graphs``: how steps are captured when
    ``config.cuda_graphs`` is set (default: CUDA graphs).

    With ``config.compile`` the band's UNet runs compiled by ``torch.compile``, one graph per input
    shape and layout. A shape not yet compiled is compiled on its first step while
    :attr:`compile_new_shapes` is set, else it runs eager.
    """

    def __init__(
        self,
        unet: UNet2DConditionModel,
        config: DistriConfig,
        topology: Topology | None = None,
        pixels_per_latent: int = 8,
        collective: Collective | None = None,
        graphs: StepGraphs | None = None,
    ) -> None:
        super().__init__()
        self.topology = topology or Topology.from_process_group(config.split_batch)
        config.validate_world(self.topology.world)
        self.unet = unet
        self.distri_config = config
        self.context = PatchContext(config)
        self.stats = ExchangeStats()
        self.collective = collective if collective is not None else ProcessGroupCollective()
        self.host_calls = HostCalls()
        self.levels = len(unet.config.block_out_channels)
        self.pixels_per_latent = pixels_per_latent
        self._generation: Generation | None = None
        self.steps: list[StepRecord] = []
        """The UNet evaluations of the current generation."""
        self._shapes: collections.OrderedDict[tuple, Exchange | None] = collections.OrderedDict()
        """The latest shapes run, with their exchanges (None for a one-band group); the step graphs
        of a shape that leaves are dropped with it, whatever the group's size."""
        self.graphs = graphs if graphs is not None else (StepGraphs() if config.cuda_graphs else None)
        """The captured step plans (None: every step runs eagerly)."""
        self._exchanging_layers = _make_patch_parallel(unet, self.context)
        # A function, not a module attribute: the compiled wrapper must not register the UNet twice.
        self._compiled_forward = (
            torch.compile(unet.forward, backend=config.compile, dynamic=False, fullgraph=True)
            if config.compile
            else None
        )
        self.compile_new_shapes = True
        """With ``config.compile``: compile a shape that has not run compiled yet (False: run it
        eager; a server compiles its warm-up sizes at load and no request waits for a compile)."""
        self._compiled_shapes: set[tuple] = set()

    def __getattr__(self, name: str) -> Any:
        # Pipelines read the UNet's config, dtype, add_embedding, ...: answer for the wrapped model.
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["unet"], name)

    def begin_generation(self, generation: Generation | None) -> None:
        """Starts a new step count (warm-up, last step) and waits out any exchange still in flight."""
        self._generation = generation
        self.context.step = 0
        self.steps = []
        for exchange in self._exchanges():
            exchange.drain()

    def use_topology(
        self, topology: Topology, collective: Collective | None = None, abandon: bool = False
    ) -> None:
        """From the next step on, run as ``topology`` (with ``collective``, else the current one).

        Waits out what is in flight (``abandon``: drops it unwaited, for a group that was lost),
        then drops every per-shape exchange buffer and step graph: they belong to the old layout.
        The weights stay where they are.
        """
        self.distri_config.validate_world(topology.world)
        if not abandon:
            for exchange in self._exchanges():
                exchange.drain()
        self._shapes.clear()
        self._compiled_shapes.clear()
        if self.graphs is not None:
            self.graphs.clear()
        self.topology = topology
        if collective is not None:
            self.collective = collective

    def holds(self, rows: int, height: int, width: int, guided: bool) -> bool:
        """Whether a step of ``rows`` UNet rows at a ``height`` x ``width`` latent would find its
        buffers (exchange, step graphs) made by an earlier one, or make them anew."""
        return _shape_key(rows, height, width, self.topology.can_split and guided, self.dtype) in self._shapes

    def layout(self, height: int, width: int, split: bool) -> BandLayout:
        """The bands of a latent of this size; raises ConfigError when it cannot be split."""
        size = self.topology.patch_group(split).size
        return BandLayout.split(height, width, size, self.levels, self.pixels_per_latent)

    @property
    def splits_batch(self) -> bool:
        generation = self._generation
        return self.topology.can_split and generation is not None and generation.do_classifier_free_guidance

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *args: Any,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> UNet2DConditionOutput | tuple[torch.Tensor]:
        split = self.splits_batch
        group = self.topology.patch_group(split)
        height, width = sample.shape[-2:]
        layout = self.layout(height, width, split)
        shape_key = _shape_key(sample.shape[0], height, width, split, sample.dtype)
        ctx = self.context
        ctx.layout, ctx.band = layout, group.band
        ctx.exchange = self._exchange(group, shape_key)
        ctx.total_steps = self._generation.num_timesteps if self._generation is not None else None

        band_unet = self._band_unet(shape_key)
        step = functools.partial(self._step, group, layout, band_unet)
        inputs = (sample, timestep, encoder_hidden_states, args, kwargs)
        phase, started, stats_before = self._phase(), _mark(sample.device), self.stats.snapshot()
        graphs_before = self._graphs_compiled()
        with exchange_op.running(self._exchanging_layers):
            if self.graphs is not None and self._graphable():
                noise = self.graphs.run(shape_key, phase, step, inputs, self.host_calls)
            else:
                noise = step(*inputs)
        ended = _mark(sample.device)
        self.steps.append(
            StepRecord(
                ctx.step,
                phase,
                started,
                ended,
                self.stats.since(stats_before),
                compiled=band_unet is not self.unet,
                new_graphs=self._graphs_compiled() - graphs_before,
            )
        )
        ctx.step += 1
        return UNet2DConditionOutput(sample=noise) if return_dict else (noise,)

    def _graphs_compiled(self) -> int:
        if self._compiled_forward is None:
            return 0
        from torch._dynamo.utils import counters  # imported once torch.compile is in use

        # Every torch.compile of this process counts here; only this UNet compiles during its step.
        return counters["stats"]["unique_graphs"]

    def _band_unet(self, shape_key: tuple) -> Callable[..., Any]:
        if self._compiled_forward is None:
            return self.unet
        if shape_key not in self._compiled_shapes:
            if not self.compile_new_shapes:
                return self.unet
            self._compiled_shapes.add(shape_key)
        return self._compiled_forward

    def _step(
        self,
        group: PatchGroup,
        layout: BandLayout,
        band_unet: Callable[..., Any],
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        args: tuple,
        kwargs: dict[str, Any],
    ) -> torch.Tensor:
        """One UNet evaluation on this rank's band (and batch half); returns the full noise prediction."""
        if group.batch_part is not None:
            sample, timestep, encoder_hidden_states, args, kwargs = _batch_half(
                (sample, timestep, encoder_hidden_states, args, kwargs), group.batch_part, sample.shape[0]
            )
        band = band_unet(sample, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        exchange = self.context.exchange
        if exchange is not None:
            exchange.end_step()
        return self._gather_bands(band, layout, group)

    def _graphable(self) -> bool:
        """Whether this step may run as a CUDA graph: every buffer it touches has a fixed address."""
        ctx = self.context
        if ctx.step == 0:  # fills the cross-attention cache (and warms up the kernels)
            return False
        shares_later = self.distri_config.mode not in (Mode.FULL_SYNC, Mode.NAIVE_PATCH)
        return ctx.exchange is None or ctx.exchange.planned or not shares_later

    def _phase(self) -> str:
        ctx = self.context
        if ctx.synchronous:
            return "warmup"
        return "last" if ctx.last_step else "steady"

    def _exchanges(self) -> list[Exchange]:
        return [exchange for exchange in self._shapes.values() if exchange is not None]

    def _exchange(self, group: PatchGroup, shape_key: tuple) -> Exchange | None:
        """The shape's exchange (None for one band), kept for the latest :data:`_CACHED_SHAPES` shapes."""
        if shape_key in self._shapes:
            self._shapes.move_to_end(shape_key)
            return self._shapes[shape_key]
        if len(self._shapes) >= _CACHED_SHAPES:
            oldest_key, oldest = self._shapes.popitem(last=False)
            if oldest is not None:
                oldest.drain()
            if self.graphs is not None:
                self.graphs.forget(oldest_key)
        exchange = None
        if group.size > 1:
            exchange = Exchange(
                group.group,
                group.size,
                self.distri_config.comm_batch_size,
                self.stats,
                self.collective,
                self.host_calls,
            )
        self._shapes[shape_key] = exchange
        return exchange

    def _gather_bands(self, band: torch.Tensor, layout: BandLayout, group: PatchGroup) -> torch.Tensor:
        """All-gathers every rank's band of the noise prediction into the full prediction."""
        world = self.topology.world
        if world == 1:
            return band
        padded = F.pad(band, (0, 0, 0, layout.max_band_height() - band.shape[2])).contiguous()
        gathered = padded.new_empty((world, *padded.shape))
        self.host_calls.run(functools.partial(self._gather_output, gathered, padded))
        bands = [gathered[rank, :, :, : layout.band_height(rank % group.size)] for rank in range(world)]
        per_batch_part = [
            torch.cat(bands[start : start + group.size], dim=2) for start in range(0, world, group.size)
        ]
        return torch.cat(per_batch_part, dim=0)

    def _gather_output(self, gathered: torch.Tensor, padded: torch.Tensor) -> None:
        seconds = gather_now(self.collective, self.stats, None, self.topology.world, gathered, padded)
        self.stats.output_gather_seconds += seconds


def _shape_key(rows: int, height: int, width: int, split: bool, dtype: torch.dtype) -> tuple:
    """What a step's buffers and graphs are kept by: its UNet rows, latent size, CFG split, dtype."""
    return (rows, height, width, split, dtype)


def _make_patch_parallel(unet: UNet2DConditionModel, context: PatchContext) -> dict[str, ExchangingLayer]:
    """Swaps the operators that need other bands for their patch-parallel versions; returns every
    exchanging layer by its key."""
    replacements: list[tuple[str, nn.Module]] = []
    exchanging: list[ExchangingLayer] = []
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            processor = PatchAttnProcessor(context, name)
            module.set_processor(processor)
            exchanging += processor.shared
        elif isinstance(module, nn.GroupNorm):
            replacements.append((name, PatchGroupNorm(module, context, name)))
        elif isinstance(module, nn.Conv2d) and (name == "conv_in" or module.kernel_size[0] > 1):
            replacements.append(
                (name, PatchConv2d(module, context, name, replicated_input=name == "conv_in"))
            )
    for name, replacement in replacements:
        parent_name, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent_name), child, replacement)
        exchanging.append(replacement)
    return {layer.key: layer for layer in exchanging}


def _batch_half(value: Any, part: int, full_batch: int) -> Any:
    """This rank's half (0 unconditional, 1 conditional) of every batch-sized tensor in ``value``."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != full_batch:
            return value
        half = full_batch // 2
        return value[part * half : (part + 1) * half]
    if isinstance(value, dict):
        return {key: _batch_half(item, part, full_batch) for key, item in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_batch_half(item, part, full_batch) for item in value)
    return value
