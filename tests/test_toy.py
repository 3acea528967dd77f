"""The bundled shapes model: its data, its detector, its training recipe and the accuracy of its weights."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from diffusion_core.pipeline import DiffusionModel
from diffusion_core.toy import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, WEIGHTS
from diffusion_core.toy.dataset import (PALETTE, SHAPES, Scene, all_scenes, held_out_scenes, make_batch,
                                        parse_caption, render, seen_scenes)
from diffusion_core.toy.evaluate import detect, sample_images
from diffusion_core.toy.train import TrainConfig, train
from diffusion_core.toy.xl import (MAX_CROP, TOY_XL_CLIP_G, TOY_XL_UNET, XL_WEIGHTS, XLTrainConfig, crop_effect,
                                   cropped_batch, load_toy_xl)
from diffusion_core.toy.xl import train as train_xl


def test_scenes_and_held_out_split():
    assert len(all_scenes()) == 8 * 3 * 7
    held = held_out_scenes()
    assert len(held) == 3 * 7 + 3  # three (colour, shape) pairs on any background, plus white on black
    assert {(s.colour, s.shape) for s in held} >= {("green", "triangle"), ("purple", "circle"), ("orange", "square")}
    assert {s for s in held if (s.colour, s.background) == ("white", "black")} == {
        Scene("white", shape, "black") for shape in SHAPES}
    assert not set(held) & set(seen_scenes())
    scene = Scene("red", "circle", "blue")
    assert scene.caption == "a red circle on a blue background"
    assert parse_caption(scene.caption) == scene
    with pytest.raises(ValueError, match="caption"):
        parse_caption("a red circle on a red background")


def test_batches_are_deterministic_per_seed_and_index():
    images, captions = make_batch(seen_scenes(), seed=3, index=7, batch_size=4)
    again, captions_again = make_batch(seen_scenes(), seed=3, index=7, batch_size=4)
    other, _ = make_batch(seen_scenes(), seed=3, index=8, batch_size=4)
    torch.testing.assert_close(images, again, rtol=0, atol=0)
    assert captions == captions_again
    assert not torch.equal(images, other)
    assert images.shape == (4, 3, 64, 64) and images.min() >= -1 and images.max() <= 1


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_detector_reads_every_ground_truth_scene(seed):
    rng = np.random.default_rng(seed)
    wrong = [(scene, detect(image)) for scene in all_scenes() if not detect(image := render(scene, rng)).matches(scene)]
    assert wrong == []


def test_rendered_shapes_follow_the_spec():
    """Bounding box 24-48 px inside the image, in the foreground colour, on the background colour."""
    rng = np.random.default_rng(0)
    for scene in all_scenes():
        pixels = np.asarray(render(scene, rng)).astype(np.float32)
        fg, bg = (np.linalg.norm(pixels - PALETTE[name], axis=-1) for name in (scene.colour, scene.background))
        shape = fg < bg
        rows, cols = np.flatnonzero(shape.any(axis=1)), np.flatnonzero(shape.any(axis=0))
        # 23: a triangle's apex row is less than half covered, so it reads as background
        assert 23 <= rows[-1] - rows[0] + 1 <= 48 and 24 <= cols[-1] - cols[0] + 1 <= 48
        assert np.abs(pixels[~shape] - PALETTE[scene.background]).mean() < 15  # anti-aliased edges aside


def test_short_training_run_lowers_both_losses(tmp_path):
    config = replace(TrainConfig(), vae_steps=50, vae_batch=16, decoder_steps=5, decoder_batch=2, pool_size=64,
                     unet_steps=40, unet_batch=8,
                     warmup_steps=5, preview_every=1000, checkpoint_every=1000)
    train(config, tmp_path)
    log = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["log"]
    for stage in ("vae", "unet"):
        losses = [loss for name, _, loss, _ in log if name == stage]
        assert np.mean(losses[-10:]) < 0.9 * np.mean(losses[:10]), (stage, losses)
    assert (tmp_path / "toy_shapes.safetensors").is_file() and (tmp_path / "toy_shapes.yaml").is_file()


def test_bundled_weights_fit_in_25_mb():
    assert WEIGHTS.stat().st_size + WEIGHTS.with_suffix(".yaml").stat().st_size <= 25 * 2**20


def test_bundled_model_draws_what_the_prompt_says():
    """A floor well under the measured accuracy (docs/toy-model.md), on 12 seen and 6 held-out prompts."""
    seen, held = seen_scenes()[::12], held_out_scenes()[::4]
    images = sample_images(DiffusionModel(), seen + held, [0], DEFAULT_SAMPLER, DEFAULT_STEPS, DEFAULT_GUIDANCE)
    right = [detect(image).matches(scene) for image, scene in zip(images, seen + held)]
    assert sum(right[: len(seen)]) >= 9, right
    assert sum(right) >= 12, right


# ---------------------------------------------------------------- the SDXL-architecture model (toy/xl.py)


def test_cropped_batches_are_windows_told_their_crop():
    images, captions, crops = cropped_batch(seed=3, index=2, batch_size=32)
    again = cropped_batch(seed=3, index=2, batch_size=32)
    torch.testing.assert_close(images, again[0], rtol=0, atol=0)
    assert captions == again[1] and crops == again[2]
    whole, _ = make_batch(seen_scenes(), seed=3, index=2, batch_size=32)
    for image, original, crop in zip(images, whole, crops):
        if crop == (0, 0):  # uncropped: exactly the bundled model's data
            assert torch.equal(image, original)
        else:
            assert all(4 <= c <= MAX_CROP and c % 4 == 0 for c in crop)
    assert 8 <= sum(crop != (0, 0) for crop in crops) <= 24  # about half are crops


def test_short_xl_training_run_exports_an_sdxl_file(tmp_path):
    path = train_xl(XLTrainConfig(pool_size=64, unet_steps=10, unet_batch=4, warmup_steps=2), tmp_path)
    model = DiffusionModel(load_toy_xl(path=path))
    assert model.config.family == "sdxl" and model.config.prediction_type == "v_prediction"
    assert model.config.unet == TOY_XL_UNET and model.config.text_2 == TOY_XL_CLIP_G
    assert model.vae.scaling_factor == DiffusionModel().vae.scaling_factor  # the bundled model's VAE
    assert (tmp_path / "training_curve_xl.png").is_file()


def test_shipped_xl_model_learnt_the_crop_condition():
    """A floor well under the measured effect (docs/toy-model.md), on 12 seen prompts."""
    model = DiffusionModel(load_toy_xl())
    whole, cut = crop_effect(model, seeds=(0,), split="seen", every=4)
    assert cut.cut - whole.cut >= 4, (whole, cut)
    assert whole.colours >= 10 and cut.colours >= 10, (whole, cut)
    assert XL_WEIGHTS.stat().st_size <= 30 * 2**20
