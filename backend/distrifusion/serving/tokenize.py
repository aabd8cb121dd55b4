"""Prompt tokenization for the served SDXL pipeline (pure Python: no Triton imports).

The Triton ``tokenizer`` model is thin glue around :class:`SDXLTokenizers`. It turns a batch of
prompts (and optional negative prompts) into the four id tensors that the two text encoders
take, plus two flags per request:

- ``negative_given``: False when the negative prompt is absent or blank. The UNet stage then
  uses zero negative embeddings, as diffusers does for SDXL (``force_zeros_for_empty_prompt``).
  The negative ids are still produced (the empty prompt's), so every output has a fixed shape.
- ``truncated``: the prompt or the negative prompt had more than ``max_length`` (77) tokens, with
  its start and end tokens, and was cut. diffusers only logs a warning there; we report it.

Each tokenizer keeps its own padding convention, loaded from the model's ``tokenizer/`` and
``tokenizer_2/`` folders: SDXL's first tokenizer pads with ``<|endoftext|>``, the second one
with ``!`` (id 0).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

# Output tensor names of the Triton ``tokenizer`` model (the ensemble and the encoders use them).
OUTPUT_NAMES = (
    "input_ids",
    "input_ids_2",
    "negative_input_ids",
    "negative_input_ids_2",
    "negative_given",
    "truncated",
)


class TokenizeError(ValueError):
    """An invalid request; ``field`` names the offending input (``prompt`` or ``negative_prompt``)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field


@dataclasses.dataclass
class TokenizedBatch:
    """Tokenizer outputs for a batch of ``B`` requests (numpy, in the Triton data types)."""

    input_ids: np.ndarray
    """``int32 [B, 77]``: the prompt for ``text_encoder``."""
    input_ids_2: np.ndarray
    """``int32 [B, 77]``: the prompt for ``text_encoder_2``."""
    negative_input_ids: np.ndarray
    negative_input_ids_2: np.ndarray
    negative_given: np.ndarray
    """``bool [B, 1]``: a non-blank negative prompt was given."""
    truncated: np.ndarray
    """``bool [B, 1]``: the prompt or the negative prompt was cut to ``max_length`` tokens."""

    def as_dict(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in OUTPUT_NAMES}


MAX_TEXT_BYTES = 16384
"""The longest prompt accepted, in UTF-8 bytes. CLIP reads 77 tokens, which even long words fill
within about 1.5 KB; refusing more before any work keeps one huge text (tokenizing 10 MB took 32 s
here) from holding the tokenizer stage for everyone behind it."""


