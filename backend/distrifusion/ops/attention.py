"""Attention processor for diffusers' ``Attention`` with local queries.

Self-attention: this band's queries attend to the keys/values of the whole image in single-device
token order; this band's own keys/values are fresh, the other bands' come from the exchange (fresh
in warm-up, else the previous step's). Cross-attention: the text keys/values are the same for every
band and every step, so they are computed at the first step of a generation and reused (one cache
per text shape, refilled in place).
Everything else (scale, heads, norms, residual, output rescaling) follows the module's own settings,
as diffusers' ``AttnProcessor2_0`` does.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..config import Mode
from ..context import ExchangingLayer, PatchContext


class PatchAttnProcessor:
    def __init__(self, context: PatchContext, key: str):
        self.context = context
        self.key = key
        self._shared = {name: _WholeImageTokens(context, f"{key}.{name}") for name in ("key", "value")}
        # Per text shape (the batch size changes with dynamic batching): never replaced, only
        # refilled, so that its address stays what the step graphs of that shape captured.
        self._text_key_value: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        spatial_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if spatial_shape is not None:
            batch, channels, height, width = spatial_shape
            hidden_states = hidden_states.view(batch, channels, height * width).transpose(1, 2)
        batch = hidden_states.shape[0]
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            if attention_mask is not None and self.context.parallel:
                raise NotImplementedError(f"{self.key}: a self-attention mask is not patch-parallel")
            key, value = self._self_key_value(attn, hidden_states)
        else:
            key, value = self._cross_key_value(attn, encoder_hidden_states)
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[1], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (
            t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value)
        )
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        hidden_states = F.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, scale=attn.scale
        )
        hidden_states = (
            hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        )
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if spatial_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(spatial_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _cross_key_value(self, attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if torch.compiler.is_compiling():
            # Recomputed at every step: the cache would compile the step twice (first step and the
            # rest) to save two projections of the 77 text tokens, a small part of a band's work.
            return self._text_projections(attn, text)
        shape = (text.shape, text.dtype, text.device)
        cached = self._text_key_value.get(shape)
        if self.context.step > 0 and cached is not None:
            return cached
        key, value = self._text_projections(attn, text)
        if cached is None:
            self._text_key_value[shape] = key, value
            return key, value
        # In place: CUDA graphs captured for this shape (in any earlier generation, also before
        # requests of other batch sizes came in between) read the new text from these buffers.
        cached[0].copy_(key)
        cached[1].copy_(value)
        return cached

    def _self_key_value(self, attn: Attention, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key, value = attn.to_k(tokens), attn.to_v(tokens)
        ctx = self.context
        if not ctx.parallel or ctx.mode is Mode.NAIVE_PATCH:
            return key, value
        # Two slots rather than one concatenated tensor: each band's keys and values are copied
        # once into the exchange instead of three times (concatenate, pad, send), and the whole
        # image's keys and values come out contiguous for the attention kernel.
        return tuple(self._shared[name].whole_image(own) for name, own in (("key", key), ("value", value)))

    @property
    def shared(self) -> list[ExchangingLayer]:
        """What this processor exchanges: the whole image's keys and values."""
        return list(self._shared.values())

    @staticmethod
    def _text_projections(attn: Attention, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if attn.norm_cross:
            text = attn.norm_encoder_hidden_states(text)
        return attn.to_k(text), attn.to_v(text)


class _WholeImageTokens(ExchangingLayer):
    """The keys (or values) of every band, in single-device token order, from this band's own."""

    def whole_image(self, own: torch.Tensor) -> torch.Tensor:
        return self.exchanged([own], own)

    def fresh(self, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        # All-gathers need one shape on every rank; bands can differ in height by a row.
        (own,) = parts
        layout, level = self.context.layout, self._level(own)
        missing = layout.max_band_height(level) * (layout.width >> level) - own.shape[1]
        return F.pad(own, (0, 0, 0, missing)) if missing else own

    def write_fresh(self, parts: Sequence[torch.Tensor], out: torch.Tensor) -> None:
        (own,) = parts
        out[:, : own.shape[1]].copy_(own)  # the padding rows are never read

    def combine(
        self, gathered: torch.Tensor, fresh: torch.Tensor, own: torch.Tensor | None, stale: bool
    ) -> torch.Tensor:
        # gathered: [bands, batch, max band tokens, inner dim]
        assert own is not None
        ctx, level = self.context, self._level(own)
        width = ctx.layout.width >> level
        parts = [
            own if band == ctx.band else gathered[band, :, : ctx.layout.band_height(band, level) * width]
            for band in range(ctx.layout.num_bands)
        ]
        return torch.cat(parts, dim=1)

    def _level(self, tokens: torch.Tensor) -> int:
        return self.context.layout.level_of_tokens(self.context.band, tokens.shape[1])
