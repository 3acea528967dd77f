"""AUTOMATIC1111's inpainting mask preparation equals A1111's own code: the mask blur equals cv2.GaussianBlur
with A1111's kernel-size rule, bit for bit; fill equals masking.fill copied verbatim below."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter, ImageOps

from diffusion_core.serve.a1111_masks import (
    a1111_kernel_size,
    blur_mask,
    fill,
    gaussian_kernel,
    gaussian_kernel_q8,
    paste_original,
    prepare_inpainting,
    quantize_q8,
)

SIZES = [(1, 1), (1, 7), (7, 1), (2, 3), (37, 53), (64, 64), (300, 5)]  # (width, height)
BLURS = [1, 4, 8, 16, 64]  # 64: a 321-tap kernel, longer than every image here


# ---- references: A1111 v1.10 code, verbatim apart from names -------------------------------------------

def a1111_blur(np_mask: np.ndarray, mask_blur_x: int, mask_blur_y: int) -> np.ndarray:
    """modules/processing.py StableDiffusionProcessingImg2Img.init, the mask blur."""
    if mask_blur_x > 0:
        kernel_size = 2 * int(2.5 * mask_blur_x + 0.5) + 1
        np_mask = cv2.GaussianBlur(np_mask, (kernel_size, 1), mask_blur_x)
    if mask_blur_y > 0:
        kernel_size = 2 * int(2.5 * mask_blur_y + 0.5) + 1
        np_mask = cv2.GaussianBlur(np_mask, (1, kernel_size), mask_blur_y)
    return np_mask


def a1111_fill(image, mask):
    """modules/masking.py fill."""
    image_mod = Image.new('RGBA', (image.width, image.height))

    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask.convert('L')))

    image_masked = image_masked.convert('RGBa')

    for radius, repeats in [(256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1)]:
        blurred = image_masked.filter(ImageFilter.GaussianBlur(radius)).convert('RGBA')
        for _ in range(repeats):
            image_mod.alpha_composite(blurred)

    return image_mod.convert("RGB")


def a1111_create_binary_mask(image):
    """modules/processing.py create_binary_mask (round=True, the default mask_round)."""
    if image.mode == 'RGBA' and image.getextrema()[-1] != (255, 255):
        image = image.split()[-1].convert("L").point(lambda x: 255 if x > 128 else 0)
    else:
        image = image.convert('L')
    return image


def a1111_prepare(image, mask, mask_blur_x, mask_blur_y, inpainting_fill, inpainting_mask_invert, size=None):
    """StableDiffusionProcessingImg2Img.init's path from the request's image and mask to the image the VAE
    encodes, latent_mask and the overlay's source ("Whole picture", resize mode 0 to `size`); and
    mask_for_overlay."""
    width, height = size or image.size
    image_mask = a1111_create_binary_mask(mask)
    if inpainting_mask_invert:
        image_mask = ImageOps.invert(image_mask)
    image_mask = Image.fromarray(a1111_blur(np.array(image_mask), mask_blur_x, mask_blur_y))
    image_mask = image_mask.resize((width, height), resample=Image.LANCZOS)  # images.resize_image(0, ...)
    np_mask = np.array(image_mask)
    np_mask = np.clip((np_mask.astype(np.float32)) * 2, 0, 255).astype(np.uint8)
    mask_for_overlay = Image.fromarray(np_mask)
    latent_mask = image_mask
    if image.mode == "RGBA":  # images.flatten(img, opts.img2img_background_color="#ffffff")
        background = Image.new('RGBA', image.size, "#ffffff")
        background.paste(image, mask=image)
        image = background
    image = image.convert('RGB').resize((width, height), resample=Image.LANCZOS)
    image_masked = Image.new('RGBa', (image.width, image.height))
    image_masked.paste(image.convert("RGBA").convert("RGBa"), mask=ImageOps.invert(mask_for_overlay.convert('L')))
    overlay = image_masked.convert('RGBA')
    original = image
    if inpainting_fill != 1:
        image = a1111_fill(image, latent_mask)
    return (image, latent_mask, original), overlay


def a1111_apply_overlay(image, overlay):
    """modules/processing.py apply_overlay (paste_loc None: "Whole picture")."""
    image = image.convert('RGBA')
    image.alpha_composite(overlay)
    return image.convert('RGB')


# ---- test inputs -----------------------------------------------------------------------------------------

def masks(width: int, height: int, seed: int) -> dict[str, np.ndarray]:
    """Uniform noise, sparse binary noise, a hard-edged rectangle and ellipse, and a one-pixel dot."""
    rng = np.random.default_rng(seed)
    shapes = Image.new("L", (width, height))
    draw = ImageDraw.Draw(shapes)
    draw.rectangle((width // 4, height // 3, width // 2, 2 * height // 3), fill=255)
    draw.ellipse((width // 2, height // 4, width - 1, height - 1), fill=200)
    dot = np.zeros((height, width), np.uint8)
    dot[height // 2, width // 2] = 255
    return {
        "noise": rng.integers(0, 256, (height, width), dtype=np.uint8),
        "binary": np.where(rng.random((height, width)) < 0.2, 255, 0).astype(np.uint8),
        "shapes": np.asarray(shapes),
        "dot": dot,
    }


def photo(width: int, height: int, seed: int) -> Image.Image:
    """An RGB image with smooth ramps, noise and a few hard edges."""
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    rgb = np.stack([xx * 255 // max(width - 1, 1), yy * 255 // max(height - 1, 1), (xx ^ yy) & 255], -1)
    rgb = (rgb + rng.integers(-20, 21, rgb.shape)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def brush_mask(width: int, height: int, seed: int) -> Image.Image:
    """A hand-drawn-looking inpainting mask: a few thick white strokes on black."""
    rng = np.random.default_rng(seed)
    mask = Image.new("L", (width, height))
    draw = ImageDraw.Draw(mask)
    for _ in range(3):
        points = [tuple(p) for p in rng.integers(0, (width, height), (4, 2)).tolist()]
        draw.line(points, fill=255, width=max(1, min(width, height) // 8))
    return mask


# ---- the blur --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("blur", BLURS)
def test_blur_mask_equals_cv2(size, blur):
    width, height = size
    for kind, mask in masks(width, height, seed=blur).items():
        for blur_x, blur_y in [(blur, 0), (0, blur), (blur, blur), (blur, 3)]:
            expected = a1111_blur(mask.copy(), blur_x, blur_y)
            actual = np.asarray(blur_mask(Image.fromarray(mask), blur_x, blur_y))
            np.testing.assert_array_equal(actual, expected, err_msg=f"{kind} {size} x={blur_x} y={blur_y}")


def test_blur_mask_equals_cv2_at_request_size():
    """A default request's 512 × 768 brush mask, and the UI's largest blur, 64."""
    mask = np.asarray(brush_mask(512, 768, seed=0))
    for blur_x, blur_y in [(4, 4), (64, 64), (0, 7), (11, 0)]:
        np.testing.assert_array_equal(np.asarray(blur_mask(Image.fromarray(mask), blur_x, blur_y)),
                                      a1111_blur(mask.copy(), blur_x, blur_y))


def test_blur_zero_is_identity_and_result_is_l():
    mask = Image.fromarray(masks(37, 53, seed=0)["noise"])
    out = blur_mask(mask, 0, 0)
    assert out.mode == "L"
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mask))


def test_kernel_taps_equal_opencv():
    """A1111's kernel-size rule, and the Q8 taps cv2 filters 8-bit images with, for every blur up to 256.

    The float kernels agree with cv2.getGaussianKernel to a few ulp (OpenCV's softfloat exp against libm's);
    the Q8 taps, rounded from cv2's own float kernel by the same error diffusion, agree exactly."""
    assert [a1111_kernel_size(b) for b in (1, 4, 8, 16, 64)] == [7, 21, 41, 81, 321]
    for sigma in range(1, 257):
        ksize = a1111_kernel_size(sigma)
        reference = cv2.getGaussianKernel(ksize, sigma, ktype=cv2.CV_64F)[:, 0]
        np.testing.assert_allclose(gaussian_kernel(ksize, sigma), reference, rtol=1e-14, atol=0)
        taps = gaussian_kernel_q8(ksize, sigma)
        np.testing.assert_array_equal(taps, quantize_q8(reference), err_msg=f"sigma {sigma}")
        assert taps.sum() == 256 and (taps >= 0).all() and (taps == taps[::-1]).all()


