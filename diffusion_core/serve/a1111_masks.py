"""AUTOMATIC1111's inpainting mask preparation: invert, Gaussian mask blur, "fill" for masked content.

stable-diffusion-webui v1.10, modules/processing.py (StableDiffusionProcessingImg2Img.init) and
modules/masking.py (fill). The blur is OpenCV's 8-bit GaussianBlur redone in numpy, bit for bit.
"""

from __future__ import annotations

import math
from numbers import Integral
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageFilter, ImageOps

# A1111's `inpainting_fill` ("Masked content") values; 2 "latent noise" and 3 "latent nothing" act on
# the latent, not on the image, and are not supported here.
INPAINTING_FILL = {0: "fill", 1: "original"}

# OpenCV's 8-bit GaussianBlur holds kernel taps and row sums as Q8 fixed point (ufixedpoint16).
_Q8 = 1 << 8

# masking.fill: blur radii and how often each blurred layer is composited, coarse to fine.
_FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))

# opts.img2img_background_color's default: what A1111 puts behind a transparent init image.
_BACKGROUND = "#ffffff"


def a1111_kernel_size(blur: int) -> int:
    """The Gaussian kernel length A1111 gives cv2.GaussianBlur for a mask blur σ (processing.py)."""
    return 2 * int(2.5 * blur + 0.5) + 1


def gaussian_kernel(ksize: int, sigma: float) -> np.ndarray:
    """cv2.getGaussianKernel(ksize, sigma): k_i ∝ exp(-d_i²/2σ²), normalised in OpenCV's order.

    OpenCV smooth.dispatch.cpp getGaussianKernelBitExact (sigma > 0). OpenCV's softfloat exp and
    math.exp differ in the last bits, so taps agree to a few ulp; their Q8 roundings (below) agree.
    """
    # x = 2·d runs over the left half; exp(x²·(-1/8σ²)) = exp(-d²/2σ²), as OpenCV writes it.
    scale = -0.125 / (sigma * sigma)
    half = [math.exp(float(x * x) * scale) for x in range(1 - ksize, 0, 2)]
    total = 0.0
    for value in half:  # summed left to right, as OpenCV does, so the rounding agrees
        total += value
    inv = 1.0 / (total * 2.0 + 1.0)
    left = [value * inv for value in half]
    return np.array(left + [inv] + left[::-1])


