"""Stage 2: the UNet, on latents and text encodings computed once and cached.

The text encoders are the SDXL pipeline's two CLIP encoders with the real vocabulary.
``text_encoders=True`` (the command's default, which made the shipped model) trains them with the
UNet, encoding each batch afresh; otherwise they stay frozen at their seeded random weights and
their encodings are cached. The UNet trains with:
- v-prediction on SDXL's noise schedule (scaled_linear betas, 1000 steps) rescaled to zero
  terminal SNR, sampled with "trailing" timesteps (Lin et al. 2024, "Common Diffusion Noise
  Schedules and Sample Steps are Flawed"). SDXL's own schedule keeps 6.8% of the picture at its
  noisiest step; on 32 x 32 latents that leaves each channel's mean readable through the noise, so
  an epsilon model learnt the background's colour from its input, never from the prompt, and drew
  it at chance (12.5% of held-out prompts) from pure noise. The scheduler stays SDXL's
  EulerDiscreteScheduler; its config says the prediction type and the rescaling;
- several latent sizes and aspect ratios (``BUCKETS``), each batch one size, with SDXL's
  ``text_time`` micro-conditioning saying the size (original = target, no crop);
- classifier-free dropout: 10% of captions replaced by zero embeddings, what the pipeline uses for
  an empty negative prompt (``force_zeros_for_empty_prompt``);
- an exponential moving average of the weights, the one shipped.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import AutoencoderKL, DDPMScheduler, EulerDiscreteScheduler, StableDiffusionXLPipeline
from diffusers.training_utils import EMAModel
from PIL import Image
from tqdm import tqdm

from distrifusion.tiny_model import build_tiny_sdxl

from . import checkpoint
from .scenes import random_scene, render

UNET_CHANNELS = (32, 64, 128)
UNET_TRANSFORMER_LAYERS = (1, 1, 2)
TRAINED_SIDE = 256  # pixels: the model's native size (32 x 32 latents)
# (latent height, latent width) -> share of the scenes.
BUCKETS: dict[tuple[int, int], float] = {
    (32, 32): 0.4,
    (24, 32): 0.1,
    (32, 24): 0.1,
    (16, 16): 0.2,
    (16, 24): 0.1,
    (24, 16): 0.1,
}
CAPTION_DROPOUT = 0.1
ZERO_TERMINAL_SNR: dict[str, Any] = {
    "rescale_betas_zero_snr": True,
    "prediction_type": "v_prediction",
    "timestep_spacing": "trailing",
}
EMA_DECAY = 0.999
PREVIEW_SEEDS = tuple(range(10**6, 10**6 + 8))  # held out: training scenes have seeds below 10**6


def base_pipeline(seed: int) -> StableDiffusionXLPipeline:
    """The untrained pipeline: seeded text encoders and UNet, tokenizers, the SDXL scheduler with
    the zero-terminal-SNR schedule."""
    pipe = build_tiny_sdxl(
        seed=seed,
        block_out_channels=UNET_CHANNELS,
        transformer_layers_per_block=UNET_TRANSFORMER_LAYERS,
        sample_size=TRAINED_SIDE // 8,
    )
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config, **ZERO_TERMINAL_SNR)
    return pipe


@dataclass
class Cache:
    """Everything the UNet's training reads: latents per size, the captions' encodings."""

    latents: dict[tuple[int, int], torch.Tensor]  # bucket -> N_b x 4 x h x w (scaled)
    scenes: dict[tuple[int, int], torch.Tensor]  # bucket -> N_b scene indices
    prompt_embeds: torch.Tensor  # N x 77 x D, float16
    pooled: torch.Tensor  # N x D2


@torch.no_grad()
def build_cache(
    pipe: StableDiffusionXLPipeline, vae: AutoencoderKL, scenes: int, seed: int, path: Path
) -> Cache:
    """Renders and encodes ``scenes`` training scenes (seeds 0..scenes-1), or loads them from ``path``
    when it was made from the same VAE weights and settings."""
    key = hashlib.sha256(
        repr(
            (scenes, seed, BUCKETS, sorted((k, v.sum().item()) for k, v in vae.state_dict().items()))
        ).encode()
    ).hexdigest()
    if path.exists():
        cached = torch.load(path, weights_only=False)
        if cached["key"] == key:
            return cached["cache"]
    rng = random.Random(seed)
    sizes, shares = zip(*BUCKETS.items(), strict=True)
    assigned = rng.choices(sizes, weights=shares, k=scenes)
    latents: dict[tuple[int, int], list[torch.Tensor]] = {size: [] for size in sizes}
    members: dict[tuple[int, int], list[int]] = {size: [] for size in sizes}
    for size in sizes:
        indices = [i for i, s in enumerate(assigned) if s == size]
        for start in tqdm(
            range(0, len(indices), 64), desc=f"latents {size[0] * 8}x{size[1] * 8}", unit="batch"
        ):
            chunk = indices[start : start + 64]
            pixels = np.stack([np.asarray(render(random_scene(i), size[1] * 8, size[0] * 8)) for i in chunk])
            images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
            latents[size].append(vae.encode(images).latent_dist.mean * vae.config.scaling_factor)
            members[size].extend(chunk)
    embeds, pooled = [], []
    captions = [random_scene(i).caption for i in range(scenes)]
    for start in tqdm(range(0, scenes, 256), desc="captions", unit="batch"):
        prompt_embeds, _, pooled_embeds, _ = pipe.encode_prompt(
            captions[start : start + 256], device="cpu", do_classifier_free_guidance=False
        )
        embeds.append(prompt_embeds.half())
        pooled.append(pooled_embeds)
    cache = Cache(
        latents={size: torch.cat(parts) for size, parts in latents.items()},
        scenes={size: torch.tensor(ids) for size, ids in members.items()},
        prompt_embeds=torch.cat(embeds),
        pooled=torch.cat(pooled),
    )
    torch.save({"key": key, "cache": cache}, path)
    return cache


def token_ids(pipe: StableDiffusionXLPipeline, scenes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Both tokenizers' ids of the training captions, padded to 77 as the pipeline pads them."""
    captions = [random_scene(i).caption for i in range(scenes)]
    return tuple(
        tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        for tokenizer in (pipe.tokenizer, pipe.tokenizer_2)
    )


