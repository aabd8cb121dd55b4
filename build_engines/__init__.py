"""Build step: a diffusers SDXL directory -> a complete Triton model repository (see build.py)."""