def test_kernel_taps_are_what_cv2_blurs_with():
    """A 255 impulse through cv2.GaussianBlur comes out as (255·tap + 128) >> 8: the taps themselves."""
    for sigma in (1, 4, 16):
        taps = gaussian_kernel_q8(a1111_kernel_size(sigma), sigma)
        row = np.zeros((2, 3 * len(taps)), np.uint8)
        row[:, len(row[0]) // 2] = 255
        out = cv2.GaussianBlur(row, (len(taps), 1), sigma)[0]
        centre, r = len(row[0]) // 2, len(taps) // 2
        np.testing.assert_array_equal(out[centre - r:centre + r + 1], (255 * taps + 128) >> 8)


# ---- fill ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(1, 1), (7, 5), (64, 64), (96, 160)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_fill_equals_a1111(size):
    width, height = size
    image = photo(width, height, seed=1)
    sharp = brush_mask(width, height, seed=2)
    for mask in (sharp, blur_mask(sharp, 4, 4), Image.fromarray(masks(width, height, seed=3)["noise"])):
        expected = a1111_fill(image, mask)
        actual = fill(image, mask)
        assert actual.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(actual), np.asarray(expected))


def test_fill_inputs_of_other_modes_equal_a1111():
    image = photo(48, 40, seed=4).convert("RGBA")
    mask = brush_mask(48, 40, seed=5).convert("RGB")
    np.testing.assert_array_equal(np.asarray(fill(image, mask)), np.asarray(a1111_fill(image, mask)))


