"""Training a LoRA on the bundled model: it starts from the unchanged model, its file reproduces the trained
weights through `load_lora`, and the shapes detector reads the new shape."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusion_core import DiffusionModel
from diffusion_core.toy.dataset import NEW_SHAPES, SHAPES, Scene, render
from diffusion_core.toy.evaluate import detect
from diffusion_core.toy.train_lora import (HELD_OUT_STARS, LoraTrainConfig, attach_lora, detach_lora,
                                           new_shape_scenes, save_lora, train_lora)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def unet_output(model: DiffusionModel) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        context = model.text_encoder(["a red star on a blue background"])
        return model.unet(torch.randn(1, 4, 16, 16, generator=g), torch.tensor([500]), context)


def test_a_new_lora_leaves_the_model_exactly_unchanged():
    model = DiffusionModel()
    before = unet_output(model)
    updates = attach_lora(model, rank=4, alpha=4.0, seed=0)
    assert torch.equal(unet_output(model), before)  # up = 0: ΔW = 0, as Hu et al. initialise it
    assert {"lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
            "lora_unet_mid_block_resnets_0_conv1", "lora_te_text_model_encoder_layers_1_self_attn_q_proj"} <= set(updates)
    detach_lora(model)
    assert torch.equal(unet_output(model), before)


def test_the_saved_file_reproduces_the_trained_weights(tmp_path):
    trained = DiffusionModel()
    updates = attach_lora(trained, rank=4, alpha=2.0, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for update in updates.values():  # as if trained: up away from zero
            update.up.copy_(torch.randn(update.up.shape, generator=g) * 0.05)
    expected = unet_output(trained)
    with torch.no_grad():
        context = trained.text_encoder(["a green star on a white background"])
    path = save_lora(updates, 2.0, tmp_path / "star.safetensors", LoraTrainConfig(rank=4, alpha=2.0))

    loaded = DiffusionModel()
    report = loaded.load_lora(path)
    assert report.format == {"lora": len(updates)}
    torch.testing.assert_close(unet_output(loaded), expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(loaded.text_encoder(["a green star on a white background"]), context,
                                   rtol=1e-5, atol=1e-5)


def test_training_runs_and_writes_a_loadable_file(tmp_path):
    path = train_lora(LoraTrainConfig(steps=2, batch=4, pool_size=8), tmp_path)
    assert DiffusionModel().load_lora(path).changed["unet"]


def test_the_detector_reads_rendered_stars_and_still_the_known_shapes():
    rng = np.random.default_rng(0)
    shapes = SHAPES + NEW_SHAPES
    for shape in shapes:
        images = [render(Scene("red", shape, "blue"), rng) for _ in range(20)]
        assert [detect(image, shapes).shape for image in images] == [shape] * 20


def test_held_out_star_scenes():
    held_out = new_shape_scenes("star", held_out=True)
    assert len(held_out) == 8 and len(new_shape_scenes("star", held_out=False)) == 48
    assert {(s.colour, s.background) for s in held_out} == {("green", b) for b in
                                                            ("red", "blue", "yellow", "purple", "orange", "white", "black")} | {HELD_OUT_STARS[1]}


def test_the_bundled_star_lora_is_the_default_recipe_and_loads():
    from safetensors import safe_open
    from diffusion_core.toy import STAR_LORA
    from dataclasses import asdict
    with safe_open(STAR_LORA, "pt") as f:
        assert f.metadata()["diffusion_core_train_lora"] == str(asdict(LoraTrainConfig()))
    model = DiffusionModel()
    expected = len(attach_lora(model, rank=8, alpha=8.0, seed=0))
    detach_lora(model)
    report = model.load_lora(STAR_LORA)
    assert report.format == {"lora": expected} and set(report.changed) == {"unet", "text_encoder"}
