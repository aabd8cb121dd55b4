"""A diffusers text-to-image pipeline whose UNet runs patch-parallel across the ranks of a group.

Every rank calls the pipeline with the same arguments (torchrun style); text encoding and the
scheduler run replicated, the UNet is split, and rank 0 decodes and returns the result.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from diffusers import DiffusionPipeline
from PIL import Image

from .clean_latent import CleanLatentProbe
from .config import ConfigError, DistriConfig, check_sampling
from .geometry import ModelGeometry
from .latent_space import LatentPosterior
from .schedulers import make_scheduler
from .step_clock import STEPS_AHEAD, StepClock, StepMark, clock_for
from .topology import Topology
from .unet import DistriUNet


@dataclasses.dataclass
class GenerationResult:
    images: list[Image.Image] | None
    """PIL images, or None when ``output_type="latent"``."""
    latents: torch.Tensor
    """The final latents, before the VAE: ``[batch, 4, height / 8, width / 8]``."""
    seed: int | list[int]
    interrupted: bool = False
    """``should_stop`` ended the denoising early: the latents are not finished."""


@dataclasses.dataclass(frozen=True)
class StepProgress:
    """What rank 0 knows after queuing a step (see ``on_progress``)."""

    step: int
    """1-based: the UNet evaluations done (Heun's second-order steps count twice, as in diffusers)."""
    total: int
    mark: StepMark
    """When the device has run the step; its tensors are final only then."""
    clean_latent: Callable[[], torch.Tensor]
    """The step's predicted clean latent (x0), full size, on the UNet's device."""


def _generators(seed: int | list[int]) -> torch.Generator | list[torch.Generator]:
    # CPU generators: the same noise on every rank and on every device type.
    if isinstance(seed, list):
        return [torch.Generator("cpu").manual_seed(each) for each in seed]
    return torch.Generator("cpu").manual_seed(seed)


class DistriPipeline:
    """Wraps a diffusers SDXL (or SD 1.x/2.x) text-to-image pipeline; see :meth:`__call__`."""

    def __init__(
        self, pipe: DiffusionPipeline, config: DistriConfig, topology: Topology | None = None
    ) -> None:
        self.config = config
        self.pipe = pipe
        self.geometry = ModelGeometry(
            levels=len(pipe.unet.config.block_out_channels),
            pixels_per_latent=pipe.vae_scale_factor,
            sample_size=pipe.unet.config.sample_size,
        )
        self.unet = DistriUNet(pipe.unet, config, topology, pixels_per_latent=pipe.vae_scale_factor)
        pipe.unet = self.unet
        self.model_scheduler = pipe.scheduler
        pipe.set_progress_bar_config(disable=True)
        self._img2img: DiffusionPipeline | None = None
        self.clock: StepClock | None = None
        """Marks where each step ends on the device (None: the UNet's device's own clock; a test may
        put a stand-in for a device that runs behind the host here)."""

    @classmethod
    def from_pretrained(
        cls, model: str | Path, config: DistriConfig, topology: Topology | None = None, **kwargs: Any
    ) -> DistriPipeline:
        """Loads a diffusers model directory (or a hub id where the hub is reachable).

        Call after the process group is formed; on CUDA each rank uses its current device.
        """
        pipe = DiffusionPipeline.from_pretrained(model, dtype=config.torch_dtype, **kwargs)
        device = torch.device("cuda", torch.cuda.current_device()) if config.device == "cuda" else "cpu"
        return cls(pipe.to(device), config, topology)

    @property
    def rank(self) -> int:
        return self.unet.topology.rank

    def validate(
        self, height: int, width: int, num_inference_steps: int, guidance_scale: float, scheduler: str | None
    ) -> None:
        """Raises ConfigError naming the first field this group cannot run."""
        check_sampling(num_inference_steps, guidance_scale)
        if scheduler is not None:
            make_scheduler(scheduler, self.model_scheduler.config)
        splits = self.config.split_batch and self.unet.topology.can_split and guidance_scale > 1
        self.geometry.layout(height, width, self.unet.topology.patch_group(splits).size)

    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 30,
        guidance_scale: float = 5.0,
        seed: int | list[int] | None = None,
        scheduler: str | None = None,
        output_type: str = "pil",
        should_stop: Callable[[], bool] | None = None,
        on_step: Callable[[int, StepMark], None] | None = None,
        on_progress: Callable[[StepProgress], None] | None = None,
        image: Any = None,
        strength: float = 0.6,
        **diffusers_kwargs: Any,
    ) -> GenerationResult | None:
        """Generates on every rank of the group; returns the result on rank 0, None elsewhere.

        The arguments are diffusers'; ``seed`` replaces ``generator`` (None: a random seed, reported
        in the result; a list: one seed per image), ``scheduler`` names one of
        :data:`distrifusion.schedulers.SCHEDULERS` (None: the model's own). ``should_stop`` is asked
        on rank 0 after every step (e.g. "was the request cancelled?"); all ranks then skip the
        remaining steps together. ``on_step(step, mark)`` is called on every rank once the host has
        queued a step, with the mark that tells when the device has run it (a watchdog heartbeats
        on those). ``on_progress`` is called on rank 0 only, after ``on_step``, with the step's
        :class:`StepProgress`; without it the scheduler is not wrapped. The host runs at most
        :data:`~distrifusion.step_clock.STEPS_AHEAD` steps ahead of the device, and returns once the
        device has run every step. Other keyword arguments go to
        the diffusers pipeline unchanged.

        With ``image`` (what diffusers' image-to-image pipelines take: a PIL image, an array or
        tensor of pixels, or latents with the UNet's channel count, already scaled; or a
        :class:`~distrifusion.latent_space.LatentPosterior`, sampled from the seed first) the generation
        is image-to-image, diffusers' own (``AutoPipelineForImage2Image`` on the same components):
        the image is noised to the step that ``strength`` selects and only the steps from there run.
        Its size is the generation's; ``height`` and ``width``, when given, must match it.
        """
        if image is not None:
            height, width = self._image_size(image, height, width, strength)
        height = self.geometry.default_size if height is None else height
        width = self.geometry.default_size if width is None else width
        self.validate(height, width, num_inference_steps, guidance_scale, scheduler)
        seed = self._agreed_seed(seed)
        generator = _generators(seed)
        if isinstance(image, LatentPosterior):
            image = image.sample(generator)
        pipe = self.pipe if image is None else self._img2img_pipeline()
        size = {"height": height, "width": width} if image is None else {"image": image, "strength": strength}
        pipe.scheduler = (
            self.model_scheduler
            if scheduler is None
            else make_scheduler(scheduler, self.model_scheduler.config)
        )
        final: dict[str, torch.Tensor] = {}
        queued: collections.deque[StepMark] = collections.deque()
        clock = self.clock or clock_for(self.unet.device)
        progress = on_progress if self.rank == 0 else None
        probe = CleanLatentProbe(pipe.scheduler)

        def after_step(pipe: DiffusionPipeline, step: int, timestep: Any, tensors: dict) -> dict:
            final["latents"] = tensors["latents"]
            mark = clock.mark()
            queued.append(mark)
            while len(queued) > STEPS_AHEAD:
                queued.popleft().wait()
            if on_step is not None:
                on_step(step, mark)
            if progress is not None:
                progress(StepProgress(step + 1, pipe.num_timesteps, mark, probe.latent))
            if should_stop is not None and self._agreed_stop(should_stop):
                pipe._interrupt = True  # diffusers then skips the remaining steps
            return {}

        self.unet.begin_generation(pipe)
        with probe if progress is not None else contextlib.nullcontext():
            output = pipe(
                prompt=prompt,
                negative_prompt=negative_prompt,
                **size,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
                generator=generator,
                output_type=output_type if self.rank == 0 else "latent",
                callback_on_step_end=after_step,
                **diffusers_kwargs,
            )
        for mark in queued:
            mark.wait()
        if self.rank != 0:
            return None
        images = None if output_type == "latent" else output.images
        interrupted = pipe.interrupt
        return GenerationResult(images=images, latents=final["latents"], seed=seed, interrupted=interrupted)

    def steps_run(
        self, num_inference_steps: int, scheduler: str | None, strength: float | None = None
    ) -> int:
        """The UNet evaluations a generation runs (:attr:`StepProgress.total`); with ``strength``,
        an image-to-image one's: diffusers' ``get_timesteps`` keeps the last
        ``int(num_inference_steps * strength)`` steps of the schedule."""
        config = self.model_scheduler.config
        schedule = (
            make_scheduler(scheduler, config) if scheduler else type(self.model_scheduler).from_config(config)
        )
        schedule.set_timesteps(num_inference_steps)
        if strength is None:
            return len(schedule.timesteps)
        kept = min(int(num_inference_steps * strength), num_inference_steps)
        return len(schedule.timesteps[(num_inference_steps - kept) * schedule.order :])

    def _img2img_pipeline(self) -> DiffusionPipeline:
        if self._img2img is None:
            from diffusers import AutoPipelineForImage2Image

            self._img2img = AutoPipelineForImage2Image.from_pipe(self.pipe)
            self._img2img.set_progress_bar_config(disable=True)
        return self._img2img

    def _image_size(
        self, image: Any, height: int | None, width: int | None, strength: float
    ) -> tuple[int, int]:
        """The image's size in pixels (``height``, ``width``); ConfigError for a mismatch or a bad strength."""
        if not 0 < strength <= 1:
            raise ConfigError(f"strength: the share of the schedule to run, in (0, 1], got {strength!r}")
        if isinstance(image, Image.Image):
            size = (image.height, image.width)
        elif isinstance(image, LatentPosterior):
            latent = image.moments.shape[-2:]
            size = (latent[0] * self.geometry.pixels_per_latent, latent[1] * self.geometry.pixels_per_latent)
        else:
            shape = tuple(image.shape)
            channels_last = len(shape) >= 3 and shape[-1] in (1, 3, 4) and shape[-3] not in (1, 3, 4)
            size = shape[-3:-1] if channels_last else shape[-2:]
            if not channels_last and shape[-3] == self.pipe.unet.config.in_channels:  # latents
                size = (size[0] * self.geometry.pixels_per_latent, size[1] * self.geometry.pixels_per_latent)
        for name, given, actual in (("height", height, size[0]), ("width", width, size[1])):
            if given is not None and given != actual:
                raise ConfigError(
                    f"{name}: {given} differs from the image's {actual} pixels; resize the image first"
                )
        return int(size[0]), int(size[1])

    def _agreed_stop(self, should_stop: Callable[[], bool]) -> bool:
        # A host tensor on the control group: on GPUs the vote neither waits behind the
        # asynchronous all-gathers on the communication stream nor syncs the host with the device.
        flag = torch.tensor([self.rank == 0 and should_stop()], dtype=torch.uint8)
        topology = self.unet.topology
        if topology.world > 1:
            dist.broadcast(flag, src=0, group=topology.control)
        return bool(flag.item())

    def _agreed_seed(self, seed: int | list[int] | None) -> int | list[int]:
        """The request's seed, or one drawn on rank 0 and shared, so every rank samples the same noise."""
        if seed is not None:
            return seed
        drawn = [random.randrange(2**63) if self.rank == 0 else None]
        topology = self.unet.topology
        if topology.world > 1:
            dist.broadcast_object_list(drawn, src=0, group=topology.control, device=torch.device("cpu"))
        return drawn[0]
