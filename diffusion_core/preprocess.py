"""The weight-free control images of ControlNet 1.1: Canny edges, the inpaint condition, content shuffle.

Each equals the reference its ControlNet was trained with: `canny` is `cv2.Canny` pixel for pixel,
`inpaint_condition` is diffusers' documented `make_inpaint_condition`, `shuffle` is lllyasviel's
`ContentShuffleDetector` (ControlNet-v1-1-nightly, annotator/shuffle) with its noise drawn from a torch
generator instead of numpy's global one; fed the same noise it matches the cv2 original to one grey level
(on about 0.01% of the values: cv2's bicubic weights are float32), and its remap is cv2.remap's exactly.

Not here, because they are networks with weights of their own: depth (MiDaS, Zoe), pose (OpenPose,
DWPose), soft edges (HED, PiDiNet), lineart and anime lineart, normals (NormalBAE), segmentation
(UniFormer, OneFormer) and straight lines (M-LSD). Make those maps with their own packages
(controlnet_aux) and pass the image. The scribble and ip2p models take a drawing or the photo itself.

The tile model needs no preprocessor either: lllyasviel's gradio_tile.py offers "None" as its only one
and feeds a blurred copy of the image itself (area-downsampled by 8, then three pyrUp), and diffusers'
docs pass the resized image unchanged. Pass the image.
"""
from __future__ import annotations

import math
import numbers

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# OpenCV's fixed-point tan(22.5°): round(tan(π/8) · 2¹⁵), the edge of the horizontal gradient sector.
TG22 = 13573
# cv2.remap's bilinear interpolation rounds coordinates to a 1/32-pixel grid (INTER_TAB_SIZE).
REMAP_SUBPIXELS = 32


def _check_image(image: object, name: str, modes: tuple[str, ...] | None = None) -> None:
    """Raise a ValueError unless `image` is a PIL image (of one of `modes`, when given)."""
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}")
    if modes is not None and image.mode not in modes:
        raise ValueError(f"{name} must have mode {' or '.join(repr(m) for m in modes)}, got {image.mode!r}; "
                         f"convert it first, e.g. {name}.convert('RGB')")


def _check_threshold(value: object, name: str) -> None:
    """Raise a ValueError unless `value` is a finite real number >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


# --- Canny --------------------------------------------------------------------------------------


def sobel_3x3(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's 3x3 Sobel derivatives (dx, dy) of an (H, W[, C]) uint8 array, as int32, border replicated.

    dx = [1 2 1]ᵀ ⊗ [-1 0 1] (right minus left), dy = its transpose (below minus above); cv2.Canny pads
    with BORDER_REPLICATE, so an edge pixel is its own outside neighbour.
    """
    p = image.astype(np.int32)
    pad = ((1, 1), (1, 1)) + ((0, 0),) * (p.ndim - 2)
    p = np.pad(p, pad, mode="edge")
    horizontal = p[:, 2:] - p[:, :-2]                     # (H+2, W[, C]) central difference in x
    dx = horizontal[:-2] + 2 * horizontal[1:-1] + horizontal[2:]
    vertical = p[2:] - p[:-2]                             # (H, W+2[, C]) central difference in y
    dy = vertical[:, :-2] + 2 * vertical[:, 1:-1] + vertical[:, 2:]
    return dx, dy


