"""Procedural captioned scenes: a plain or two-colour gradient background and one to three shapes.

A scene lives in relative coordinates: object centres as fractions of the width and height, object
sizes as fractions of the shorter side, so one scene renders at any size and aspect ratio with
circles still round. The same seed always gives the same scene; its caption says what was drawn,
in the words a user would type ("a small yellow triangle and a green square on a white background").
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 135, 20),
    "yellow": (245, 220, 35),
    "green": (35, 155, 60),
    "blue": (35, 75, 215),
    "purple": (135, 50, 175),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
# Half the object's extent, as a fraction of the image's shorter side.
HALF_EXTENT = {"small": 0.11, "large": 0.19}
MAX_OBJECTS = 3
GRADIENT_SHARE = 0.3
MIN_CONTRAST = 100.0  # RGB distance between an object and the background behind it
_MARGIN = 0.03  # free space between objects and to the border, as a fraction of the shorter side
_PALETTE_ARRAY = np.array([PALETTE[c] for c in COLOURS], dtype=np.float32)
_SUPERSAMPLE = 4  # drawn this many times larger, then box-filtered: antialiased edges


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" or "large"
    x: float  # centre, fraction of the width
    y: float  # centre, fraction of the height


@dataclass(frozen=True)
class Scene:
    background: tuple[str, ...]  # one colour, or two: a gradient from the top colour to the bottom one
    objects: tuple[SceneObject, ...]

    @property
    def caption(self) -> str:
        names = [
            _article(f"{'small ' if o.size == 'small' else ''}{o.colour} {o.shape}") for o in self.objects
        ]
        listed = names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
        if len(self.background) == 1:
            background = _article(f"{self.background[0]} background")
        else:
            background = _article(f"{self.background[0]} and {self.background[1]} gradient background")
        return f"{listed} on {background}"


def _article(words: str) -> str:
    return f"{'an' if words[0] in 'aeiou' else 'a'} {words}"


def random_scene(seed: int) -> Scene:
    """The scene of ``seed``: objects never overlap nor touch the border, and each stands out from
    the background behind it by at least ``MIN_CONTRAST`` (an orange shape half-way down a red to
    yellow gradient would be invisible)."""
    rng = random.Random(seed)
    background = tuple(rng.sample(COLOURS, 2)) if rng.random() < GRADIENT_SHARE else (rng.choice(COLOURS),)
    count = rng.randint(1, MAX_OBJECTS)
    while True:  # rejection sampling; three large objects always fit a square
        objects: list[SceneObject] = []
        for _ in range(count):
            size = rng.choice(("small", "large"))
            half = HALF_EXTENT[size] + _MARGIN
            x, y = rng.uniform(half, 1 - half), rng.uniform(half, 1 - half)
            contrast = _contrast(background, y, HALF_EXTENT[size])
            visible = [c for c, value in zip(COLOURS, contrast, strict=True) if value >= MIN_CONTRAST]
            if not visible:
                break
            objects.append(SceneObject(rng.choice(SHAPES), rng.choice(visible), size, x, y))
        if len(objects) == count and _apart(objects):
            return Scene(background=background, objects=tuple(objects))


def _contrast(background: tuple[str, ...], y: float, half: float) -> np.ndarray:
    """Per colour of ``COLOURS``: its least RGB distance to the background over the rows an object
    centred at ``y`` covers (at most ``half`` of the height either side, whatever the aspect ratio)."""
    top, bottom = (np.array(PALETTE[c], dtype=np.float32) for c in (background[0], background[-1]))
    weights = np.clip(np.linspace(y - half, y + half, 9), 0.0, 1.0)[:, None]
    rows = top * (1 - weights) + bottom * weights
    return np.linalg.norm(rows[None] - _PALETTE_ARRAY[:, None], axis=-1).min(axis=1)


def _apart(objects: list[SceneObject]) -> bool:
    """No two objects' boxes within the margin of each other. Checked in relative coordinates, in
    units of the shorter side: a longer axis only stretches distances, so what holds on a square
    image holds at every aspect ratio (and so does the distance to the border)."""
    for i, a in enumerate(objects):
        for b in objects[i + 1 :]:
            reach = HALF_EXTENT[a.size] + HALF_EXTENT[b.size] + _MARGIN
            if max(abs(a.x - b.x), abs(a.y - b.y)) < reach:
                return False
    return True


def render(scene: Scene, width: int, height: int) -> Image.Image:
    """``scene`` as an RGB image of ``width`` x ``height`` pixels."""
    big_w, big_h = width * _SUPERSAMPLE, height * _SUPERSAMPLE
    image = Image.fromarray(background_array(scene.background, big_w, big_h))
    draw = ImageDraw.Draw(image)
    side = min(big_w, big_h)
    for obj in scene.objects:
        cx, cy, half = obj.x * big_w, obj.y * big_h, HALF_EXTENT[obj.size] * side
        colour = PALETTE[obj.colour]
        if obj.shape == "circle":
            draw.ellipse((cx - half, cy - half, cx + half, cy + half), fill=colour)
        elif obj.shape == "square":
            draw.rectangle((cx - half, cy - half, cx + half, cy + half), fill=colour)
        else:  # an upright isosceles triangle filling its square box: half the box's area
            draw.polygon(((cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)), fill=colour)
    return image.resize((width, height), Image.Resampling.BOX)


def background_array(background: tuple[str, ...], width: int, height: int) -> np.ndarray:
    """The background alone, H x W x 3 uint8: one colour, or a vertical gradient between two."""
    top = np.array(PALETTE[background[0]], dtype=np.float32)
    bottom = np.array(PALETTE[background[-1]], dtype=np.float32)
    weight = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    rows = top * (1 - weight) + bottom * weight
    return np.broadcast_to(rows, (height, width, 3)).round().astype(np.uint8)
