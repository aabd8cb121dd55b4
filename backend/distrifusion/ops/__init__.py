"""Patch-parallel replacements for the UNet operators whose output depends on other bands."""

from .attention import PatchAttnProcessor
from .conv2d import PatchConv2d
from .group_norm import PatchGroupNorm

__all__ = ["PatchAttnProcessor", "PatchConv2d", "PatchGroupNorm"]
