"""Conversions between PIL images and the [-1, 1] tensors the VAE works in, and inpainting masks."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(image: torch.Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> B PIL images, rounded as diffusers' image processor rounds.

    Like diffusers, x/2 + 1/2 is taken in the tensor's own dtype (fp16 included) before going to float32.
    """
    array = (image.detach() * 0.5 + 0.5).clamp(0, 1).float().cpu().permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in (array * 255).round().astype(np.uint8)]


def image_to_unit_range(image: Image.Image, width: int, height: int, mode: str = "RGB") -> torch.Tensor:
    """Image -> (1, C, height, width) in [0, 1]: converted to `mode`, Lanczos-resized, x/255 in float32, as
    diffusers' VaeImageProcessor (and its adapter pipelines) prepare images."""
    resized = image.convert(mode).resize((width, height), Image.Resampling.LANCZOS)
    array = np.array(resized).astype(np.float32) / 255.0
    array = array[..., None] if array.ndim == 2 else array  # "L": one channel
    return torch.from_numpy(array).permute(2, 0, 1).unsqueeze(0)


def image_to_model_input(image: Image.Image, width: int, height: int) -> torch.Tensor:
    """RGB image -> (1, 3, height, width) in [-1, 1], resized and scaled as diffusers' VaeImageProcessor does.

    Lanczos resampling, then x/255 and 2x - 1 in float32: the same arithmetic gives the same latents.
    """
    return 2.0 * image_to_unit_range(image, width, height) - 1.0


def mask_to_model_input(mask: Image.Image, width: int, height: int) -> torch.Tensor:
    """Mask image -> (1, 1, height, width) of 0 (keep) and 1 (repaint), as diffusers' mask processor makes it.

    Resized (Lanczos) in the mask's own mode, then converted to grayscale, then binarised at 0.5: grey
    levels of 128 and above repaint.
    """
    gray = mask.resize((width, height), Image.Resampling.LANCZOS).convert("L")
    array = np.array(gray).astype(np.float32) / 255.0
    return (torch.from_numpy(array)[None, None] >= 0.5).float()


def make_grid(images: list[Image.Image], columns: int) -> Image.Image:
    """Paste equally sized images into a grid, row by row."""
    w, h = images[0].size
    rows = -(-len(images) // columns)
    grid = Image.new("RGB", (columns * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image, ((i % columns) * w, (i // columns) * h))
    return grid
