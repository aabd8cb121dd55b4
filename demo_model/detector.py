"""Reads a picture of a scene back into what a caption says: the background's colour(s) and each
object's colour and shape.

The picture is first box-filtered to ``ANALYSIS_SIDE`` pixels on its shorter side, so every size
costs the same and single-pixel noise averages out. The background is read from the border (top
and bottom strips: a plain colour, or a vertical gradient between two palette colours); pixels far
from the background are the objects, split by their nearest palette colour into 4-connected
components. A component's shape follows from how much of its bounding box it fills: a square
fills all of it, a circle pi/4 (0.785), the upright triangle half.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .scenes import COLOURS, PALETTE, Scene

ANALYSIS_SIDE = 96
_BORDER = 0.05  # the strips read as background, fraction of the shorter side
_FOREGROUND_DISTANCE = 60.0  # RGB distance from the background that makes a pixel an object's
_MIN_AREA = 0.01  # smallest object, fraction of the picture: a small triangle covers 2.4%, colour
# fringes where two colours meet (their mixture reads as a third colour) stay below it
_SQUARE_FILL = 0.9
_MIN_FILL = 0.3
_CIRCLE_FILL = 0.64
_PALETTE_RGB = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)


@dataclass(frozen=True)
class DetectedObject:
    colour: str
    shape: str
    area: float  # fraction of the picture


@dataclass(frozen=True)
class Detection:
    background: tuple[str, ...]
    objects: tuple[DetectedObject, ...]


def nearest_colour(rgb: np.ndarray) -> np.ndarray:
    """Index into ``COLOURS`` of the palette colour nearest each RGB triple (``...`` x 3)."""
    distances = np.linalg.norm(rgb[..., None, :].astype(np.float32) - _PALETTE_RGB, axis=-1)
    return distances.argmin(axis=-1)


def detect(image: Image.Image) -> Detection:
    pixels = _analysis_pixels(image)
    height, width, _ = pixels.shape
    strip = max(1, round(_BORDER * min(height, width)))
    top = np.median(pixels[:strip].reshape(-1, 3), axis=0)
    bottom = np.median(pixels[-strip:].reshape(-1, 3), axis=0)
    top_name, bottom_name = (COLOURS[i] for i in nearest_colour(np.stack([top, bottom])))
    background = (top_name,) if top_name == bottom_name else (top_name, bottom_name)
    # The background each row should have: the measured strips, interpolated down the picture.
    weight = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    expected = top * (1 - weight) + bottom * weight
    foreground = np.linalg.norm(pixels - expected, axis=-1) > _FOREGROUND_DISTANCE
    labels = nearest_colour(pixels)
    objects = []
    for colour_index, component in _components(foreground, labels):
        area = len(component) / (height * width)
        if area < _MIN_AREA:
            continue
        rows, cols = zip(*component, strict=True)
        box = (max(rows) - min(rows) + 1) * (max(cols) - min(cols) + 1)
        fill = len(component) / box
        if fill < _MIN_FILL:  # a colour fringe along another object's edge: a thin line or frame
            continue
        shape = "square" if fill >= _SQUARE_FILL else "circle" if fill >= _CIRCLE_FILL else "triangle"
        objects.append(DetectedObject(colour=COLOURS[colour_index], shape=shape, area=area))
    objects.sort(key=lambda o: -o.area)
    return Detection(background=background, objects=tuple(objects))


def _analysis_pixels(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    scale = ANALYSIS_SIDE / min(image.size)
    if scale < 1:
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BOX)
    return np.asarray(image, dtype=np.float32)


def _components(foreground: np.ndarray, labels: np.ndarray) -> list[tuple[int, list[tuple[int, int]]]]:
    """(palette index, pixels) of every 4-connected run of foreground pixels of one palette colour."""
    height, width = foreground.shape
    seen = ~foreground
    found = []
    for start in zip(*np.nonzero(foreground), strict=True):
        if seen[start]:
            continue
        colour = labels[start]
        seen[start] = True
        queue, pixels = deque([start]), []
        while queue:
            row, col = queue.popleft()
            pixels.append((row, col))
            for r, c in ((row - 1, col), (row + 1, col), (row, col - 1), (row, col + 1)):
                if 0 <= r < height and 0 <= c < width and not seen[r, c] and labels[r, c] == colour:
                    seen[r, c] = True
                    queue.append((r, c))
        found.append((int(colour), pixels))
    return found


@dataclass(frozen=True)
class Agreement:
    """How far a detection agrees with the scene a prompt described (each True or False)."""

    background: bool
    colours: bool  # the objects' colours, as a multiset
    shapes: bool  # the objects' shapes, as a multiset
    count: bool
    objects_found: float  # share of the prompt's (colour, shape) pairs found

    @property
    def colour_agreement(self) -> bool:
        return self.background and self.colours


def agreement(scene: Scene, detection: Detection) -> Agreement:
    wanted = Counter((o.colour, o.shape) for o in scene.objects)
    found = Counter((o.colour, o.shape) for o in detection.objects)
    return Agreement(
        background=detection.background == scene.background,
        colours=Counter(o.colour for o in detection.objects) == Counter(o.colour for o in scene.objects),
        shapes=Counter(o.shape for o in detection.objects) == Counter(o.shape for o in scene.objects),
        count=len(detection.objects) == len(scene.objects),
        objects_found=sum((wanted & found).values()) / sum(wanted.values()),
    )
