"""Synthetic shapes with captions: the data the bundled toy model learns from, drawn on the fly.

Each image is 64x64 RGB: a solid background and one circle, axis-aligned square or upright triangle
whose bounding box is 24-48 px and lies inside the image, in another palette colour. The caption
is "a {colour} {shape} on a {colour} background". A few (colour, shape) pairs and one colour pair
never appear in training, so evaluation can ask whether the model composes words it has only seen apart.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import product

import numpy as np
import torch
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 80, 220), "yellow": (240, 210, 40),
    "purple": (140, 60, 190), "orange": (245, 140, 30), "white": (245, 245, 245), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# A shape the bundled model never saw, for teaching it one with a LoRA (toy/train_lora.py, notebook 09).
NEW_SHAPES = ("star",)
STAR_INNER_RADIUS = 0.4  # the five inner corners of the star lie at 0.4 of the points' radius
IMAGE_SIZE = 64
SHAPE_SIZE = (24, 48)  # smallest and largest side of the shape's bounding box, in pixels
# Held out of training: these (foreground, shape) pairs with any background, and white on black with any shape.
HELD_OUT_PAIRS = (("green", "triangle"), ("purple", "circle"), ("orange", "square"))
HELD_OUT_COLOURS = ("white", "black")  # (foreground, background)

SUPERSAMPLE = 4  # drawn 4x larger then downsampled: smooth, anti-aliased edges
COLOUR_JITTER = 6  # ± per channel, per image: the same word covers a small cloud of colours
PIXEL_NOISE = 2.0  # std of per-pixel Gaussian noise, in 0-255 units


@dataclass(frozen=True)
class Scene:
    """What one image shows; `caption` is the text the model is trained on."""

    colour: str      # the shape's palette colour
    shape: str       # "circle", "square" or "triangle" (or a NEW_SHAPES one, for LoRA lessons)
    background: str  # the background's palette colour, never the shape's

    @property
    def caption(self) -> str:
        return f"a {self.colour} {self.shape} on a {self.background} background"

    @property
    def held_out(self) -> bool:
        return (self.colour, self.shape) in HELD_OUT_PAIRS or (self.colour, self.background) == HELD_OUT_COLOURS


def all_scenes() -> list[Scene]:
    """Every (colour, shape, background) with different colours: 8 x 3 x 7 = 168 scenes."""
    return [Scene(c, s, b) for c, s, b in product(PALETTE, SHAPES, PALETTE) if c != b]


def seen_scenes() -> list[Scene]:
    """The 144 scenes training draws from."""
    return [s for s in all_scenes() if not s.held_out]


def held_out_scenes() -> list[Scene]:
    """The 24 scenes training never shows."""
    return [s for s in all_scenes() if s.held_out]


def parse_caption(caption: str) -> Scene:
    """The Scene a caption describes; a ValueError says what the accepted form is."""
    words = caption.split()
    if (len(words) != 7 or words[0] != "a" or words[3:5] != ["on", "a"] or words[6] != "background"
            or words[1] not in PALETTE or words[5] not in PALETTE or words[2] not in SHAPES or words[1] == words[5]):
        raise ValueError(f"caption {caption!r} is not 'a {{colour}} {{shape}} on a {{colour}} background' with "
                         f"two different colours from {list(PALETTE)} and a shape from {list(SHAPES)}")
    return Scene(words[1], words[2], words[5])


def random_box(rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[int, int, int]:
    """(left, top, side) of a shape's bounding box: 24-48 px on a 64 px canvas (scaled with it), inside it."""
    side = int(rng.integers(SHAPE_SIZE[0] * size // IMAGE_SIZE, SHAPE_SIZE[1] * size // IMAGE_SIZE + 1))
    x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    return x0, y0, side


def render(scene: Scene, rng: np.random.Generator, size: int = IMAGE_SIZE,
           box: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw one image of `scene`, 64x64 by default (a larger canvas scales the shape with it); the box
    (left, top, side: default `random_box(rng, size)`), colour jitter and pixel noise come from `rng`."""
    x0, y0, side = box or random_box(rng, size)
    fg = _jitter(PALETTE[scene.colour], rng)
    bg = _jitter(PALETTE[scene.background], rng)
    k = SUPERSAMPLE
    image = Image.new("RGB", (size * k, size * k), bg)
    draw = ImageDraw.Draw(image)
    box = (x0 * k, y0 * k, (x0 + side) * k - 1, (y0 + side) * k - 1)  # inclusive pixel corners
    if scene.shape == "circle":
        draw.ellipse(box, fill=fg)
    elif scene.shape == "square":
        draw.rectangle(box, fill=fg)
    elif scene.shape == "triangle":  # upright isosceles: apex at the top middle, base along the bottom of the box
        draw.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fg)
    elif scene.shape == "star":
        draw.polygon(star_corners(box), fill=fg)
    else:
        raise ValueError(f"shape {scene.shape!r} is not one of {SHAPES + NEW_SHAPES}")
    image = image.resize((size, size), Image.Resampling.BOX)
    pixels = np.asarray(image, dtype=np.float32) + rng.normal(0.0, PIXEL_NOISE, (size, size, 3))
    return Image.fromarray(pixels.round().clip(0, 255).astype(np.uint8))


def star_corners(box: tuple[float, float, float, float]) -> list[tuple[float, float]]:
    """An upright five-pointed star as wide as the box, its top point on the box's top edge: ten corners
    alternating between the points' radius R and STAR_INNER_RADIUS·R, 36° apart."""
    left, top, right, _ = box
    radius = (right - left) / (2 * math.sin(math.radians(72)))  # the two side points span 2R·sin 72°
    centre = ((left + right) / 2, top + radius)
    corners = []
    for i in range(10):
        r = radius if i % 2 == 0 else radius * STAR_INNER_RADIUS
        angle = math.radians(-90 + 36 * i)
        corners.append((centre[0] + r * math.cos(angle), centre[1] + r * math.sin(angle)))
    return corners


def _jitter(colour: tuple[int, int, int], rng: np.random.Generator) -> tuple[int, ...]:
    return tuple(int(np.clip(c + rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1), 0, 255)) for c in colour)


def make_batch(scenes: list[Scene], seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, list[str]]:
    """Batch number `index` of the stream seeded by `seed`: images (B, 3, 64, 64) in [-1, 1] and their captions.

    Each batch has its own generator, seeded by (seed, index), so any batch can be rebuilt alone:
    a resumed training run sees exactly the data an uninterrupted one would.
    """
    rng = np.random.default_rng([seed, index])
    picks = [scenes[i] for i in rng.integers(0, len(scenes), size=batch_size)]
    pixels = np.stack([np.asarray(render(s, rng)) for s in picks]).astype(np.float32)  # (B, 64, 64, 3)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2).contiguous(), [s.caption for s in picks]