def quantize_q8(kernel: np.ndarray) -> np.ndarray:
    """A symmetric float kernel as the Q8 integer taps (summing to 256) cv2 uses for 8-bit images.

    OpenCV smooth.dispatch.cpp getGaussianKernelFixedPoint_ED: error diffusion along the left half,
    mirrored, the centre tap taking whatever keeps the sum at exactly 256.
    """
    n = len(kernel)
    left, err = [], 0.0
    for k in kernel[: n // 2]:
        adjusted = float(k) * _Q8 + err
        tap = round(adjusted)  # cvRound: nearest, ties to even, like Python's round
        err = adjusted - tap
        left.append(tap)
    centre = _Q8 - 2 * sum(left)
    return np.array(left + [centre] + left[::-1], dtype=np.int64)


def gaussian_kernel_q8(ksize: int, sigma: float) -> np.ndarray:
    """The Q8 taps cv2.GaussianBlur filters an 8-bit image with (smooth.dispatch.cpp getGaussianKernel<FT>)."""
    return quantize_q8(gaussian_kernel(ksize, sigma))


def _reflect_101(index: np.ndarray, n: int) -> np.ndarray:
    """cv2.BORDER_REFLECT_101 (…dcb|abcd|cba…), folded as often as needed when the kernel outruns the image."""
    if n == 1:
        return np.zeros_like(index)
    period = 2 * (n - 1)
    index = np.mod(index, period)
    return np.where(index < n, index, period - index)


def _blur_rows(a: np.ndarray, blur: int) -> np.ndarray:
    """Each row of an 8-bit array convolved with A1111's Q8 taps, folded at its ends (BORDER_REFLECT_101).

    A convolution, not a matrix: memory stays that of the image whatever its width. float32 holds the taps,
    the pixels and every partial sum exactly (all integers < 2²⁴), so the order of the sum cannot matter.
    """
    taps = gaussian_kernel_q8(a1111_kernel_size(blur), blur)
    r, n = len(taps) // 2, a.shape[1]
    padded = torch.from_numpy(a[:, _reflect_101(np.arange(-r, n + r), n)].astype(np.float32))
    acc = F.conv1d(padded[:, None], torch.from_numpy(taps.astype(np.float32))[None, None])[:, 0]
    return _to_uint8(acc.numpy())


def _to_uint8(acc: np.ndarray) -> np.ndarray:
    """OpenCV's rounding of a Q8 row sum to 8 bits.

    The other axis's kernel is the single tap 1.0 (raw 256), so cv2's Q16 result (acc·256 + 2¹⁵) >> 16
    is (acc + 128) >> 8; acc ≤ 255·256, so it never saturates.
    """
    return ((acc.astype(np.int64) + _Q8 // 2) >> 8).astype(np.uint8)


def blur_mask(mask: Image.Image, blur_x: int, blur_y: int) -> Image.Image:
    """A1111's mask blur: cv2.GaussianBlur with (2·int(2.5σ+0.5)+1, 1) and σ = blur_x, then (1, …) with blur_y.

    processing.py StableDiffusionProcessingImg2Img.init. Bit-exact with cv2 on 8-bit masks (cv2's
    fixed-point path); blur 0 leaves that axis alone.

    Args:
        mask: the mask; converted to "L" (white = inpaint), as A1111's is by then.
        blur_x: σ of the horizontal blur in pixels, an integer >= 0 (A1111 `mask_blur_x`).
        blur_y: σ of the vertical blur in pixels, an integer >= 0 (A1111 `mask_blur_y`).
    """
    _check_blur("mask_blur_x", blur_x)
    _check_blur("mask_blur_y", blur_y)
    a = np.array(mask.convert("L"))
    # Two separate cv2 calls in A1111, so the horizontal result is rounded to uint8 before the vertical.
    if blur_x > 0:
        a = _blur_rows(a, int(blur_x))
    if blur_y > 0:
        a = np.ascontiguousarray(_blur_rows(a.T, int(blur_y)).T)
    return Image.fromarray(a)


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's "fill" masked content: the masked area painted with ever finer blurs of the unmasked colours.

    masking.py fill; PIL only, so it equals A1111's pixel for pixel under the same Pillow.
    """
    width, height = image.size
    # The unmasked image with alpha = 255 - mask, premultiplied ("RGBa") so blurring averages colours
    # by coverage and the masked area does not pull everything towards black.
    visible = Image.new("RGBa", (width, height))
    visible.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert("L")))
    visible = visible.convert("RGBa")
    result = Image.new("RGBA", (width, height))
    # Wide blurs reach deep into the hole; each finer layer composited on top restores detail near
    # its edge; radius 0 puts the unmasked pixels back as they were.
    for radius, repeats in _FILL_PASSES:
        layer = visible.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(repeats):
            result.alpha_composite(layer)
    return result.convert("RGB")


class InpaintingInputs(NamedTuple):
    image: Image.Image     # what the VAE encodes: the init image at the output size, filled under the mask
    mask: Image.Image      # A1111's latent_mask: the blurred "L" mask at the output size
    original: Image.Image  # the init image at the output size, unfilled: pasted back by paste_original


def prepare_inpainting(image: Image.Image, mask: Image.Image, mask_blur_x: int = 4, mask_blur_y: int = 4,
                       inpainting_fill: int = 0, invert: int = 0,
                       size: tuple[int, int] | None = None) -> InpaintingInputs:
    """The init image and mask as A1111's img2img hands them on to the VAE and the latent mask.

    processing.py StableDiffusionProcessingImg2Img.init, "Whole picture" and resize mode 0: binarise the mask,
    invert it, blur it at its own size; resize mask and image to `size` (width, height; default: the image's)
    with Lanczos; fill the image under the blurred mask.

    Args:
        image: the init image; transparency is flattened onto white (A1111's default background).
        mask: the mask, white = inpaint; an RGBA mask with transparency is its alpha thresholded at 128.
        mask_blur_x: horizontal blur σ, an integer >= 0 (A1111 `mask_blur_x`, or `mask_blur`).
        mask_blur_y: vertical blur σ, an integer >= 0 (A1111 `mask_blur_y`, or `mask_blur`).
        inpainting_fill: 0 "fill" (image filled under the mask) or 1 "original" (image unchanged).
        invert: 1 inpaints what the mask leaves black (A1111 `inpainting_mask_invert`), else 0.
        size: the output's (width, height).
    """
    _check_blur("mask_blur_x", mask_blur_x)
    _check_blur("mask_blur_y", mask_blur_y)
    if isinstance(inpainting_fill, bool) or inpainting_fill not in (2, 3, *INPAINTING_FILL):
        raise ValueError(f"inpainting_fill must be 0 (fill) or 1 (original), got {inpainting_fill!r}")
    if inpainting_fill in (2, 3):
        name = "latent noise" if inpainting_fill == 2 else "latent nothing"
        raise ValueError(
            f"inpainting_fill {inpainting_fill} ({name}) is not supported; supported: 0 (fill), 1 (original)"
        )
    if isinstance(invert, bool) or invert not in (0, 1):
        raise ValueError(f"inpainting_mask_invert must be 0 or 1, got {invert!r}")
    size = size or image.size

    mask = _binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, mask_blur_x, mask_blur_y).resize(size, Image.Resampling.LANCZOS)  # resize_image(0, ...)
    original = _flatten(image).resize(size, Image.Resampling.LANCZOS)
    # A1111 fills under the blurred mask (latent_mask), not the sharp one.
    filled = fill(original, mask) if inpainting_fill == 0 else original
    return InpaintingInputs(filled, mask, original)


def paste_original(generated: Image.Image, original: Image.Image, mask: Image.Image) -> Image.Image:
    """A1111's overlay after inpainting (opts.overlay_inpaint, on by default): the original image composited
    over the generated one with alpha 255 - mask_for_overlay, where mask_for_overlay = clip(2·mask): outside a
    sharpened copy of the blurred mask, the result is the original pixel for pixel.

    processing.py: mask_for_overlay in StableDiffusionProcessingImg2Img.init, apply_overlay after decoding.
    """
    sharpened = np.clip(np.asarray(mask.convert("L"), dtype=np.float32) * 2, 0, 255).astype(np.uint8)
    overlay = Image.new("RGBa", original.size)
    overlay.paste(original.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(Image.fromarray(sharpened)))
    result = generated.convert("RGBA")
    result.alpha_composite(overlay.convert("RGBA"))
    return result.convert("RGB")


def _binary_mask(mask: Image.Image) -> Image.Image:
    """A1111's create_binary_mask (mask_round on): a transparent RGBA mask means its alpha, cut at 128."""
    if mask.mode == "RGBA" and mask.getextrema()[-1] != (255, 255):
        return mask.getchannel("A").point(lambda a: 255 if a > 128 else 0)
    return mask.convert("L")


def _flatten(image: Image.Image) -> Image.Image:
    """A1111's images.flatten: transparency replaced by the background colour, as RGB."""
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, _BACKGROUND)
        background.paste(image, mask=image)
        image = background
    return image.convert("RGB")


def _check_blur(field: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral) or value < 0:
        raise ValueError(f"{field} must be an integer >= 0, got {value!r}")