def strongest_channel(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per pixel, the (dx, dy, magnitude) of the channel with the largest magnitude; the first one on ties."""
    best = magnitude.argmax(axis=-1)[..., None]
    return tuple(np.take_along_axis(a, best, axis=-1)[..., 0] for a in (dx, dy, magnitude))


def non_maximum_suppression(dx: np.ndarray, dy: np.ndarray, magnitude: np.ndarray) -> np.ndarray:
    """Pixels whose magnitude is a local maximum across the edge, with OpenCV's sectors and comparisons.

    The gradient direction falls in one of three sectors, tested in fixed point: horizontal when
    |dy| < tan(22.5°)·|dx|, vertical when |dy| > tan(67.5°)·|dx| (= tan(22.5°)·|dx| + 2|dx|), diagonal
    otherwise. A maximum must beat the neighbour before it strictly and the one after it at least
    equally (both strictly on diagonals), which keeps exactly one pixel of a two-pixel-wide plateau.
    Outside the image the magnitude is 0.
    """
    x = np.abs(dx).astype(np.int64)
    y = np.abs(dy).astype(np.int64) << 15
    tg22x = x * TG22
    horizontal = y < tg22x
    vertical = ~horizontal & (y > tg22x + (x << 16))
    diagonal = ~horizontal & ~vertical
    same_sign = (dx ^ dy) >= 0                            # gradient along the main diagonal (↘ in image rows)

    m = magnitude
    p = np.pad(m, 1)                                      # (H+2, W+2), zero outside the image
    left, right = p[1:-1, :-2], p[1:-1, 2:]
    up, down = p[:-2, 1:-1], p[2:, 1:-1]
    up_left, up_right = p[:-2, :-2], p[:-2, 2:]
    down_left, down_right = p[2:, :-2], p[2:, 2:]
    diagonal_before = np.where(same_sign, up_left, up_right)
    diagonal_after = np.where(same_sign, down_right, down_left)
    return ((horizontal & (m > left) & (m >= right))
            | (vertical & (m > up) & (m >= down))
            | (diagonal & (m > diagonal_before) & (m > diagonal_after)))


def hysteresis(strong: np.ndarray, weak: np.ndarray) -> np.ndarray:
    """Strong pixels plus the weak ones 8-connected to them through weak pixels (edge tracking).

    OpenCV walks a stack depth first; the set reached is the same, so this walks it breadth first, one
    ring of neighbours per step for the whole frontier at once.
    """
    height, width = weak.shape
    step = width + 2
    unvisited = np.pad(weak & ~strong, 1).ravel()         # the False frame stops the walk at the border
    edges = np.pad(strong, 1).ravel()
    neighbours = np.array([-step - 1, -step, -step + 1, -1, 1, step - 1, step, step + 1])
    frontier = np.flatnonzero(edges)
    while frontier.size:
        reached = (frontier[:, None] + neighbours).ravel()
        frontier = np.unique(reached[unvisited[reached]])
        unvisited[frontier] = False
        edges[frontier] = True
    return edges.reshape(height + 2, step)[1:-1, 1:-1]


def canny(image: Image.Image, low: float = 100, high: float = 200) -> Image.Image:
    """Canny edges, equal pixel for pixel to `cv2.Canny(np.asarray(image), low, high)` (aperture 3, L1).

    Sobel gradients, L1 magnitude |dx| + |dy| (the strongest channel of an RGB image), non-maximum
    suppression, then hysteresis: a maximum above `high` is an edge, one above `low` is an edge when
    8-connected to an edge. As in OpenCV the thresholds are swapped when low > high and floored.

    Args:
        image: a PIL image of mode "L" or "RGB".
        low: the weak threshold, a number >= 0.
        high: the strong threshold, a number >= 0.

    Returns:
        A mode "L" image of the same size, 255 on edges and 0 elsewhere.
    """
    _check_image(image, "image", ("L", "RGB"))
    _check_threshold(low, "low")
    _check_threshold(high, "high")
    low, high = sorted((math.floor(low), math.floor(high)))

    dx, dy = sobel_3x3(np.asarray(image))
    magnitude = np.abs(dx) + np.abs(dy)
    if magnitude.ndim == 3:
        dx, dy, magnitude = strongest_channel(dx, dy, magnitude)
    maxima = non_maximum_suppression(dx, dy, magnitude)
    edges = hysteresis(maxima & (magnitude > high), maxima & (magnitude > low))
    return Image.fromarray(edges.astype(np.uint8) * 255)


# --- Inpaint ------------------------------------------------------------------------------------


def inpaint_condition(image: Image.Image, mask: Image.Image) -> torch.Tensor:
    """ControlNet 1.1 inpaint's control image: RGB in [0, 1] with the masked pixels set to -1.

    diffusers' documented `make_inpaint_condition`: image.convert("RGB") / 255, mask.convert("L") / 255,
    and every pixel where the mask is > 0.5 (grey level 128 and above) becomes -1 in all channels.

    Args:
        image: the image to inpaint, any PIL mode.
        mask: white (> 0.5) where to repaint, the same size as `image`, any PIL mode.

    Returns:
        A (1, 3, H, W) float32 tensor.
    """
    _check_image(image, "image")
    _check_image(mask, "mask")
    if image.size != mask.size:
        raise ValueError(f"image and mask must have the same size, got {image.size} and {mask.size} (width, height)")
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    masked = np.asarray(mask.convert("L"), dtype=np.float32) / 255.0 > 0.5
    rgb = np.where(masked[..., None], np.float32(-1.0), rgb)
    return torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0).contiguous()  # (1, 3, H, W)


# --- Content shuffle ----------------------------------------------------------------------------


def noise_disk(coarse: torch.Tensor, height: int, width: int, f: int) -> torch.Tensor:
    """lllyasviel's `make_noise_disk`: a smooth random field in [0, 1] of shape (height, width).

    Uniform noise on a coarse (height//f + 2, width//f + 2) grid is upsampled bicubically (a = -0.75, pixel
    centres aligned, borders replicated: cv2's INTER_CUBIC) to (height + 2f, width + 2f), cropped by f on
    every side and min-max normalised.
    """
    big = F.interpolate(coarse[None, None], size=(height + 2 * f, width + 2 * f), mode="bicubic",
                        align_corners=False)[0, 0]
    disk = big[f:f + height, f:f + width]
    disk = disk - disk.min()
    return disk / disk.max() if disk.max() > 0 else disk  # a 1x1 image has a constant field: no flow


def remap_bilinear(image: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """out[:, i, j] = image at pixel coordinates (x[i, j], y[i, j]), bilinear: cv2.remap(INTER_LINEAR) on uint8.

    cv2 works in fixed point: a coordinate is rounded (half to even) to 1/32 pixel, the four weights are
    products of 1/32 fractions, i.e. multiples of 1/1024, and the weighted sum is rounded half up. Doing
    the same in integers gives its result exactly. image is (C, H, W) uint8 with pixel k's centre at
    coordinate k; x, y are (h, w) float32 within [0, W-1] and [0, H-1].
    """
    height, width = image.shape[-2:]
    ix = torch.round(x * REMAP_SUBPIXELS).long()
    iy = torch.round(y * REMAP_SUBPIXELS).long()
    x0, ax = ix // REMAP_SUBPIXELS, ix % REMAP_SUBPIXELS
    y0, ay = iy // REMAP_SUBPIXELS, iy % REMAP_SUBPIXELS
    # at the last row or column the neighbour beyond has weight 0, so clamping it changes nothing
    x1, y1 = (x0 + 1).clamp(max=width - 1), (y0 + 1).clamp(max=height - 1)
    p = image.long()
    s = REMAP_SUBPIXELS
    total = ((s - ax) * (s - ay) * p[:, y0, x0] + ax * (s - ay) * p[:, y0, x1]
             + (s - ax) * ay * p[:, y1, x0] + ax * ay * p[:, y1, x1])
    return ((total + s * s // 2) // (s * s)).to(torch.uint8)


def shuffle(image: Image.Image, seed: int = 0, f: int = 256) -> Image.Image:
    """ControlNet 1.1 content shuffle: the image warped through a random smooth flow field.

    ContentShuffleDetector: x = noise_disk · (W-1), y = noise_disk · (H-1), drawn in that order, then
    out[i, j] = image[y[i, j], x[i, j]] with bilinear interpolation. The coarse noise is uniform [0, 1)
    float64 from a torch.Generator seeded with `seed`, so the same seed gives the same shuffle.

    Args:
        image: a PIL image of mode "L" or "RGB".
        seed: seeds the noise.
        f: the flow's grain in pixels (256 in ControlNet 1.1); larger is smoother.

    Returns:
        A mode "RGB" image of the same size (grey images come back with three equal channels).
    """
    _check_image(image, "image", ("L", "RGB"))
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    if isinstance(f, bool) or not isinstance(f, numbers.Integral) or f < 1:
        raise ValueError(f"f must be an integer >= 1, got {f!r}")
    width, height = image.size
    generator = torch.Generator().manual_seed(int(seed))
    coarse = [torch.rand(height // f + 2, width // f + 2, generator=generator, dtype=torch.float64)
              for _ in range(2)]
    x = noise_disk(coarse[0], height, width, f) * (width - 1)
    y = noise_disk(coarse[1], height, width, f) * (height - 1)
    # the reference stores the flow as float32 before remapping
    x, y = x.float(), y.float()

    rgb = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)  # (3, H, W)
    out = remap_bilinear(rgb, x, y)
    return Image.fromarray(out.permute(1, 2, 0).numpy())
