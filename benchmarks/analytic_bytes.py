"""The bytes one rank of the patch-parallel UNet sends per step, counted from the layer shapes alone,
independently of the engine: its per-step byte counts are checked against this count (the CPU
benchmark's table, the GPU benchmark's dry-run test)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import Attention
from torch import nn

from distrifusion.config import Mode

ANALYTIC_FORMULA = (
    "bytes sent per rank per step = act_bytes * (KV + halo + out) + 4 * GN, with "
    "KV = sum over self-attention layers of 2 * C_attn * (max band rows at the layer's level * W_level) * B; "
    "halo = sum over convolutions with kernel height > 1 except conv_in of 2 * padding * C_in * W_level * B; "
    "GN = sum over GroupNorm layers of 2 * B * groups (mean, variance in fp32); "
    "out = C_out * (max band rows at full resolution) * W * B (the noise-prediction gather). "
    "B is the UNet batch (2 with CFG); separate_gn sends no GN, naive_patch only 'out'. "
    "Each rank receives (ranks - 1) times what it sends."
)


def layer_shapes(unet: UNet2DConditionModel) -> tuple[list[dict[str, Any]], list[Any]]:
    """Forward pre-hooks recording what the analytic communication count needs from each layer."""
    layers: list[dict[str, Any]] = []
    handles = []

    def conv_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.Conv2d, args: tuple) -> None:
            x = args[0]
            layers.append(
                {
                    "kind": "conv",
                    "name": name,
                    "kernel_height": module.kernel_size[0],
                    "padding": module.padding[0],
                    "in_channels": x.shape[1],
                    "width": x.shape[3],
                    "batch": x.shape[0],
                }
            )

        return hook

    def norm_hook(name: str) -> Callable[..., None]:
        def hook(module: nn.GroupNorm, args: tuple) -> None:
            layers.append(
                {"kind": "group_norm", "name": name, "groups": module.num_groups, "batch": args[0].shape[0]}
            )

        return hook

    def attention_hook(name: str) -> Callable[..., None]:
        def hook(module: Attention, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            if kwargs.get("encoder_hidden_states") is not None or module.is_cross_attention:
                return
            tokens = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
            layers.append(
                {
                    "kind": "self_attention",
                    "name": name,
                    "kv_channels": module.to_k.out_features,
                    "tokens": tokens,
                    "batch": hidden.shape[0],
                }
            )

        return hook

    for name, module in unet.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_pre_hook(conv_hook(name)))
        elif isinstance(module, nn.GroupNorm):
            handles.append(module.register_forward_pre_hook(norm_hook(name)))
        elif isinstance(module, Attention):
            handles.append(module.register_forward_pre_hook(attention_hook(name), with_kwargs=True))
    return layers, handles


def band_rows(latent_height: int, levels: int, bands: int) -> int:
    """Rows of the tallest band at full resolution: bands are cut evenly at the deepest level."""
    factor = 2 ** (levels - 1)
    return math.ceil(latent_height // factor / bands) * factor


def analytic_bytes(
    layers: list[dict[str, Any]],
    latent_height: int,
    latent_width: int,
    levels: int,
    bands: int,
    mode: str,
    act_bytes: int = 4,
    out_channels: int = 4,
) -> dict[str, int]:
    """Bytes one rank sends per step, by the formula in ANALYTIC_FORMULA.

    Bands are cut evenly at the deepest level (the first ones a row taller when uneven) and scaled by
    2 per level, so a band's rows at level l are its deep rows * 2^(levels-1-l).
    """
    tallest = band_rows(latent_height, levels, bands)

    def max_rows(level: int) -> int:
        return tallest >> level

    def level_of_tokens(tokens: int) -> int:
        for level in range(levels):
            if (latent_height >> level) * (latent_width >> level) == tokens:
                return level
        raise ValueError(f"no level holds {tokens} tokens")

    kv = halo = norm = 0
    batch = 1
    for layer in layers:
        batch = layer["batch"]
        if layer["kind"] == "self_attention":
            level = level_of_tokens(layer["tokens"])
            kv += 2 * layer["kv_channels"] * max_rows(level) * (latent_width >> level) * batch
        elif layer["kind"] == "conv" and layer["name"] != "conv_in" and layer["kernel_height"] > 1:
            halo += 2 * layer["padding"] * layer["in_channels"] * layer["width"] * batch
        elif layer["kind"] == "group_norm":
            norm += 2 * batch * layer["groups"]
    out = out_channels * max_rows(0) * latent_width * batch
    if bands == 1:
        kv = halo = norm = out = 0
    elif mode == Mode.NAIVE_PATCH:
        kv = halo = norm = 0
    elif mode == Mode.SEPARATE_GN:
        norm = 0
    elements = {"kv": kv, "halo": halo, "group_norm": norm, "out": out}
    result = {
        f"{key}_bytes": value * (4 if key == "group_norm" else act_bytes) for key, value in elements.items()
    }
    result["total_bytes"] = sum(result.values())
    return result