def decode_text(value: Any, field: str) -> str:
    """One text input as ``str``: Triton BYTES elements arrive as ``bytes`` (UTF-8)."""
    if isinstance(value, np.ndarray):
        # A [1] element of a [B, 1] tensor row.
        if value.size != 1:
            raise TokenizeError(field, f"expected one string per request, got {value.size}")
        value = value.reshape(-1)[0]
    size = (
        len(value.encode("utf-8"))
        if isinstance(value, str)
        else len(value)
        if isinstance(value, (bytes, bytearray, np.bytes_))
        else 0
    )
    if size > MAX_TEXT_BYTES:
        raise TokenizeError(
            field, f"is {size} bytes long; at most {MAX_TEXT_BYTES} bytes are accepted (CLIP reads 77 tokens)"
        )
    if isinstance(value, (bytes, bytearray, np.bytes_)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise TokenizeError(field, f"is not valid UTF-8 ({err.reason} at byte {err.start})") from None
    if isinstance(value, str):
        return value
    raise TokenizeError(field, f"expected a string, got {type(value).__name__}")


def texts_from_tensor(
    array: np.ndarray | None, field: str, batch_size: int | None = None
) -> list[str] | None:
    """Decode a Triton BYTES tensor of shape ``[B, 1]`` (or ``[B]``) into ``B`` strings.

    Returns None when the tensor is absent. ``batch_size``, if given, must match ``B``.
    """
    if array is None:
        return None
    array = np.asarray(array, dtype=object)
    if array.ndim == 0:
        array = array.reshape(1, 1)
    rows = array.reshape(array.shape[0], -1)
    if rows.shape[1] != 1:
        raise TokenizeError(field, f"expected one string per request, got shape {list(array.shape)}")
    if batch_size is not None and rows.shape[0] != batch_size:
        raise TokenizeError(field, f"has batch size {rows.shape[0]}, but prompt has {batch_size}")
    return [decode_text(row[0], field) for row in rows]


class SDXLTokenizers:
    """SDXL's two CLIP tokenizers, each with its own padding, at a fixed length (77)."""

    def __init__(self, tokenizer: Any, tokenizer_2: Any, max_length: int | None = None):
        self.tokenizer = tokenizer
        self.tokenizer_2 = tokenizer_2
        lengths = {int(tokenizer.model_max_length), int(tokenizer_2.model_max_length)}
        if max_length is None:
            if len(lengths) != 1:
                raise ValueError(f"the two tokenizers disagree on model_max_length: {sorted(lengths)}")
            max_length = lengths.pop()
        self.max_length = int(max_length)

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, max_length: int | None = None) -> SDXLTokenizers:
        """Load ``tokenizer/`` and ``tokenizer_2/`` from a diffusers SDXL directory (no hub access)."""
        from transformers import CLIPTokenizer

        model_dir = Path(model_dir)
        tokenizers = []
        for name in ("tokenizer", "tokenizer_2"):
            folder = model_dir / name
            if not folder.is_dir():
                raise FileNotFoundError(f"{folder} is missing: an SDXL model has tokenizer/ and tokenizer_2/")
            tokenizers.append(CLIPTokenizer.from_pretrained(str(folder), local_files_only=True))
        return cls(*tokenizers, max_length=max_length)

    def _encode(self, tokenizer: Any, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(ids int32 [B, max_length], truncated bool [B]) with the tokenizer's own padding."""
        padded = tokenizer(
            list(texts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_attention_mask=False,
        ).input_ids
        # One token over the limit tells whether anything was cut (and, unlike an untruncated
        # call, does not make transformers warn about over-long sequences).
        longer = tokenizer(
            list(texts), truncation=True, max_length=self.max_length + 1, return_attention_mask=False
        ).input_ids
        truncated = np.array([len(ids) > self.max_length for ids in longer], dtype=bool)
        return np.asarray(padded, dtype=np.int32), truncated

    def encode(
        self, prompts: Sequence[str], negative_prompts: Sequence[str | None] | None = None
    ) -> TokenizedBatch:
        """Tokenize a batch. A None or blank negative prompt is encoded as "" with negative_given False.

        Raises :class:`TokenizeError` for an empty batch or a blank prompt.
        """
        prompts = list(prompts)
        if not prompts:
            raise TokenizeError("prompt", "is required (got an empty batch)")
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str):
                raise TokenizeError("prompt", f"expected a string, got {type(prompt).__name__}")
            if not prompt.strip():
                where = f" (batch index {i})" if len(prompts) > 1 else ""
                raise TokenizeError("prompt", f"must not be empty{where}")
        if negative_prompts is None:
            negative_prompts = [None] * len(prompts)
        negative_prompts = list(negative_prompts)
        if len(negative_prompts) != len(prompts):
            raise TokenizeError(
                "negative_prompt", f"has {len(negative_prompts)} entries for {len(prompts)} prompts"
            )
        for negative in negative_prompts:
            if negative is not None and not isinstance(negative, str):
                raise TokenizeError("negative_prompt", f"expected a string, got {type(negative).__name__}")
        given = np.array([n is not None and bool(n.strip()) for n in negative_prompts], dtype=bool)
        negatives = [n if g else "" for n, g in zip(negative_prompts, given, strict=True)]

        ids_1, cut_1 = self._encode(self.tokenizer, prompts)
        ids_2, cut_2 = self._encode(self.tokenizer_2, prompts)
        neg_1, neg_cut_1 = self._encode(self.tokenizer, negatives)
        neg_2, neg_cut_2 = self._encode(self.tokenizer_2, negatives)
        truncated = cut_1 | cut_2 | neg_cut_1 | neg_cut_2
        return TokenizedBatch(
            input_ids=ids_1,
            input_ids_2=ids_2,
            negative_input_ids=neg_1,
            negative_input_ids_2=neg_2,
            negative_given=given.reshape(-1, 1),
            truncated=truncated.reshape(-1, 1),
        )

    def encode_tensors(
        self, prompt: np.ndarray | None, negative_prompt: np.ndarray | None = None
    ) -> TokenizedBatch:
        """Tokenize Triton BYTES tensors (``[B, 1]`` object arrays of UTF-8 bytes)."""
        prompts = texts_from_tensor(prompt, "prompt")
        if prompts is None:
            raise TokenizeError("prompt", "is required")
        negatives = texts_from_tensor(negative_prompt, "negative_prompt", batch_size=len(prompts))
        return self.encode(prompts, negatives)
