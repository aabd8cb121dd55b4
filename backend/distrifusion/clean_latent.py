"""The predicted clean latent (x0) of each denoising step, for previews.

At early steps the noisy latent is mostly noise; the scheduler's estimate of the clean latent already
shows the picture. Schedulers expose it three ways (diffusers 0.42): DDIM, Euler, Euler ancestral and
Heun return it as the step output's second element (``pred_original_sample``); the multistep solvers
that predict data (DPM-Solver++, UniPC with ``predict_x0``) keep it as their latest entry of
``model_outputs``; for the rest (PNDM) it follows from the model output, the sample and
``alphas_cumprod`` at the step's timestep.
"""

from __future__ import annotations

import functools
from typing import Any

import torch


class CleanLatentProbe:
    """Wraps ``scheduler.step`` while entered and remembers what the last step saw; :meth:`latent`
    then gives that step's x0. Costs nothing until asked: it keeps references, not copies."""

    def __init__(self, scheduler: Any) -> None:
        self.scheduler = scheduler
        self._last: tuple[torch.Tensor, Any, torch.Tensor, Any] | None = None

    def __enter__(self) -> CleanLatentProbe:
        original = self.scheduler.step

        # With the original's signature (``inspect.signature`` follows ``__wrapped__``): diffusers'
        # pipelines pass ``generator`` and ``eta`` only to a step whose signature names them, and an
        # ancestral step without the request's generator draws from the global RNG (its result then
        # differs from the unstreamed one).
        @functools.wraps(original)
        def step(
            model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, *args: Any, **kwargs: Any
        ) -> Any:
            output = original(model_output, timestep, sample, *args, **kwargs)
            self._last = (model_output, timestep, sample, output)
            return output

        # An instance attribute shadows the class's method; deleting it restores the method.
        self.scheduler.step = step
        return self

    def __exit__(self, *exc: object) -> None:
        del self.scheduler.step
        self._last = None

    def latent(self) -> torch.Tensor:
        """x0 of the last step, the shape of the latents it denoised."""
        if self._last is None:
            raise RuntimeError("no scheduler step has run under this probe")
        model_output, timestep, sample, output = self._last
        predicted = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        predicted = getattr(output, "pred_original_sample", predicted)
        if predicted is not None:
            return predicted
        config = self.scheduler.config
        predicts_data = config.get("algorithm_type", "") in ("dpmsolver++", "sde-dpmsolver++") or config.get(
            "predict_x0", False
        )
        outputs = getattr(self.scheduler, "model_outputs", None)
        if predicts_data and outputs and outputs[-1] is not None:
            return outputs[-1]
        return _from_prediction(model_output, timestep, sample, self.scheduler)


def _from_prediction(
    model_output: torch.Tensor, timestep: Any, sample: torch.Tensor, scheduler: Any
) -> torch.Tensor:
    """x0 on the variance-preserving schedule: ``sample = sqrt(a) x0 + sqrt(1 - a) noise``."""
    index = int(torch.as_tensor(timestep).reshape(-1)[0].round())
    alpha = scheduler.alphas_cumprod[index].to(sample.device, torch.float32)
    signal, noise = alpha.sqrt(), (1 - alpha).sqrt()
    kind = scheduler.config.prediction_type
    sample32, output32 = sample.float(), model_output.float()
    if kind == "epsilon":
        clean = (sample32 - noise * output32) / signal
    elif kind == "v_prediction":
        clean = signal * sample32 - noise * output32
    elif kind == "sample":
        clean = output32
    else:
        raise ValueError(f"prediction_type {kind!r}: no clean-latent estimate for it")
    return clean.to(sample.dtype)