def encode(
    pipe: StableDiffusionXLPipeline, ids: torch.Tensor, ids_2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(prompt embeddings, pooled embeddings) as the pipeline's ``encode_prompt`` makes them: both
    encoders' penultimate hidden states side by side, the second encoder's projection."""
    first = pipe.text_encoder(ids, output_hidden_states=True)
    second = pipe.text_encoder_2(ids_2, output_hidden_states=True)
    return torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1), second[0]


def time_ids(height: int, width: int, batch: int) -> torch.Tensor:
    """SDXL's micro-conditioning: original size, crop corner, target size (pixels)."""
    return torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32).repeat(batch, 1)


def train_unet(
    work: Path,
    vae: AutoencoderKL,
    steps: int,
    batch: int,
    scenes: int,
    seed: int,
    learning_rate: float,
    text_encoders: bool = False,
    bucket_weights: dict[tuple[int, int], float] | None = None,
) -> StableDiffusionXLPipeline:
    """Trains (or resumes) the UNet, and the text encoders with ``text_encoders``, in ``work``;
    returns the pipeline with the averaged weights. ``bucket_weights`` (default: ``BUCKETS``)
    says how often each cached size is drawn."""
    pipe = base_pipeline(seed)
    pipe.vae = vae
    trained = {"unet": pipe.unet}
    if text_encoders:
        trained |= {"text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    for name in ("text_encoder", "text_encoder_2", "vae"):
        if name not in trained:
            getattr(pipe, name).requires_grad_(False)
    cache = build_cache(pipe, vae, scenes, seed, work / "unet_cache.pt")
    ids, ids_2 = token_ids(pipe, scenes)
    parameters = [p for module in trained.values() for p in module.parameters()]
    unet = pipe.unet
    # The pipeline's own schedule (betas, rescaling, prediction type), as a training noiser.
    noise_schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.03
    )
    ema = EMAModel(parameters, decay=EMA_DECAY)
    state = work / "unet.ckpt"
    torch.manual_seed(seed)
    start = checkpoint.load(state, **trained, optimizer=optimizer, schedule=schedule, ema=ema)
    sizes, shares = zip(*(bucket_weights or BUCKETS).items(), strict=True)
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="unet", unit="step")
    losses: list[float] = []
    for module in trained.values():
        module.train()
    for step in progress:
        size = random.choices(sizes, weights=shares)[0]
        pick = torch.randint(len(cache.scenes[size]), (batch,))
        latents, scene_ids = cache.latents[size][pick], cache.scenes[size][pick]
        if text_encoders:
            prompt_embeds, pooled = encode(pipe, ids[scene_ids], ids_2[scene_ids])
        else:
            prompt_embeds, pooled = cache.prompt_embeds[scene_ids].float(), cache.pooled[scene_ids]
        kept = (torch.rand(batch) >= CAPTION_DROPOUT).float()
        prompt_embeds, pooled = prompt_embeds * kept[:, None, None], pooled * kept[:, None]
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_schedule.config.num_train_timesteps, (batch,))
        noisy = noise_schedule.add_noise(latents, noise, timesteps)
        prediction = unet(
            noisy,
            timesteps,
            prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids(size[0] * 8, size[1] * 8, batch)},
        ).sample
        # Unweighted: Min-SNR's v weight, min(SNR, 5) / (SNR + 1), is 0 at the terminal step,
        # where the prompt alone decides the picture.
        loss = (prediction - noise_schedule.get_velocity(latents, noise, timesteps)).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        schedule.step()
        ema.step(parameters)
        losses.append(loss.item())
        if step % 25 == 0:
            progress.set_postfix(loss=f"{np.mean(losses[-100:]):.4f}", lr=f"{schedule.get_last_lr()[0]:.2e}")
        if (step + 1) % 250 == 0 or step == steps - 1:
            checkpoint.save(state, step + 1, **trained, optimizer=optimizer, schedule=schedule, ema=ema)
            with (work / "unet_losses.txt").open("a") as log:
                log.write(f"{step + 1} {np.mean(losses[-250:]):.5f}\n")
        if (step + 1) % 1000 == 0 or step == steps - 1:
            preview(averaged(pipe, trained, ema), work / f"preview_{step + 1:05d}.png")
            for module in trained.values():
                module.train()
    return averaged(pipe, trained, ema)


