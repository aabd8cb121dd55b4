"""The UNet stage's side of streamed requests: what each one asked for, and the frames sent to it
after each step (see :mod:`.progress_channel`)."""

from __future__ import annotations

import collections
import dataclasses

import torch

from ..config import ConfigError
from ..pipeline import StepProgress
from ..step_clock import StepMark
from ..vae.preview import LatentToRgb
from .progress_channel import ProgressSender, StepMessage

PREVIEW_SIZES = (16, 1024)
"""A preview's longer side, in pixels: the bounds a request may ask for."""
DEFAULT_PREVIEW_SIZE = 256


@dataclasses.dataclass(frozen=True)
class StreamSettings:
    token: str
    preview_every: int = 0
    """0: progress only; k: a preview with every k-th step."""
    preview_size: int = DEFAULT_PREVIEW_SIZE

    def __post_init__(self) -> None:
        if self.preview_every < 0:
            raise ConfigError(f"preview_every: a step count >= 0 (0: no previews), got {self.preview_every}")
        low, high = PREVIEW_SIZES
        if not low <= self.preview_size <= high:
            raise ConfigError(
                f"preview_size: the longer side of a preview, {low} to {high} pixels, got {self.preview_size}"
            )


@dataclasses.dataclass
class _Stream:
    sender: ProgressSender
    rows: slice
    settings: StreamSettings


class StreamProgress:
    """Frames for the streamed requests of one batch. A step's frame leaves once the device has run
    the step (its mark is done), so progress never runs ahead of the device; the preview is computed
    on the device when the step is queued and copied to the host then."""

    def __init__(self, latent_map: LatentToRgb | None) -> None:
        self.latent_map = latent_map
        self._streams: list[_Stream] = []
        self._pending: collections.deque[
            tuple[StepMark, list[tuple[_Stream, int, int, torch.Tensor | None]]]
        ] = collections.deque()

    def add(self, sender: ProgressSender, rows: slice, settings: StreamSettings) -> None:
        self._streams.append(_Stream(sender, rows, settings))

    def __bool__(self) -> bool:
        return bool(self._streams)

    def on_progress(self, progress: StepProgress) -> None:
        clean: torch.Tensor | None = None
        frames = []
        for stream in self._streams:
            if stream.sender.gone():
                continue
            every = stream.settings.preview_every
            preview = None
            if every and progress.step % every == 0 and self.latent_map is not None:
                clean = progress.clean_latent() if clean is None else clean
                preview = self.latent_map.preview_pixels(clean[stream.rows], stream.settings.preview_size)
            frames.append((stream, progress.step, progress.total, preview))
        self._pending.append((progress.mark, frames))
        self.flush(finished=False)

    def flush(self, finished: bool = True) -> None:
        """Sends the frames of the steps the device has run (``finished``: every frame)."""
        while self._pending and (finished or self._pending[0][0].done()):
            _, frames = self._pending.popleft()
            for stream, step, total, preview in frames:
                pixels = None if preview is None else preview.cpu().numpy()
                stream.sender.send(StepMessage(step, total, pixels))
