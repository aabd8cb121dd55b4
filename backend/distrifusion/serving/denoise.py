"""One denoising request of the UNet stage, as every rank of its group runs it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from diffusers import DiffusionPipeline

from ..config import DistriConfig
from ..latent_space import LatentPosterior, LatentSpace
from ..pipeline import DistriPipeline, StepProgress
from ..step_clock import StepMark

TEXT_TOKENS = 77
"""CLIP's context length: the text shape of the group's own calibration generations (the served
warm-ups take the text encoders' from the model configuration)."""

# Components the UNet stage never needs; the text encoders and the VAE are separate models.
_SKIPPED_COMPONENTS = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae", "image_encoder")


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
    image_moments: torch.Tensor | None = None
    """Image-to-image: ``[batch, 2C, height / 8, width / 8]``, each image's scaled VAE posterior
    (:class:`~distrifusion.latent_space.LatentPosterior`); None: text-to-image."""
    strength: float = 1.0
    """Image-to-image: the share of the schedule that runs."""
    compile_new_shape: bool = False
    """With a compiled engine: compile this size if it has not run compiled yet (the warm-up).
    Otherwise a size that was not warmed up runs eager: a compile takes minutes (the tiny UNet's
    took 130 s on one CPU core), a stall every queued request and the client's timeout would see."""


@dataclasses.dataclass
class DenoiseResult:
    latents: torch.Tensor
    seeds: list[int]
    interrupted: bool


def load_unet_pipeline(model_directory: str, config: DistriConfig, device: torch.device) -> DistriPipeline:
    """The diffusers pipeline with only its UNet and scheduler, patch-parallel, on ``device``."""
    skipped = dict.fromkeys(_SKIPPED_COMPONENTS)
    pipe = DiffusionPipeline.from_pretrained(model_directory, dtype=config.torch_dtype, **skipped)
    latent_space = LatentSpace.load(model_directory)
    if latent_space is not None:  # image-to-image requests read the VAE's config
        pipe.register_modules(vae=latent_space)
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
        compile_new_shape=True,
    )


def _never() -> bool:
    return False


def run_denoise(
    pipeline: DistriPipeline,
    request: DenoiseRequest,
    should_stop: Callable[[], bool] = _never,
    on_step: Callable[[int, StepMark], None] | None = None,
    on_progress: Callable[[StepProgress], None] | None = None,
) -> DenoiseResult | None:
    """Every rank runs this with the same request; rank 0 gets the result.

    Every rank passes a ``should_stop`` (only rank 0's is asked), so all join the per-step vote;
    ``on_step(step, mark)`` runs on this rank once it has queued each step (``mark`` tells when
    the device has run it); ``on_progress`` (rank 0 only) gets each step's :class:`StepProgress`.
    """
    device = pipeline.unet.device
    dtype = pipeline.unet.dtype
    pipeline.unet.compile_new_shapes = request.compile_new_shape
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
        **(
            {}
            if request.image_moments is None
            else {
                "image": LatentPosterior(request.image_moments.to(device)),
                "strength": request.strength,
            }
        ),
        output_type="latent",
        should_stop=should_stop,
        on_step=on_step,
        on_progress=on_progress,
    )
    if result is None:
        return None
    return DenoiseResult(
        latents=result.latents.float().cpu(), seeds=result.seed, interrupted=result.interrupted
    )
