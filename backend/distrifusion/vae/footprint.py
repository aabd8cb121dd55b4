"""What one VAE decode costs, from the VAE's own config: the largest tensor, the mid-block
attention's score matrix and the peak memory, per latent size.

The decoder (diffusers' ``Decoder``) runs its mid block at latent resolution with the widest
channels, then one up block per level, each but the last ending in a 2x nearest upsample and a
convolution. At level ``i`` (scale ``2**i`` over the latent) the tensors carry the previous
level's channels (upsampled into it) and this level's own; the largest tensor is the widest of
those times ``4**i`` per latent pixel. For SDXL's VAE (128, 256, 512, 512) that is the 256-channel
upsampled tensor at full resolution: 256 x H x W, so one image passes 2**31 - 1 elements (the
limit of TensorRT's convolution) at about 2896 x 2896 pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ..export.specs import VAE_TILE_STATISTICS, VAE_TILES, VAE_WHOLE

INT32_ELEMENTS = 2**31 - 1
"""TensorRT's convolution (10.x) does not take tensors over this many elements."""

LIVE_ACTIVATIONS = {VAE_WHOLE: 6.0, VAE_TILE_STATISTICS: 7.5, VAE_TILES: 6.0}
"""Peak working memory of one call of each graph, in activations of the largest size: the largest
factor measured with ONNX Runtime (the served session options, attention fused), rounded up
(benchmarks/vae_memory.py, BENCHMARKS.md "VAE memory": the tiny model's VAE and SDXL's, at several
sizes; it is not proportional to the size). The record pass holds the most: every GroupNorm's
weighted sums. TensorRT plans its own memory; not measured here, these are its estimate too."""

CALL_OVERHEAD_BYTES = 256 * 2**20
"""What one call costs beyond its activations in a served engine: ONNX Runtime in a Triton stub
peaked 200-250 MiB above the same call in a plain process (BENCHMARKS.md "High resolution" against
"VAE memory"). Counted for TensorRT too, where it is not measured."""

SCORE_COPIES = 2
"""A materialised attention holds its score matrix and the matrix's softmax at once (measured:
ONNX Runtime's MatMul-Softmax-MatMul, 2.1 score matrices at 16384 tokens)."""


@dataclasses.dataclass(frozen=True)
class DecoderFootprint:
    scale_factor: int
    """Image pixels per latent pixel along each side (8 for SDXL)."""
    largest_elements_per_latent_pixel: int
    """Elements of the decoder's largest activation per latent pixel (SDXL: 256 x 8 x 8)."""
    attention_heads: int
    """Heads of the mid block's self-attention over every latent token (0: the VAE has none)."""
    norm_layers: int
    """GroupNorm layers of the decoder, in the order a forward pass runs them."""
    norm_groups: int
    encoder_norm_layers: int
    """GroupNorm layers of the encoder (its tiles share statistics as the decoder's do)."""
    bytes_per_element: int = 4
    """The decoder runs in fp32 (SDXL's VAE overflows in fp16)."""

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> DecoderFootprint:
        channels = list(reversed(config["block_out_channels"]))
        if not channels:
            raise ValueError("the VAE config has no block_out_channels")
        widest = 0
        for level, channel in enumerate(channels):
            arriving = channels[level - 1] if level else channels[0]
            widest = max(widest, max(arriving, channel) * 4**level)
        layers = int(config.get("layers_per_block", 2)) + 1  # the decoder's up blocks have one more
        attention = bool(config.get("mid_block_add_attention", True))
        # conv_norm_out, two mid-block resnets (two norms each), the attention's own norm, and two
        # norms per resnet of every up block.
        norms = 1 + 4 + int(attention) + 2 * layers * len(channels)
        # The encoder's down blocks have layers_per_block resnets; the rest as the decoder's.
        encoder_norms = 1 + 4 + int(attention) + 2 * (layers - 1) * len(channels)
        return cls(
            scale_factor=2 ** (len(channels) - 1),
            largest_elements_per_latent_pixel=widest,
            attention_heads=1 if attention else 0,  # the VAE's attention is one head of all channels
            norm_layers=norms,
            norm_groups=int(config.get("norm_num_groups", 32)),
            encoder_norm_layers=encoder_norms,
        )

    def largest_tensor_elements(self, batch: int, latent_height: int, latent_width: int) -> int:
        return batch * self.largest_elements_per_latent_pixel * latent_height * latent_width

    def attention_score_elements(self, batch: int, latent_height: int, latent_width: int) -> int:
        tokens = latent_height * latent_width
        return batch * self.attention_heads * tokens * tokens

    def peak_bytes(
        self, engine: str, batch: int, latent_height: int, latent_width: int, attention_materialised: bool
    ) -> int:
        """Estimated working memory of one call of ``engine`` (weights not included)."""
        activations = LIVE_ACTIVATIONS[engine] * self.largest_tensor_elements(
            batch, latent_height, latent_width
        )
        scores = (
            SCORE_COPIES * self.attention_score_elements(batch, latent_height, latent_width)
            if attention_materialised
            else 0
        )
        return int((activations + scores) * self.bytes_per_element) + CALL_OVERHEAD_BYTES
