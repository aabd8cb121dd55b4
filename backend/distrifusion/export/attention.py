"""Attention exported as ONNX Runtime's fused ``com.microsoft.MultiHeadAttention``.

The TorchScript exporter writes ``scaled_dot_product_attention`` as MatMul, Softmax, MatMul: ONNX
Runtime then holds the whole score matrix and its softmax (measured: 2.1 GiB for the VAE's mid
block at 1024 x 1024, 16384 tokens; 32 GiB at 2048 x 2048). Its CPU ``MultiHeadAttention`` kernel
computes the same attention in blocks (17 MiB at 16384 tokens). TensorRT's parser does not know
the ``com.microsoft`` domain, so only ONNX Runtime graphs are exported this way.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.onnx import symbolic_helper

from .wrappers import ExportError

DOMAIN = "com.microsoft"
CUSTOM_OPSETS = {DOMAIN: 1}
_SYMBOLIC = "aten::scaled_dot_product_attention"
_OPSET = 14  # the exporter looks a custom symbolic up from this opset on


def _dims(g: Any, x: Any, start: int, end: int) -> Any:
    return g.op(
        "Slice",
        g.op("Shape", x),
        g.op("Constant", value_t=torch.tensor([start])),
        g.op("Constant", value_t=torch.tensor([end])),
    )


@symbolic_helper.parse_args("v", "v", "v", "v", "f", "b", "v", "b")
def _multi_head_attention(
    g: Any,
    query: Any,
    key: Any,
    value: Any,
    attn_mask: Any = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: Any = None,
    enable_gqa: bool = False,
) -> Any:
    """``[B, heads, S, head size]`` q, k, v -> the same shape; heads folded into the batch, since the
    traced graph leaves the head count symbolic and the kernel's ``num_heads`` is an attribute."""
    if not symbolic_helper._is_none(attn_mask) or is_causal or dropout_p or enable_gqa:
        raise ExportError("the fused attention export takes unmasked, non-causal attention without dropout")
    if symbolic_helper._get_tensor_rank(query) != 4:
        raise ExportError("the fused attention export takes [batch, heads, tokens, head size] tensors")
    minus_one = g.op("Constant", value_t=torch.tensor([-1]))

    def fold(x: Any) -> Any:
        return g.op("Reshape", x, g.op("Concat", minus_one, _dims(g, x, 2, 4), axis_i=0))

    attributes: dict[str, Any] = {"num_heads_i": 1}
    if not symbolic_helper._is_none(scale):
        attributes["scale_f"] = float(symbolic_helper._maybe_get_const(scale, "f"))
    fused = g.op(f"{DOMAIN}::MultiHeadAttention", fold(query), fold(key), fold(value), **attributes)
    return g.op("Reshape", fused, g.op("Concat", _dims(g, query, 0, 3), minus_one, axis_i=0))


@contextlib.contextmanager
def fused_attention_export() -> Iterator[dict[str, int]]:
    """While open, ``torch.onnx.export`` writes attention as ``MultiHeadAttention``; yields the
    ``custom_opsets`` argument the export needs."""
    torch.onnx.register_custom_op_symbolic(_SYMBOLIC, _multi_head_attention, _OPSET)
    try:
        yield CUSTOM_OPSETS
    finally:
        torch.onnx.unregister_custom_op_symbolic(_SYMBOLIC, _OPSET)
