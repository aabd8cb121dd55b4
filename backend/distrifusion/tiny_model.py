"""Small random-weight diffusers pipelines with the real SDXL and SD 1.5 architectures.

No model hub is reachable, so tests and benchmarks build these from configs. Block types, layer
counts per block, conditioning paths (two text encoders, ``text_time`` added embeddings, pooled
projection), VAE depth (scale factor 8), schedulers and tokenizers follow the real checkpoints;
only widths are shrunk. The same seed gives bit-identical weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from .clip_vocab import (
    BOS_TOKEN,
    EOS_TOKEN,
    MAX_LENGTH,
    VOCAB_SIZE,
    clip_tokenizer,
    load_clip_bpe,
    write_clip_bpe_files,
)

Arch = Literal["sdxl", "sd15"]
ARCHS: tuple[str, ...] = ("sdxl", "sd15")

# Scheduler values of stabilityai/stable-diffusion-xl-base-1.0 (EulerDiscreteScheduler).
SDXL_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "prediction_type": "epsilon",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}

# Scheduler values of stable-diffusion-v1-5 (PNDMScheduler).
SD15_SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "prediction_type": "epsilon",
}

SDXL_VAE_SCALING_FACTOR = 0.13025
SD15_VAE_SCALING_FACTOR = 0.18215
# SDXL's tokenizer_2 pads with "!" (id 0), unlike its first tokenizer.
SDXL_TOKENIZER_2_PAD = "!"

# Distinct per-component seeds, so that e.g. both text encoders do not draw the same numbers.
_SEED_OFFSETS = {"text_encoder": 1, "text_encoder_2": 2, "unet": 3, "vae": 4}


def norm_groups(channels: Sequence[int], max_groups: int = 32, min_group_size: int = 4) -> int:
    """Largest GroupNorm group count <= ``max_groups`` dividing every channel count.

    Every skip concatenation in the UNet sums multiples of the gcd, so those divide too. At
    least ``min_group_size`` channels per group keeps tiny models from degenerating into
    per-channel (instance) norms.
    """
    common = math.gcd(*channels)
    smallest = min(channels)
    for groups in range(min(max_groups, common), 0, -1):
        if common % groups == 0 and groups * min_group_size <= smallest:
            return groups
    return 1


def attention_heads(block_out_channels: Sequence[int], head_channels: int) -> tuple[int, ...]:
    """Heads per block for a fixed per-head width (diffusers' ``attention_head_dim`` is a head count)."""
    bad = [c for c in block_out_channels if c % head_channels]
    if bad:
        raise ValueError(f"channels {bad} are not multiples of the attention head width {head_channels}")
    return tuple(c // head_channels for c in block_out_channels)


def default_head_channels(block_out_channels: Sequence[int]) -> int:
    """Per-head width: half the first block's width, so (128, 256, 512) gets SDXL's 64."""
    return max(8, block_out_channels[0] // 2)


def sdxl_unet_config(
    block_out_channels: Sequence[int] = (32, 64, 128),
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    head_channels: int | None = None,
    cross_attention_dim: int = 96,
    pooled_projection_dim: int = 64,
    addition_time_embed_dim: int = 8,
    sample_size: int = 128,
) -> dict[str, Any]:
    """UNet2DConditionModel config with the SDXL base structure at the given widths.

    Sequences are lists, as in a saved ``config.json``, so built and reloaded configs compare equal.
    """
    block_out_channels = tuple(block_out_channels)
    if len(block_out_channels) != 3 or len(transformer_layers_per_block) != 3:
        raise ValueError("SDXL's UNet has 3 levels: give 3 block_out_channels and transformer layers")
    head_channels = head_channels or default_head_channels(block_out_channels)
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 2,
        "transformer_layers_per_block": list(transformer_layers_per_block),
        "attention_head_dim": list(attention_heads(block_out_channels, head_channels)),
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": True,
        "norm_num_groups": norm_groups(block_out_channels),
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": addition_time_embed_dim,
        # Six micro-conditioning numbers (original size, crop, target size), each embedded,
        # concatenated with text_encoder_2's pooled projection.
        "projection_class_embeddings_input_dim": 6 * addition_time_embed_dim + pooled_projection_dim,
    }


def sd15_unet_config(
    block_out_channels: Sequence[int] = (32, 64, 128, 128),
    head_channels: int | None = None,
    cross_attention_dim: int = 32,
    sample_size: int = 64,
) -> dict[str, Any]:
    """UNet2DConditionModel config with the SD 1.5 structure at the given widths."""
    block_out_channels = tuple(block_out_channels)
    if len(block_out_channels) != 4:
        raise ValueError("SD 1.5's UNet has 4 levels: give 4 block_out_channels")
    head_channels = head_channels or default_head_channels(block_out_channels)
    # SD 1.5 uses one head count for every block (8 there), so head width grows with depth.
    heads = attention_heads(block_out_channels[:1], head_channels)[0]
    return {
        "sample_size": sample_size,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 2,
        "attention_head_dim": heads,
        "cross_attention_dim": cross_attention_dim,
        "use_linear_projection": False,
        "norm_num_groups": norm_groups(block_out_channels),
    }


def vae_config(
    scaling_factor: float,
    sample_size: int,
    block_out_channels: Sequence[int] = (32, 32, 64, 64),
    force_upcast: bool = True,
) -> dict[str, Any]:
    """AutoencoderKL config: 4 levels like the real VAEs (vae_scale_factor 8), narrow and shallow."""
    block_out_channels = tuple(block_out_channels)
    return {
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * len(block_out_channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(block_out_channels),
        "block_out_channels": list(block_out_channels),
        "layers_per_block": 1,
        "norm_num_groups": norm_groups(block_out_channels),
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "force_upcast": force_upcast,
    }


def text_encoder_config(
    hidden_size: int,
    num_layers: int = 2,
    num_heads: int = 4,
    hidden_act: str = "quick_gelu",
    projection_dim: int | None = None,
    pad_token: str = EOS_TOKEN,
) -> CLIPTextConfig:
    """CLIP text-encoder config with the real vocabulary and 77 positions, shrunk in width and depth."""
    if num_layers < 2:
        # Stable Diffusion XL conditions on hidden_states[-2]; with one layer that is the embeddings.
        raise ValueError("text encoders need at least 2 layers")
    vocab, _ = load_clip_bpe()
    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=MAX_LENGTH,
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        hidden_act=hidden_act,
        projection_dim=projection_dim if projection_dim is not None else hidden_size,
        bos_token_id=vocab[BOS_TOKEN],
        eos_token_id=vocab[EOS_TOKEN],
        pad_token_id=vocab[pad_token],
    )


def _seed(seed: int, component: str) -> None:
    torch.manual_seed(seed + _SEED_OFFSETS[component])


def build_tiny_sdxl(
    seed: int = 0,
    block_out_channels: Sequence[int] = (32, 64, 128),
    transformer_layers_per_block: Sequence[int] = (1, 1, 2),
    head_channels: int | None = None,
    text_hidden_sizes: tuple[int, int] = (32, 64),
    text_layers: int = 2,
    addition_time_embed_dim: int = 8,
    sample_size: int = 128,
) -> StableDiffusionXLPipeline:
    """Random-weight pipeline with the SDXL base architecture; widen the UNet via ``block_out_channels``."""
    hidden_1, hidden_2 = text_hidden_sizes
    # Restore the caller's RNG afterwards: building a model should not shift their random stream.
    with torch.random.fork_rng(devices=[]):
        _seed(seed, "text_encoder")
        text_encoder = CLIPTextModel(text_encoder_config(hidden_1, text_layers, hidden_act="quick_gelu"))
        _seed(seed, "text_encoder_2")
        text_encoder_2 = CLIPTextModelWithProjection(
            text_encoder_config(
                hidden_2,
                text_layers,
                hidden_act="gelu",
                projection_dim=hidden_2,
                pad_token=SDXL_TOKENIZER_2_PAD,
            )
        )
        _seed(seed, "unet")
        unet = UNet2DConditionModel(
            **sdxl_unet_config(
                block_out_channels,
                transformer_layers_per_block,
                head_channels=head_channels,
                # The UNet attends to both encoders' penultimate hidden states, concatenated.
                cross_attention_dim=hidden_1 + hidden_2,
                pooled_projection_dim=hidden_2,
                addition_time_embed_dim=addition_time_embed_dim,
                sample_size=sample_size,
            )
        )
        _seed(seed, "vae")
        vae = AutoencoderKL(**vae_config(SDXL_VAE_SCALING_FACTOR, sample_size=1024, force_upcast=True))
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=clip_tokenizer(pad_token=EOS_TOKEN),
        tokenizer_2=clip_tokenizer(pad_token=SDXL_TOKENIZER_2_PAD),
        unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        force_zeros_for_empty_prompt=True,
        # The invisible-watermark package is not a dependency; never try to load it.
        add_watermarker=False,
    )
    return _eval(pipe)


def build_tiny_sd15(
    seed: int = 0,
    block_out_channels: Sequence[int] = (32, 64, 128, 128),
    head_channels: int | None = None,
    text_hidden_size: int = 32,
    text_layers: int = 2,
    sample_size: int = 64,
) -> StableDiffusionPipeline:
    """Random-weight pipeline with the Stable Diffusion 1.5 architecture."""
    with torch.random.fork_rng(devices=[]):
        _seed(seed, "text_encoder")
        text_encoder = CLIPTextModel(
            text_encoder_config(text_hidden_size, text_layers, hidden_act="quick_gelu")
        )
        _seed(seed, "unet")
        unet = UNet2DConditionModel(
            **sd15_unet_config(
                block_out_channels,
                head_channels=head_channels,
                cross_attention_dim=text_hidden_size,
                sample_size=sample_size,
            )
        )
        _seed(seed, "vae")
        vae = AutoencoderKL(**vae_config(SD15_VAE_SCALING_FACTOR, sample_size=512))
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=clip_tokenizer(pad_token=EOS_TOKEN),
        unet=unet,
        scheduler=PNDMScheduler(**SD15_SCHEDULER_CONFIG),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    return _eval(pipe)


def build_tiny_model(
    arch: Arch = "sdxl", seed: int = 0
) -> StableDiffusionXLPipeline | StableDiffusionPipeline:
    """Build the default tiny pipeline of ``arch`` ("sdxl" or "sd15")."""
    if arch == "sdxl":
        return build_tiny_sdxl(seed=seed)
    if arch == "sd15":
        return build_tiny_sd15(seed=seed)
    raise ValueError(f"unknown arch {arch!r}; expected one of {ARCHS}")


def save_tiny_model(output_dir: str | Path, arch: Arch = "sdxl", seed: int = 0) -> Path:
    """Write the tiny pipeline with ``save_pretrained`` (safetensors); returns the directory."""
    output_dir = Path(output_dir)
    pipe = build_tiny_model(arch, seed=seed)
    pipe.save_pretrained(output_dir, safe_serialization=True)
    # transformers 5 saves only tokenizer.json; add the BPE files real checkpoints also carry, for
    # readers that expect them. from_pretrained still prefers tokenizer.json.
    for name in ("tokenizer", "tokenizer_2"):
        if (output_dir / name).is_dir():
            write_clip_bpe_files(output_dir / name)
    return output_dir


def _eval(pipe: Any) -> Any:
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        module = getattr(pipe, name, None)
        if module is not None:
            module.eval()
    return pipe