def test_fill_keeps_unmasked_and_ignores_masked():
    """Where the mask is 0 the image survives; what lies under 255 has no say in the result."""
    image = photo(64, 64, seed=6)
    mask = Image.new("L", (64, 64))
    ImageDraw.Draw(mask).rectangle((16, 16, 47, 47), fill=255)
    m = np.asarray(mask) > 0
    scribbled = np.asarray(image).copy()
    scribbled[m] = np.random.default_rng(7).integers(0, 256, scribbled[m].shape, dtype=np.uint8)
    filled = np.asarray(fill(image, mask))
    np.testing.assert_array_equal(filled[~m], np.asarray(image)[~m])
    np.testing.assert_array_equal(np.asarray(fill(Image.fromarray(scribbled), mask)), filled)


# ---- prepare_inpainting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("inpainting_fill", [0, 1])
@pytest.mark.parametrize("invert", [0, 1])
@pytest.mark.parametrize("blur", [(4, 4), (0, 0), (8, 2), (0, 16)])
def test_prepare_inpainting_equals_a1111(inpainting_fill, invert, blur):
    image, mask = photo(80, 56, seed=7), brush_mask(80, 56, seed=8)
    expected, _ = a1111_prepare(image, mask, *blur, inpainting_fill, invert)
    actual = prepare_inpainting(image, mask, *blur, inpainting_fill, invert)
    for a, e in zip(actual, expected):
        assert a.mode == e.mode and a.size == e.size
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_prepare_inpainting_defaults_are_a1111s():
    """A request that leaves mask_blur, inpainting_fill and inpainting_mask_invert out: blur 4, fill, no invert."""
    image, mask = photo(64, 48, seed=9), brush_mask(64, 48, seed=10)
    for a, e in zip(prepare_inpainting(image, mask), a1111_prepare(image, mask, 4, 4, 0, 0)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_invert_swaps_what_is_inpainted():
    image, mask = photo(40, 40, seed=11), brush_mask(40, 40, seed=12)
    _, inverted, _ = prepare_inpainting(image, mask, 0, 0, 1, invert=1)
    np.testing.assert_array_equal(np.asarray(inverted), 255 - np.asarray(mask))
    # Inverting, then blurring, is A1111's order: the blur of the inverted mask, which is 255 - the blur.
    _, blurred, _ = prepare_inpainting(image, mask, 4, 4, 1, invert=1)
    np.testing.assert_array_equal(np.asarray(blurred),
                                  a1111_blur(255 - np.asarray(mask), 4, 4))


def test_transparent_inputs_equal_a1111():
    """An RGBA mask with transparency is its alpha, thresholded; an RGBA image is flattened onto white."""
    rng = np.random.default_rng(13)
    rgba_mask = Image.fromarray(rng.integers(0, 256, (32, 48, 4), dtype=np.uint8), "RGBA")
    rgba_image = Image.fromarray(rng.integers(0, 256, (32, 48, 4), dtype=np.uint8), "RGBA")
    for a, e in zip(prepare_inpainting(rgba_image, rgba_mask, 4, 4, 0, 0),
                    a1111_prepare(rgba_image, rgba_mask, 4, 4, 0, 0)[0]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


# ---- bad input -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field", [
    ({"mask_blur_x": -1}, "mask_blur_x"),
    ({"mask_blur_y": -4}, "mask_blur_y"),
    ({"mask_blur_x": 2.5}, "mask_blur_x"),
    ({"mask_blur_y": "4"}, "mask_blur_y"),
    ({"mask_blur_x": True}, "mask_blur_x"),
    ({"inpainting_fill": 2}, "inpainting_fill"),
    ({"inpainting_fill": 3}, "inpainting_fill"),
    ({"inpainting_fill": 4}, "inpainting_fill"),
    ({"inpainting_fill": -1}, "inpainting_fill"),
    ({"invert": 2}, "inpainting_mask_invert"),
    ({"invert": -1}, "inpainting_mask_invert"),
])
def test_bad_inputs_name_the_field(kwargs, field):
    image, mask = photo(8, 8, seed=0), brush_mask(8, 8, seed=0)
    args = {"mask_blur_x": 4, "mask_blur_y": 4, "inpainting_fill": 0, "invert": 0, **kwargs}
    with pytest.raises(ValueError, match=field):
        prepare_inpainting(image, mask, **args)


