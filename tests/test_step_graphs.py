"""The CUDA-graph plans of UNet steps, on the CPU: which host calls a plan replays and when, the
statistics of replayed steps, the plan cache across shapes, and the cross-attention cache.

CUDA graphs need a GPU (tests/gpu/ replays real ones). Here a stand-in backend captures nothing:
the CPU computes eagerly while a step is "captured", and "replaying" a segment does nothing, so
outputs are not checked; what is checked is the bookkeeping around the graphs, which is the same
code on both devices: every all-gather and every wait is a host call recorded between segments,
run again at every replay, in the order the eager step runs them.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from diffusers import UNet2DConditionModel

from distrifusion.collectives import ReplicatingCollective
from distrifusion.config import DistriConfig
from distrifusion.cuda_graphs import StepGraphs
from distrifusion.tiny_model import sdxl_unet_config
from distrifusion.topology import Topology
from distrifusion.unet import DistriUNet, GenerationInfo

WORLD, BAND = 2, 1
WARMUP_STEPS = 1


@dataclasses.dataclass
class Event:
    step: int
    kind: str
    """"launch" (asynchronous all-gather), "wait" (for one), "gather" (blocking all-gather)."""
    serial: int
    """Which asynchronous all-gather (numbered as launched); -1 for blocking ones."""
    nbytes: int


class RecordingCollective(ReplicatingCollective):
    """Replicates this rank's data into every slot (as the band simulation does) and logs each
    all-gather and each wait with the step that issued it."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.step = 0
        self._launched = 0

    def all_gather(self, output: torch.Tensor, input: torch.Tensor, group: Any, async_op: bool) -> Any:
        super().all_gather(output, input, group, False)
        nbytes = input.numel() * input.element_size()
        if not async_op:
            self.events.append(Event(self.step, "gather", -1, nbytes))
            return None
        serial, self._launched = self._launched, self._launched + 1
        self.events.append(Event(self.step, "launch", serial, nbytes))
        return _LoggedWork(self, serial)


@dataclasses.dataclass
class _LoggedWork:
    collective: RecordingCollective
    serial: int

    def wait(self) -> bool:
        self.collective.events.append(Event(self.collective.step, "wait", self.serial, 0))
        return True


class _Segment:
    def __init__(self, backend: CpuGraphBackend) -> None:
        self.backend = backend

    def replay(self) -> None:
        self.backend.replays += 1


class CpuGraphBackend:
    """Captures nothing (the CPU runs eagerly during a capture); counts segments and replays."""

    def __init__(self) -> None:
        self.segments = 0
        self.replays = 0

    @contextlib.contextmanager
    def capturing(self) -> Iterator[None]:
        yield

    def begin(self) -> _Segment:
        self.segments += 1
        return _Segment(self)

    def end(self, graph: _Segment) -> None:
        pass


@pytest.fixture(scope="module")
def unet_config() -> dict:
    return sdxl_unet_config(cross_attention_dim=96, pooled_projection_dim=64)


def make_unet(
    unet_config: dict, graphs: StepGraphs | None, world: int = WORLD, **config: Any
) -> tuple[DistriUNet, RecordingCollective]:
    torch.manual_seed(0)
    collective = RecordingCollective()
    settings = {"mode": "corrected_async_gn", "warmup_steps": WARMUP_STEPS, "comm_batch_size": 8, **config}
    unet = DistriUNet(
        UNet2DConditionModel(**unet_config).eval(),
        DistriConfig(**settings),
        topology=Topology(world=world, rank=min(BAND, world - 1)),
        collective=collective,
        graphs=graphs,
    )
    return unet, collective


def inputs(batch: int = 2, size: int = 16, seed: int = 0) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "sample": torch.randn(batch, 4, size, size, generator=generator),
        "timestep": torch.tensor(500.0),
        "encoder_hidden_states": torch.randn(batch, 77, 96, generator=generator),
        "added_cond_kwargs": {
            "text_embeds": torch.randn(batch, 64, generator=generator),
            "time_ids": torch.tensor([[128.0, 128, 0, 0, 128, 128]] * batch),
        },
    }


def generate(unet: DistriUNet, collective: RecordingCollective, steps: int, **shape: Any) -> None:
    unet.begin_generation(GenerationInfo(do_classifier_free_guidance=True, num_timesteps=steps))
    arguments = inputs(**shape)
    with torch.no_grad():
        for step in range(steps):
            collective.step = step
            unet(**arguments, return_dict=False)


def per_step(events: list[Event], step: int) -> list[tuple[str, int]]:
    return [(e.kind, e.nbytes) for e in events if e.step == step]


STEPS = 7  # steps 0..1 synchronous, 2 records the exchange, 3..5 steady, 6 last


