"""A long-lived patch-parallel UNet group for a server: rank 0 in this process, the rest spawned.

The server process (a Triton Python-backend stub) is rank 0. It spawns ranks 1..N-1, which load
the same UNet and then wait for work. Requests go to the workers over a pipe each (not over a
collective: an idle worker would hit the collective timeout); the denoising itself then runs on
every rank with torch.distributed. Workers exit when told to, and on their own when their parent
disappears (a killed stub does not signal its children).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import random
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from diffusers import DiffusionPipeline

from ..config import ConfigError, DistriConfig
from ..launch import free_port, init_local_rank, select_device
from ..pipeline import DistriPipeline

DevicePlacement = Callable[[str, "int | None"], torch.device]
"""``(device, GPU index) -> torch.device``: the hook that puts a rank on its device (see
:func:`distrifusion.launch.select_device`, the default); called first thing in every rank."""

# Components the UNet stage never needs; the text encoders and the VAE are separate models.
_SKIPPED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "image_encoder")
_COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=10)
_START_TIMEOUT_SECONDS = 600.0


@dataclasses.dataclass
class DenoiseRequest:
    """A batch of prompts already encoded, all of one size, step count, guidance and scheduler."""

    prompt_embeds: torch.Tensor
    """``[batch, 77, D1 + D2]``: both text encoders' penultimate hidden states, concatenated."""
    pooled_prompt_embeds: torch.Tensor
    negative_prompt_embeds: torch.Tensor
    negative_pooled_prompt_embeds: torch.Tensor
    seeds: list[int | None]
    height: int
    width: int
    num_inference_steps: int
    guidance_scale: float
    scheduler: str | None = None


@dataclasses.dataclass
class DenoiseResult:
    latents: torch.Tensor
    seeds: list[int]
    interrupted: bool


def load_unet_pipeline(model_directory: str, config: DistriConfig, device: torch.device) -> DistriPipeline:
    """The diffusers pipeline with only its UNet and scheduler, patch-parallel, on ``device``."""
    skipped = dict.fromkeys(_SKIPPED_COMPONENTS)
    pipe = DiffusionPipeline.from_pretrained(model_directory, dtype=config.torch_dtype, **skipped)
    return DistriPipeline(pipe.to(device), config)


def warmup_request(unet_config: Any, height: int, width: int, text_tokens: int, steps: int) -> DenoiseRequest:
    """A request of zero embeddings that runs every step phase of ``height`` x ``width`` at batch 1."""
    pooled = unet_config.projection_class_embeddings_input_dim - 6 * unet_config.addition_time_embed_dim
    embeds = torch.zeros(1, text_tokens, unet_config.cross_attention_dim)
    return DenoiseRequest(
        prompt_embeds=embeds,
        pooled_prompt_embeds=torch.zeros(1, pooled),
        negative_prompt_embeds=embeds,
        negative_pooled_prompt_embeds=torch.zeros(1, pooled),
        seeds=[0],
        height=height,
        width=width,
        num_inference_steps=steps,
        guidance_scale=5.0,
    )


def _never() -> bool:
    return False


def run_denoise(
    pipeline: DistriPipeline, request: DenoiseRequest, should_stop: Callable[[], bool] = _never
) -> DenoiseResult | None:
    """Every rank runs this with the same request; rank 0 gets the result.

    Every rank passes a ``should_stop`` (only rank 0's is asked), so all join the per-step vote.
    """
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    result = pipeline(
        prompt_embeds=request.prompt_embeds.to(device, dtype),
        pooled_prompt_embeds=request.pooled_prompt_embeds.to(device, dtype),
        negative_prompt_embeds=request.negative_prompt_embeds.to(device, dtype),
        negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds.to(device, dtype),
        height=request.height,
        width=request.width,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        seed=request.seeds,
        scheduler=request.scheduler,
        output_type="latent",
        should_stop=should_stop,
    )
    if result is None:
        return None
    return DenoiseResult(
        latents=result.latents.float().cpu(), seeds=result.seed, interrupted=result.interrupted
    )


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _worker_main(
    rank: int,
    world: int,
    port: int,
    config: DistriConfig,
    model_directory: str,
    device_index: int | None,
    placement: DevicePlacement,
    threads: int | None,
    parent: int,
    commands: Any,
    replies: Any,
) -> None:
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        device = placement(config.device, device_index)
        init_local_rank(rank, world, port, config.device, timeout=_COLLECTIVE_TIMEOUT)
        pipeline = load_unet_pipeline(model_directory, config, device)
        replies.send(("ready", str(device)))
    except Exception:
        replies.send(("failed", traceback.format_exc()))
        return
    while True:
        command, request = commands.recv()
        if command == "stop":
            break
        try:
            run_denoise(pipeline, request)
        except Exception:
            # Rank 0 fails in the same collective (or its timeout) and reports the request.
            replies.send(("failed", traceback.format_exc()))
    dist.destroy_process_group()


