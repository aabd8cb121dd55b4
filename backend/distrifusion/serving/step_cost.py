"""How long a UNet step of a given size should take on this group: its work, scaled from steps the
group has timed.

The work of one UNet evaluation is ``rows * (c + a * P + b * P**2)`` FLOPs for ``P`` latent pixels:
convolutions and projections grow with the pixels, self-attention with their square, the time and
text embeddings not at all. ``c``, ``a`` and ``b`` come from three counts of the model's UNet on the
meta device (no weights, no compute) with PyTorch's FLOP counter. A size the group has not run yet
is expected to take the time of the nearest timed size of less work, scaled by the ratio of the
work: smaller steps use a device less efficiently, so this errs long; only when every timed step
had more work is it scaled down from the smallest of them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import torch

_PROBE_SIDES = (8, 16, 32)
"""Latent sides of the three counts (square): small enough to count in a second for SDXL."""


@dataclasses.dataclass(frozen=True)
class StepWork:
    """FLOPs of one UNet evaluation: ``rows * (constant + linear * P + quadratic * P**2)``."""

    constant: float
    linear: float
    quadratic: float

    @classmethod
    def count(cls, unet_config: Mapping[str, Any], text_tokens: int) -> StepWork:
        """Counts the UNet of ``unet_config`` (a diffusers ``UNet2DConditionModel`` config) on the meta
        device at three sizes and solves for the three coefficients."""
        from diffusers import UNet2DConditionModel
        from torch.utils.flop_counter import FlopCounterMode

        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(unet_config))
            counts = []
            for side in _PROBE_SIDES:
                with FlopCounterMode(display=False) as counter, torch.no_grad():
                    unet(**_probe_inputs(unet.config, side, text_tokens))
                counts.append(float(counter.get_total_flops()))
        pixels = [float(side * side) for side in _PROBE_SIDES]
        system = torch.tensor([[1.0, p, p * p] for p in pixels], dtype=torch.float64)
        constant, linear, quadratic = torch.linalg.solve(system, torch.tensor(counts, dtype=torch.float64))
        return cls(float(constant), float(linear), float(quadratic))

    def flops(self, rows: int, latent_pixels: int) -> float:
        p = float(latent_pixels)
        return rows * (self.constant + self.linear * p + self.quadratic * p * p)


def _probe_inputs(config: Any, side: int, text_tokens: int) -> dict[str, Any]:
    inputs: dict[str, Any] = {
        "sample": torch.empty(1, config.in_channels, side, side),
        "timestep": torch.tensor(1.0),
        "encoder_hidden_states": torch.empty(1, text_tokens, config.cross_attention_dim),
    }
    if config.addition_embed_type == "text_time":
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        inputs["added_cond_kwargs"] = {"text_embeds": torch.empty(1, pooled), "time_ids": torch.empty(1, 6)}
    return inputs


@dataclasses.dataclass(frozen=True)
class Expected:
    seconds: float
    basis: str
    """What the figure rests on, for a deadline's message."""


class StepTimes:
    """The typical step of each size this group ran, and what a step of another size should take."""

    def __init__(self, work: StepWork, pixels_per_latent: int) -> None:
        self.work = work
        self.pixels_per_latent = pixels_per_latent
        self._timed: dict[tuple[int, int, int], float] = {}

    def _flops(self, rows: int, height: int, width: int) -> float:
        scale = self.pixels_per_latent
        return self.work.flops(rows, (height // scale) * (width // scale))

    def record(self, rows: int, height: int, width: int, seconds: float) -> None:
        """The typical (median) step of the latest generation of ``rows`` UNet rows at ``width`` x
        ``height`` pixels."""
        self._timed[(rows, height, width)] = seconds

    def expected(self, rows: int, height: int, width: int) -> Expected | None:
        """None before any step was timed."""
        timed = self._timed.get((rows, height, width))
        if timed is not None:
            return Expected(timed, f"the median step of this size, {timed:.2f} s")
        if not self._timed:
            return None
        wanted = self._flops(rows, height, width)
        work = {key: self._flops(*key) for key in self._timed}
        smaller = [key for key in work if work[key] <= wanted]
        basis = max(smaller, key=work.__getitem__) if smaller else min(work, key=work.__getitem__)
        seconds = self._timed[basis] * wanted / work[basis]
        basis_rows, basis_height, basis_width = basis
        return Expected(
            seconds,
            f"{seconds:.2f} s expected from the median {basis_width}x{basis_height} step of {basis_rows} "
            f"row(s), {self._timed[basis]:.2f} s, scaled by the work",
        )