def test_a_replayed_step_issues_the_eager_steps_calls_and_overlaps_like_it(unet_config: dict) -> None:
    eager, eager_log = make_unet(unet_config, graphs=None)
    graphed, graph_log = make_unet(unet_config, graphs=StepGraphs(CpuGraphBackend()))
    for unet, log in ((eager, eager_log), (graphed, graph_log)):
        generate(unet, log, STEPS)
        generate(unet, log, STEPS)  # the second generation replays the warm-up plan too
    first_async = WARMUP_STEPS + 1
    for step in range(STEPS):
        assert per_step(graph_log.events, step) == per_step(eager_log.events, step), f"step {step}"

    # Overlap: in the steady state every all-gather launched in step k is waited for in step k+1,
    # never in step k, so it runs under step k+1's compute until that step first reads it.
    launched_in = {e.serial: e.step for e in graph_log.events if e.kind == "launch"}
    second_generation = len(graph_log.events) // 2
    for event in graph_log.events[second_generation:]:
        if event.kind == "wait":
            assert launched_in[event.serial] == event.step - 1, event
    steady_launches = [e for e in graph_log.events[second_generation:] if e.kind == "launch"]
    assert {e.step for e in steady_launches} == set(range(first_async, STEPS - 1))

    (shape,) = graphed.graphs.shapes()
    plans = graphed.graphs.plans(shape)
    assert sorted(phase for phase, *_ in plans) == ["last", "steady", "warmup"]
    steady = next(plan for (phase, *_), plan in plans.items() if phase == "steady")
    # One launch and one wait per batch, and the output gather; a segment between every two.
    calls = len(steady.host_calls)
    eager_step = per_step(eager_log.events[: len(eager_log.events) // 2], first_async + 1)
    assert calls == len(eager_step) and len(steady.segments) == calls + 1


def test_replayed_steps_count_their_communication(unet_config: dict) -> None:
    eager, eager_log = make_unet(unet_config, graphs=None)
    graphed, graph_log = make_unet(unet_config, graphs=StepGraphs(CpuGraphBackend()))
    for unet, log in ((eager, eager_log), (graphed, graph_log)):
        generate(unet, log, STEPS)
        generate(unet, log, STEPS)
    for eager_step, graph_step in zip(eager.steps, graphed.steps, strict=True):
        sent, expected = graph_step.communication.bytes_sent, eager_step.communication.bytes_sent
        assert sent == expected > 0, (graph_step.step, graph_step.phase)
        assert graph_step.communication.collectives == eager_step.communication.collectives


@pytest.mark.parametrize("world", [WORLD, 1])
def test_an_evicted_shape_loses_its_plans_and_gets_new_ones(unet_config: dict, world: int) -> None:
    """Also with one band (a one-GPU instance, a two-GPU split-batch group), which has no exchange:
    every new size would otherwise keep its plans and buffers for good."""
    backend = CpuGraphBackend()
    unet, log = make_unet(unet_config, graphs=StepGraphs(backend), world=world)
    sizes = (16, 24, 32, 40, 48)  # five shapes, four kept
    for size in sizes:
        generate(unet, log, STEPS, size=size)
    first = (2, 16, 16, False, torch.float32)  # (batch, latent height, width, CFG split, dtype)
    assert len(unet.graphs.shapes()) == 4 and first not in unet.graphs.shapes()
    assert unet.graphs.plans(first) == {}, "the plans of an evicted shape would replay on freed buffers"
    captured = unet.graphs.captures
    generate(unet, log, STEPS, size=16)
    # Captured anew on the new buffers: steady and last (and the warm-up, where no exchange has to
    # be recorded before a warm-up step can be captured).
    assert unet.graphs.captures == captured + (2 if world > 1 else 3)
    assert first in unet.graphs.shapes() and len(unet.graphs.shapes()) == 4


def test_text_keys_and_values_keep_their_buffers_across_batch_sizes(unet_config: dict) -> None:
    unet, log = make_unet(unet_config, graphs=None)
    processor = next(
        module.processor
        for name, module in unet.unet.named_modules()
        if name.endswith("attn2") and hasattr(module, "processor")
    )
    generate(unet, log, 2, batch=2)
    (shape,) = processor._text_key_value
    key_before = processor._text_key_value[shape][0]
    pointer = key_before.data_ptr()
    generate(unet, log, 2, batch=4)  # dynamic batching: another batch size in between
    assert len(processor._text_key_value) == 2
    new_text = inputs(batch=2, seed=9)
    unet.begin_generation(GenerationInfo(do_classifier_free_guidance=True, num_timesteps=1))
    with torch.no_grad():
        unet(**new_text, return_dict=False)
    key_after = processor._text_key_value[shape][0]
    # Same buffer (graphs captured for batch 2 read it), refilled with the new text.
    assert key_after is key_before and key_after.data_ptr() == pointer
    attn = next(m for n, m in unet.unet.named_modules() if n.endswith("attn2") and hasattr(m, "processor"))
    with torch.no_grad():
        assert torch.equal(key_after, attn.to_k(new_text["encoder_hidden_states"]))
