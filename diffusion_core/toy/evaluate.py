"""Prompt accuracy of the toy model, read from the pixels by a simple shape detector.

An image counts as right when the detector finds the caption's background colour, shape colour
and shape kind. The detector knows only the palette and three geometric facts: a square fills its
bounding box, a circle fills π/4 of it, an upright triangle half of it with three quarters of its
area in the lower half.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..images import make_grid
from ..generation import GenerationConfig
from ..pipeline import DiffusionModel
from ..schedulers import SamplerType
from . import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS
from .dataset import PALETTE, SHAPES, Scene, held_out_scenes, seen_scenes

_PALETTE_RGB = np.array(list(PALETTE.values()), dtype=np.float32)  # (8, 3)
_NAMES = list(PALETTE)
# (fill of the bounding box, share of the mask in the box's lower half) of each ideal shape; the star's are
# measured on rendered stars after the VAE (0.41 drawn, 0.51 decoded; its mass sits just below the middle).
_PROTOTYPES = {"circle": (math.pi / 4, 0.5), "square": (1.0, 0.5), "triangle": (0.5, 0.75), "star": (0.46, 0.53)}
MIN_SHAPE_PIXELS = 150  # fewer pixels of the shape colour than this (a 12x12 blob) means no shape was drawn


@dataclass(frozen=True)
class Detection:
    """What the detector read from one image; `shape` and `colour` are None when it found no shape."""

    background: str
    colour: str | None
    shape: str | None
    centre: tuple[float, float] | None = None  # (x, y) of the shape's bounding box centre, in pixels

    def matches(self, scene: Scene) -> bool:
        return (self.background, self.colour, self.shape) == (scene.background, scene.colour, scene.shape)


def snap_to_palette(pixels: np.ndarray) -> np.ndarray:
    """Index of the nearest palette colour (Euclidean in RGB) for each pixel of (..., 3)."""
    distances = np.linalg.norm(pixels[..., None, :].astype(np.float32) - _PALETTE_RGB, axis=-1)  # (..., 8)
    return distances.argmin(axis=-1)


def detect(image: Image.Image, shapes: tuple[str, ...] = SHAPES) -> Detection:
    """Read background colour, shape colour and shape kind (one of `shapes`) from an RGB image."""
    labels = snap_to_palette(np.asarray(image.convert("RGB")))  # (H, W) palette indices
    border = np.concatenate([labels[0], labels[-1], labels[1:-1, 0], labels[1:-1, -1]])
    background = np.bincount(border, minlength=len(_NAMES)).argmax()
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    counts[background] = 0
    colour = counts.argmax()
    if counts[colour] < MIN_SHAPE_PIXELS:
        return Detection(_NAMES[background], None, None)
    mask = labels == colour
    rows, cols = bounds(mask)
    centre = ((cols[0] + cols[-1] + 1) / 2, (rows[0] + rows[-1] + 1) / 2)  # pixel i spans [i, i + 1)
    return Detection(_NAMES[background], _NAMES[colour], classify_shape(mask, shapes), centre)


def bounds(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows and columns of the shape: those with at least two shape pixels (lone stray pixels do not count),
    or, when only scattered pixels exist, every one that has any."""
    rows, cols = np.flatnonzero(mask.sum(axis=1) >= 2), np.flatnonzero(mask.sum(axis=0) >= 2)
    if len(rows) == 0 or len(cols) == 0:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return rows, cols


def classify_shape(mask: np.ndarray, shapes: tuple[str, ...] = SHAPES) -> str:
    """The ideal shape of `shapes` nearest in (fill ratio, lower-half share) to the mask's bounding-box statistics."""
    rows, cols = bounds(mask)
    box = mask[rows[0]: rows[-1] + 1, cols[0]: cols[-1] + 1]
    fill = box.mean()
    half = box.shape[0] / 2
    row_mass = box.sum(axis=1)
    # the middle row of an odd-height box counts half to each half
    lower = row_mass[math.ceil(half):].sum() + (row_mass[int(half)] / 2 if box.shape[0] % 2 else 0)
    lower_share = lower / max(box.sum(), 1)
    features = np.array([fill, lower_share])
    return min(shapes, key=lambda name: np.linalg.norm(features - np.array(_PROTOTYPES[name])))


def sample_images(model: DiffusionModel, scenes: list[Scene], seeds: list[int], sampler: str | None, steps: int,
                  guidance: float) -> list[Image.Image]:
    """One image per (seed, scene), seed-major, made by the pipeline itself in one batch: what
    `model.generate(GenerationConfig(scene.caption, seed=seed, ...))` makes, image for image."""
    configs = [GenerationConfig(scene.caption, seed=seed, sampler=sampler, num_inference_steps=steps,
                                guidance_scale=guidance) for seed in seeds for scene in scenes]
    return [result.image for result in model.generate_batch(configs, progress=False)]