@pytest.mark.parametrize("value", [2, 3])
def test_latent_fills_say_what_is_supported(value):
    image, mask = photo(8, 8, seed=0), brush_mask(8, 8, seed=0)
    with pytest.raises(ValueError, match=r"inpainting_fill.*not supported.*0 \(fill\), 1 \(original\)"):
        prepare_inpainting(image, mask, 4, 4, value, 0)


def test_blur_mask_rejects_negative_blur():
    with pytest.raises(ValueError, match="mask_blur_y must be an integer >= 0"):
        blur_mask(Image.new("L", (4, 4)), 1, -1)


@pytest.mark.parametrize("image_size, mask_size, size", [((80, 56), (80, 56), (64, 64)), ((40, 30), (60, 45), (48, 32)),
                                                      ((64, 64), (64, 64), None)])
def test_resizing_to_the_output_size_equals_a1111(image_size, mask_size, size):
    """The mask is blurred at its own size, then image and mask resized to the output's (resize mode 0)."""
    image, mask = photo(*image_size, seed=14), brush_mask(*mask_size, seed=15)
    expected, _ = a1111_prepare(image, mask, 4, 4, 0, 0, size)
    for a, e in zip(prepare_inpainting(image, mask, 4, 4, 0, 0, size), expected):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


@pytest.mark.parametrize("blur", [0, 4, 16])
def test_paste_original_equals_a1111s_overlay(blur):
    image, mask = photo(64, 48, seed=16), brush_mask(64, 48, seed=17)
    generated = photo(64, 48, seed=18)  # stands in for the decoded image
    prepared, overlay = a1111_prepare(image, mask, blur, blur, 0, 0)
    ours = paste_original(generated, prepare_inpainting(image, mask, blur, blur, 0, 0).original, prepared[1])
    np.testing.assert_array_equal(np.asarray(ours), np.asarray(a1111_apply_overlay(generated, overlay)))
    outside = np.asarray(prepared[1]) == 0
    np.testing.assert_array_equal(np.asarray(ours)[outside], np.asarray(image)[outside])