def averaged(
    pipe: StableDiffusionXLPipeline, trained: dict[str, torch.nn.Module], ema: EMAModel
) -> StableDiffusionXLPipeline:
    """``pipe`` whose ``trained`` modules hold the moving average, in eval mode (the training
    modules are kept)."""
    copies = {name: copy.deepcopy(module) for name, module in trained.items()}
    ema.copy_to([p for module in copies.values() for p in module.parameters()])
    return StableDiffusionXLPipeline(**{**pipe.components, **{n: m.eval() for n, m in copies.items()}})


@torch.no_grad()
def preview(pipe: StableDiffusionXLPipeline, path: Path, steps: int = 20) -> None:
    """Held-out prompts at the trained size, one row; their captions under each picture."""
    scenes = [random_scene(seed) for seed in PREVIEW_SEEDS]
    images = pipe(
        prompt=[s.caption for s in scenes],
        height=TRAINED_SIDE,
        width=TRAINED_SIDE,
        num_inference_steps=steps,
        guidance_scale=5.0,
        generator=torch.Generator().manual_seed(0),
    ).images
    truth = [render(s, TRAINED_SIDE, TRAINED_SIDE) for s in scenes]
    grid = Image.new("RGB", (TRAINED_SIDE * len(images), TRAINED_SIDE * 2), "white")
    for column, (made, wanted) in enumerate(zip(images, truth, strict=True)):
        grid.paste(made, (column * TRAINED_SIDE, 0))
        grid.paste(wanted, (column * TRAINED_SIDE, TRAINED_SIDE))
    grid.save(path)
    tqdm.write(f"preview: {path} (top: generated, bottom: the scene its prompt describes)")
