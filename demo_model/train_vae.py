"""Stage 1: the AutoencoderKL (4 levels: 8 pixels per latent, 4 latent channels, as SDXL's).

It learns on 64 x 64 crops of scenes rendered at sizes from 64 to 256 pixels, so it sees edges at
every scale the UNet will draw them. Loss: L1 reconstruction plus a small KL term (weight as in
Stable Diffusion's autoencoder, which keeps the latent close to a unit Gaussian without blurring).
The scaling factor is then measured as SDXL's was: 1 / the standard deviation of the latents.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL
from tqdm import tqdm

from distrifusion.tiny_model import vae_config

from . import checkpoint
from .scenes import random_scene, render

VAE_CHANNELS = (32, 32, 64, 64)
CROP = 64
RENDER_SIDES = (64, 96, 128, 192, 256)
KL_WEIGHT = 1e-6
POOL_SIZE = 4096


def crop_pool(seed: int, size: int = POOL_SIZE) -> torch.Tensor:
    """``size`` crops of CROP x CROP pixels in [-1, 1], N x 3 x H x W, from scenes at random sizes."""
    rng = random.Random(seed)
    crops = np.empty((size, CROP, CROP, 3), dtype=np.uint8)
    for i in range(size):
        width, height = rng.choice(RENDER_SIDES), rng.choice(RENDER_SIDES)
        image = np.asarray(render(random_scene(rng.randrange(2**31)), width, height))
        top, left = rng.randrange(height - CROP + 1), rng.randrange(width - CROP + 1)
        crops[i] = image[top : top + CROP, left : left + CROP]
    return torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 127.5 - 1


def psnr(reconstruction: torch.Tensor, target: torch.Tensor) -> float:
    """In dB, for images in [-1, 1]."""
    mse = ((reconstruction.clamp(-1, 1) - target) / 2).pow(2).mean().item()
    return 10 * np.log10(1 / max(mse, 1e-12))


def train_vae(work: Path, steps: int, batch: int, seed: int) -> AutoencoderKL:
    """Trains (or resumes) the VAE in ``work``; returns it with its measured scaling factor."""
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        **vae_config(1.0, sample_size=256, block_out_channels=VAE_CHANNELS, force_upcast=False)
    )
    optimizer = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    state = work / "vae.ckpt"
    start = checkpoint.load(state, vae=vae, optimizer=optimizer, schedule=schedule)
    pool = crop_pool(seed)
    held_out = crop_pool(seed + 1, size=256)
    progress = tqdm(range(start, steps), initial=start, total=steps, desc="vae", unit="step")
    vae.train()
    for step in progress:
        images = pool[torch.randint(len(pool), (batch,))]
        posterior = vae.encode(images).latent_dist
        reconstruction = vae.decode(posterior.sample()).sample
        l1 = (reconstruction - images).abs().mean()
        loss = l1 + KL_WEIGHT * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            progress.set_postfix(l1=f"{l1.item():.4f}", psnr=f"{psnr(reconstruction.detach(), images):.1f}")
        if (step + 1) % 500 == 0 or step == steps - 1:
            checkpoint.save(state, step + 1, vae=vae, optimizer=optimizer, schedule=schedule)
    vae.eval()
    with torch.no_grad():
        latents = torch.cat([vae.encode(held_out[i : i + 64]).latent_dist.mean for i in range(0, 256, 64)])
        reconstruction = torch.cat([vae.decode(latents[i : i + 64]).sample for i in range(0, 256, 64)])
    scaling_factor = float(1 / latents.std())
    vae.register_to_config(scaling_factor=round(scaling_factor, 5))
    tqdm.write(
        f"vae: held-out PSNR {psnr(reconstruction, held_out):.2f} dB, latent std {latents.std():.4f} "
        f"-> scaling_factor {vae.config.scaling_factor}"
    )
    return vae
