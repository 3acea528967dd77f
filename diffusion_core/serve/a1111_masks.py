"""AUTOMATIC1111's inpainting mask preparation: invert, Gaussian mask blur, "fill" for masked content.

stable-diffusion-webui v1.10, modules/processing.py (StableDiffusionProcessingImg2Img.init) and
modules/masking.py (fill). The blur is OpenCV's 8-bit GaussianBlur redone in numpy, bit for bit.
"""

from __future__ import annotations

import math
from numbers import Integral

import numpy as np
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


def _blur_matrix(n: int, blur: int) -> np.ndarray:
    """A1111's 1-D blur of length n as a matrix of Q8 taps: row i holds the kernel centred on i.

    Taps that fall off the ends are folded back in (BORDER_REFLECT_101), so W[i, j] sums every tap
    that lands on pixel j; float32 holds these and the products below exactly (all integers < 2²⁴).
    """
    taps = gaussian_kernel_q8(a1111_kernel_size(blur), blur)
    r = len(taps) // 2
    rows = np.repeat(np.arange(n), len(taps))
    cols = _reflect_101(np.arange(n)[:, None] + np.arange(-r, r + 1), n).ravel()
    w = np.zeros((n, n), dtype=np.float32)
    np.add.at(w, (rows, cols), np.tile(taps, n).astype(np.float32))
    return w


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
        a = _to_uint8(a.astype(np.float32) @ _blur_matrix(a.shape[1], int(blur_x)).T)
    if blur_y > 0:
        a = _to_uint8(_blur_matrix(a.shape[0], int(blur_y)) @ a.astype(np.float32))
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


def prepare_inpainting(
    image: Image.Image,
    mask: Image.Image,
    mask_blur_x: int = 4,
    mask_blur_y: int = 4,
    inpainting_fill: int = 0,
    invert: int = 0,
) -> tuple[Image.Image, Image.Image]:
    """The init image and mask as A1111's img2img hands them on to the VAE and the latent mask.

    processing.py StableDiffusionProcessingImg2Img.init ("Whole picture", image and mask already at
    the processing size): binarise the mask, invert it, blur it, fill the image under the blurred mask.

    Args:
        image: the init image; transparency is flattened onto white (A1111's default background).
        mask: the mask, white = inpaint; an RGBA mask with transparency is its alpha thresholded at 128.
        mask_blur_x: horizontal blur σ, an integer >= 0 (A1111 `mask_blur_x`, or `mask_blur`).
        mask_blur_y: vertical blur σ, an integer >= 0 (A1111 `mask_blur_y`, or `mask_blur`).
        inpainting_fill: 0 "fill" (image filled under the mask) or 1 "original" (image unchanged).
        invert: 1 inpaints what the mask leaves black (A1111 `inpainting_mask_invert`), else 0.

    Returns:
        (image, mask): the RGB image for the VAE, and the blurred "L" mask (A1111's latent_mask).
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
    if image.size != mask.size:
        raise ValueError(f"mask size {mask.size} differs from image size {image.size}")

    mask = _binary_mask(mask)
    if invert:
        mask = ImageOps.invert(mask)
    mask = blur_mask(mask, mask_blur_x, mask_blur_y)
    image = _flatten(image)
    if inpainting_fill == 0:
        # A1111 fills under the blurred mask (latent_mask), not the sharp one.
        image = fill(image, mask)
    return image, mask


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
