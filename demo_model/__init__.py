"""The demo model: a small SDXL-architecture pipeline trained here on captioned procedural scenes
(:mod:`.scenes`), the detector that reads its pictures back (:mod:`.detector`), and the code that
trains it (``python -m demo_model.train``). The trained pipeline ships in ``sdxl-shapes/``."""

from pathlib import Path

SHIPPED = Path(__file__).resolve().parent / "sdxl-shapes"
"""The trained diffusers directory the checkout carries: what the demo and the CPU servers serve."""
