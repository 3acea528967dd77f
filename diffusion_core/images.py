"""Conversions between PIL images and the [-1, 1] tensors the VAE works in."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B PIL images, rounded as diffusers' image processor rounds."""
    array = (image.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