EVAL_SEEDS = (0, 1)  # every prompt is drawn with each of these seeds
GUIDANCE_SCALES = (1.0, 2.0, 4.0, 7.5)
SAMPLERS = tuple(s.value for s in SamplerType)


def eval_scenes(split: str) -> list[Scene]:
    """The fixed prompt sets: every third seen scene (48), and all 24 held-out scenes."""
    if split == "seen":
        return seen_scenes()[::3]
    if split == "held_out":
        return held_out_scenes()
    raise ValueError(f"split {split!r} is not 'seen' or 'held_out'")


@dataclass(frozen=True)
class Score:
    """Prompt accuracy of one setting on one prompt set."""

    sampler: str
    steps: int
    guidance: float
    split: str
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total


def score(model: DiffusionModel, split: str, sampler: str, steps: int, guidance: float,
          seeds: tuple[int, ...] = EVAL_SEEDS) -> tuple[Score, list[Image.Image]]:
    """Generate every prompt of `split` with every seed and count the images the detector reads right."""
    scenes = eval_scenes(split)
    images = sample_images(model, scenes, list(seeds), sampler, steps, guidance)
    correct = sum(detect(image).matches(scene) for image, scene in zip(images, scenes * len(seeds)))
    return Score(sampler, steps, guidance, split, correct, len(images)), images


def seconds_per_image(model: DiffusionModel, sampler: str, steps: int, guidance: float, repeats: int = 5) -> float:
    """Median wall time of one 64x64 image (text encoding, sampling loop, decoding) at these settings."""
    scene = eval_scenes("seen")[0]
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sample_images(model, [scene], [0], sampler, steps, guidance)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def table(scores: list[Score], rows: str) -> str:
    """A markdown table: one row per value of `rows` ("guidance" or "sampler"), seen and held-out columns."""
    keys = list(dict.fromkeys(getattr(s, rows) for s in scores))
    lines = [f"| {rows} | seen | held-out |", "| --- | --- | --- |"]
    for key in keys:
        cells = {s.split: f"{s.accuracy:.0%} ({s.correct}/{s.total})" for s in scores if getattr(s, rows) == key}
        lines.append(f"| {key} | {cells['seen']} | {cells['held_out']} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prompt accuracy of the toy shapes model, read from the pixels.")
    parser.add_argument("--weights", type=Path, default=None, help="a single file; default: the bundled model")
    parser.add_argument("--out", type=Path, default=Path("outputs/toy-eval"), help="folder for the grid PNG")
    parser.add_argument("--sampler", default=DEFAULT_SAMPLER)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE)
    parser.add_argument("--samplers", nargs="+", default=list(SAMPLERS), help="samplers compared at the defaults")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(EVAL_SEEDS), help="seeds per prompt")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads; 0 keeps torch's default")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = DiffusionModel.from_pretrained(args.weights) if args.weights else DiffusionModel()
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"defaults: sampler={args.sampler} steps={args.steps} guidance={args.guidance}; "
          f"{len(eval_scenes('seen'))} seen and {len(eval_scenes('held_out'))} held-out prompts x seeds {args.seeds}")
    print(f"one 64x64 image at the defaults: {seconds_per_image(model, args.sampler, args.steps, args.guidance):.2f} s")
    by_guidance, by_sampler, grid = [], [], []
    for guidance in sorted({*GUIDANCE_SCALES, args.guidance}):
        for split in ("seen", "held_out"):
            result, images = score(model, split, args.sampler, args.steps, guidance, tuple(args.seeds))
            by_guidance.append(result)
            if guidance == args.guidance:
                grid += images[: len(eval_scenes(split))]
    for sampler in args.samplers:
        for split in ("seen", "held_out"):
            if sampler == args.sampler:  # already measured in the guidance sweep
                by_sampler += [r for r in by_guidance if r.guidance == args.guidance and r.split == split]
            else:
                by_sampler.append(score(model, split, sampler, args.steps, args.guidance, tuple(args.seeds))[0])
    print(f"\nPrompt accuracy by guidance scale ({args.sampler}, {args.steps} steps):\n" + table(by_guidance, "guidance"))
    print(f"\nPrompt accuracy by sampler (guidance {args.guidance}, {args.steps} steps):\n" + table(by_sampler, "sampler"))
    path = args.out / "toy_grid.png"
    make_grid(grid, columns=12).save(path)
    print(f"\nwrote {path} (seed {args.seeds[0]}: 48 seen prompts, then the 24 held-out ones)")


if __name__ == "__main__":
    main()
