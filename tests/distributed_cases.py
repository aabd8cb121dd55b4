"""Functions that run on every rank of a spawned gloo group (importable, as spawn requires)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers import DiffusionPipeline
from PIL import Image

from distrifusion.config import ConfigError, DistriConfig, Mode
from distrifusion.context import PatchContext
from distrifusion.exchange import Exchange
from distrifusion.export.wrappers import VaeEncoderExport
from distrifusion.geometry import BandLayout
from distrifusion.latent_space import LatentPosterior
from distrifusion.ops import PatchAttnProcessor, PatchConv2d, PatchGroupNorm
from distrifusion.pipeline import DistriPipeline

COMPILE_BACKEND = os.environ.get("DISTRIFUSION_TEST_COMPILE_BACKEND", "aot_eager")
"""The torch.compile backend of the compiled cases (see tests/test_compiled_unet.py)."""
CAPTURE_BACKEND = "eager"
"""dynamo's capture, guards and recompiles without AOTAutograd (a third of aot_eager's time): for
the compiled cases whose subject is the band layout (uneven and 4 bands) or the serving of a
compiled stage. The compiled graph's functionalisation is the COMPILE_BACKEND cases' subject."""


def run_jobs(jobs: list[tuple[Callable[..., Any], tuple]]) -> list[Any]:
    """Runs each ``fn(*args)`` of ``jobs`` in turn on this group; returns their results (rank 0's
    are the ones spawn_local returns). One spawn for many jobs: starting ranks that import diffusers
    costs 10-30 s here, more than most jobs."""
    return [fn(*args) for fn, args in jobs]


@dataclasses.dataclass(frozen=True, eq=False)  # one picture is one case: compared by identity
class EncodedImage:
    """A picture as the served ``vae_encoder`` stage hands it to the UNet stage: the posterior's
    moments of the graph it runs (:class:`VaeEncoderExport`); the reference pipeline gets the
    picture itself and encodes it with diffusers."""

    pixels: np.ndarray
    """uint8 ``[h, w, 3]``."""

    def posterior(self, vae: torch.nn.Module) -> LatentPosterior:
        pixels = torch.from_numpy(self.pixels).permute(2, 0, 1)[None].float()
        with torch.no_grad():
            return LatentPosterior(VaeEncoderExport(vae)(pixels))

    def picture(self) -> Image.Image:
        return Image.fromarray(self.pixels)


def generate_cases(model_dir: str, cases: list[dict[str, Any]]) -> list[Any]:
    """Runs each case ``{"config": DistriConfig kwargs, "call": pipeline kwargs}`` on this group.

    Returns, on rank 0, per case: the final latents (or images with ``output_type="np"``), or the
    ConfigError message when the case is rejected.
    """
    pipelines: dict[tuple, DistriPipeline] = {}
    outputs = []
    for case in cases:
        key = tuple(sorted(case["config"].items()))
        if key not in pipelines:
            pipelines[key] = DistriPipeline.from_pretrained(model_dir, DistriConfig(**case["config"]))
        call = {"output_type": "latent", **case["call"]}
        if isinstance(call.get("image"), EncodedImage):
            call["image"] = call["image"].posterior(pipelines[key].pipe.vae)
        try:
            result = pipelines[key](**call)
        except ConfigError as error:
            outputs.append(str(error))
            continue
        if result is not None:
            outputs.append(result.latents if call["output_type"] == "latent" else result.images)
    return outputs


def reference_outputs(model_dir: str, calls: list[dict[str, Any]]) -> list[Any]:
    """The plain single-process diffusers pipeline, for the same calls (seed -> CPU generator)."""
    from diffusers import AutoPipelineForImage2Image

    from distrifusion.schedulers import make_scheduler

    text_to_image = DiffusionPipeline.from_pretrained(model_dir)
    image_to_image = AutoPipelineForImage2Image.from_pipe(text_to_image)
    model_scheduler = text_to_image.scheduler
    outputs = []
    for call in calls:
        call = {"output_type": "latent", **call}
        pipe = text_to_image if "image" not in call else image_to_image
        pipe.set_progress_bar_config(disable=True)
        scheduler = call.pop("scheduler", None)
        pipe.scheduler = (
            model_scheduler if scheduler is None else make_scheduler(scheduler, model_scheduler.config)
        )
        if isinstance(call.get("image"), EncodedImage):
            call["image"] = call["image"].picture()
        generator = torch.Generator("cpu").manual_seed(call.pop("seed"))
        outputs.append(pipe(generator=generator, **call).images)
    return outputs


def patch_op_errors(seed: int) -> dict[str, float]:
    """Each patch-parallel operator on fresh data against the full operator; max abs error per op.

    Every rank checks its own band of a full computation it also does itself.
    """
    from diffusers.models.attention_processor import Attention
    from torch import nn

    torch.manual_seed(seed)
    rank, world = dist.get_rank(), dist.get_world_size()
    height, width, levels = 24, 20, 3
    layout = BandLayout.split(height, width, world, levels)
    context = PatchContext(DistriConfig(mode=Mode.FULL_SYNC), layout=layout, band=rank)
    context.exchange = Exchange(None, world, batch_size=8)
    start, end = layout.rows(rank)

    x = torch.randn(2, 16, height, width)
    errors: dict[str, float] = {}

    conv = nn.Conv2d(16, 8, 3, padding=1)
    errors["conv3x3"] = _error(
        PatchConv2d(conv, context, "conv")(x[:, :, start:end]), conv(x)[:, :, start:end]
    )
    errors["conv_in"] = _error(
        PatchConv2d(conv, context, "conv_in", replicated_input=True)(x), conv(x)[:, :, start:end]
    )
    down = nn.Conv2d(16, 8, 3, stride=2, padding=1)
    half_start, half_end = layout.rows(rank, level=1)
    errors["conv_stride2"] = _error(
        PatchConv2d(down, context, "down")(x[:, :, start:end]), down(x)[:, :, half_start:half_end]
    )

    norm = nn.GroupNorm(4, 16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    shifted = x * 3 + 50  # a large mean: E[x^2] - E[x]^2 in fp32 would lose the variance
    errors["group_norm"] = _error(
        PatchGroupNorm(norm, context, "gn")(shifted[:, :, start:end]), norm(shifted)[:, :, start:end]
    )
    tokens = shifted.flatten(2)  # [batch, channels, tokens]: GroupNorm inside attention blocks
    band_tokens = tokens[:, :, start * width : end * width]
    errors["group_norm_tokens"] = _error(
        PatchGroupNorm(norm, context, "gn_tokens")(band_tokens),
        norm(tokens)[:, :, start * width : end * width],
    )

    attention = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=None)
    sequence = x.flatten(2).transpose(1, 2)  # [batch, tokens, channels] in row-major token order
    full = attention(sequence)
    attention.set_processor(PatchAttnProcessor(context, "attn"))
    band = attention(sequence[:, start * width : end * width])
    errors["self_attention"] = _error(band, full[:, start * width : end * width])

    cross = Attention(query_dim=16, heads=2, dim_head=8, cross_attention_dim=12)
    text = torch.randn(2, 7, 12)
    full = cross(sequence, encoder_hidden_states=text)
    cross.set_processor(PatchAttnProcessor(context, "cross"))
    errors["cross_attention"] = _error(
        cross(sequence[:, start * width : end * width], encoder_hidden_states=text),
        full[:, start * width : end * width],
    )

    worst = torch.tensor(list(errors.values()), dtype=torch.float64)
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return dict(zip(errors, worst.tolist(), strict=True))


def _error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    return (actual - expected).abs().max().item()


def staged_all_gathers() -> list[torch.Tensor]:
    """All-gathers of this rank's distinct data, direct and staged through host memory (what a gloo
    group with ranks on CUDA does), blocking and asynchronous; on rank 0 the four results."""
    from distrifusion.collectives import ProcessGroupCollective

    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for staged in (False, True):
        collective = ProcessGroupCollective(stage_through_host=staged)
        for async_op in (False, True):
            sent = torch.arange(6, dtype=torch.float32) + 10 * rank
            received = torch.full((world * 6,), -1.0)
            work = collective.all_gather(received, sent, None, async_op)
            if async_op:
                work.wait()
            results.append(received)
    return results


def step_communication(model_dir: str, steps: int, warmup_steps: int) -> list[list[tuple[str, int, int]]]:
    """(phase, collectives, bytes sent) of every UNet step, for two generations in a row."""
    pipeline = DistriPipeline.from_pretrained(
        model_dir, DistriConfig(mode="corrected_async_gn", warmup_steps=warmup_steps)
    )
    generations = []
    for seed in (0, 1):
        pipeline(
            prompt="a cat", height=128, width=128, num_inference_steps=steps, seed=seed, output_type="latent"
        )
        records = pipeline.unet.steps
        generations.append(
            [(r.phase, r.communication.collectives, r.communication.bytes_sent) for r in records]
        )
    return generations


def compiled_against_eager(
    model_dir: str, modes: list[str], call: dict[str, Any], backend: str
) -> dict[str, dict]:
    """Per mode: ``call``'s latents eager and compiled (``DistriConfig(compile=backend)``), and what
    the compiled pipeline's steps recorded in that first generation and in a second one of the call."""
    results = {}
    for mode in modes:
        config = {"mode": mode, "warmup_steps": 1}
        eager = DistriPipeline.from_pretrained(model_dir, DistriConfig(**config))(
            **call, output_type="latent"
        )
        compiled = DistriPipeline.from_pretrained(model_dir, DistriConfig(**config, compile=backend))
        generations = []
        for _ in range(2):
            output = compiled(**call, output_type="latent")
            generations.append(
                {
                    "phases": [record.phase for record in compiled.unet.steps],
                    "compiled": [record.compiled for record in compiled.unet.steps],
                    "new_graphs": [record.new_graphs for record in compiled.unet.steps],
                    "latents": None if output is None else output.latents,
                }
            )
        results[mode] = {"eager": None if eager is None else eager.latents, "compiled": generations}
    return results