class UNetGroup:
    """Rank 0 of one patch-parallel group, owning the worker processes of the other ranks.

    ``devices``: GPU indices, one per rank (CUDA), or None on the CPU, where ``ranks`` processes
    share the cores (``threads_per_rank`` each). ``placement`` puts each rank on its device.
    """

    def __init__(
        self,
        model_directory: str,
        config: DistriConfig,
        ranks: int,
        devices: list[int] | None = None,
        threads_per_rank: int | None = None,
        placement: DevicePlacement = select_device,
    ) -> None:
        config.validate_world(ranks)
        if devices is not None and len(devices) != ranks:
            raise ConfigError(f"devices: need one GPU per rank ({ranks}), got {devices}")
        self.ranks = ranks
        self.config = config
        self.devices: list[str] = []
        """Each rank's device, as the rank itself reported it."""
        self._workers: list[Any] = []
        self._commands: list[Any] = []
        self._replies: list[Any] = []
        if threads_per_rank is not None:
            torch.set_num_threads(threads_per_rank)
        port = free_port()
        context = mp.get_context("spawn")
        for rank in range(1, ranks):
            command_reader, command_writer = context.Pipe(duplex=False)
            reply_reader, reply_writer = context.Pipe(duplex=False)
            device_index = devices[rank] if devices is not None else None
            worker = context.Process(
                target=_worker_main,
                args=(rank, ranks, port, config, model_directory, device_index, placement, threads_per_rank,
                      os.getpid(), command_reader, reply_writer),
                daemon=True,
                name=f"distrifusion-rank{rank}",
            )  # fmt: skip
            worker.start()
            self._workers.append(worker)
            self._commands.append(command_writer)
            self._replies.append(reply_reader)
        try:
            device = placement(config.device, devices[0] if devices else None)
            self.devices.append(str(device))
            if ranks > 1:
                init_local_rank(0, ranks, port, config.device, timeout=_COLLECTIVE_TIMEOUT)
            self.pipeline = load_unet_pipeline(model_directory, config, device)
            self._await_workers_ready()
        except BaseException:
            self.close()
            raise

    @property
    def live_ranks(self) -> int:
        return 1 + sum(worker.is_alive() for worker in self._workers)

    def validate(self, request: DenoiseRequest) -> None:
        """Raises ConfigError naming the first field this group cannot run."""
        self.pipeline.validate(
            request.height,
            request.width,
            request.num_inference_steps,
            request.guidance_scale,
            request.scheduler,
        )

    def warm_up(self, height: int, width: int, text_tokens: int) -> None:
        """Runs every step phase of this size once (two short generations at batch 1), so that
        CUDA graphs are captured, communicators formed and kernels tuned before serving."""
        unet_config = self.pipeline.unet.config
        # The first generation records the exchange and captures the steady and last steps; the
        # second captures the warm-up steps, which only become graphable once the exchange is fixed.
        first_async = self.config.warmup_steps + 1
        try:
            for steps in (first_async + 3, first_async + 1):
                self.denoise(warmup_request(unet_config, height, width, text_tokens, steps))
        except Exception as error:
            hint = (
                " (CUDA graphs are on: build with --no-cuda-graphs to serve eager, measured slower)"
                if self.config.cuda_graphs
                else ""
            )
            raise RuntimeError(f"warm-up at {width}x{height} failed{hint}: {error}") from error

    def denoise(self, request: DenoiseRequest, should_stop: Callable[[], bool] = _never) -> DenoiseResult:
        """Runs the request on every rank; ``should_stop()`` (checked each step) ends it early."""
        self.validate(request)
        if self.live_ranks < self.ranks:
            raise RuntimeError(f"only {self.live_ranks} of {self.ranks} ranks are alive")
        request = dataclasses.replace(
            request,
            prompt_embeds=request.prompt_embeds.detach(),
            pooled_prompt_embeds=request.pooled_prompt_embeds.detach(),
            negative_prompt_embeds=request.negative_prompt_embeds.detach(),
            negative_pooled_prompt_embeds=request.negative_pooled_prompt_embeds.detach(),
            seeds=[random.randrange(2**63) if seed is None else seed for seed in request.seeds],
        )
        for channel in self._commands:
            channel.send(("denoise", request))
        result = run_denoise(self.pipeline, request, should_stop)
        self._raise_worker_failures()
        return result

    def close(self) -> None:
        """Stops the workers (they finish what they run) and leaves the process group."""
        for channel in self._commands:
            with contextlib.suppress(BrokenPipeError, OSError):
                channel.send(("stop", None))
        for worker in self._workers:
            worker.join(timeout=10)
            if worker.is_alive():
                worker.kill()
                worker.join(timeout=5)
        self._workers.clear()
        self._commands.clear()
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()

    def _await_workers_ready(self) -> None:
        deadline = time.monotonic() + _START_TIMEOUT_SECONDS
        for rank, replies in enumerate(self._replies, start=1):
            if not replies.poll(max(0.0, deadline - time.monotonic())):
                raise RuntimeError(f"rank {rank} did not start within {_START_TIMEOUT_SECONDS:.0f} s")
            status, detail = replies.recv()
            if status != "ready":
                raise RuntimeError(f"rank {rank} failed to start:\n{detail}")
            self.devices.append(detail)

    def _raise_worker_failures(self) -> None:
        for rank, replies in enumerate(self._replies, start=1):
            if replies.poll():
                _, detail = replies.recv()
                raise RuntimeError(f"rank {rank} failed:\n{detail}")
