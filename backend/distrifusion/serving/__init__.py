"""Serving-side engine pieces (no Triton imports): the UNet group, tokenization."""
