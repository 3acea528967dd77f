"""Training a ControlNet on the bundled model: it starts from the unchanged model, its file (with the cldm yaml
beside it) reproduces the trained network, the blobs say where the shape is, and the shipped one is the recipe's."""
from __future__ import annotations

import math
from dataclasses import asdict

import numpy as np
import pytest
import torch
from safetensors import safe_open

from diffusion_core import ControlNetModel, DiffusionModel, toy
from diffusion_core.toy.dataset import Scene, random_box, render
from diffusion_core.toy.evaluate import detect
from diffusion_core.toy.train_controlnet import (ControlNetTrainConfig, blob, new_controlnet, placement,
                                                 save_controlnet, train_controlnet)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def residuals_and_output(model: DiffusionModel, controlnet: ControlNetModel) -> tuple[list, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x, hint = torch.randn(1, 4, 16, 16, generator=g), torch.rand(1, 3, 64, 64, generator=g)
    with torch.no_grad():
        context = model.text_encoder(["a red circle on a blue background"])
        down, mid = controlnet(x, torch.tensor([500]), context, hint)
        return [*down, mid], model.unet(x, torch.tensor([500]), context, down_residuals=down, mid_residual=mid)


def test_a_new_controlnet_copies_the_encoder_and_leaves_the_model_unchanged():
    model = DiffusionModel()
    controlnet = new_controlnet(model, seed=0)
    for name, weight in controlnet.state_dict().items():
        if name.startswith(("input_blocks.", "middle_block.", "time_embed.")):
            assert torch.equal(weight, model.unet.state_dict()[name]), name  # the copy (§3.2)
    residuals, output = residuals_and_output(model, controlnet)
    assert all(not r.any() for r in residuals)  # every zero convolution outputs 0
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 16, 16, generator=g)
    with torch.no_grad():
        plain = model.unet(x, torch.tensor([500]), model.text_encoder(["a red circle on a blue background"]))
    assert torch.equal(output, plain)


def test_the_saved_file_and_yaml_reproduce_the_trained_network(tmp_path):
    model = DiffusionModel()
    trained = new_controlnet(model, seed=1)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters():  # as if trained: the zero convolutions too
            p.add_(torch.randn(p.shape, generator=g) * 0.02)
    path = save_controlnet(trained, tmp_path / "blob.safetensors", ControlNetTrainConfig())
    loaded = ControlNetModel.from_pretrained(path)
    assert loaded.controlnet_config == trained.controlnet_config  # the yaml's 4 heads, not SD's 8
    for a, b in zip(residuals_and_output(model, loaded)[0], residuals_and_output(model, trained)[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_the_blob_lies_around_the_shape_and_the_detector_finds_its_centre():
    rng = np.random.default_rng(0)
    for _ in range(20):
        box = random_box(rng)
        image = render(Scene("red", "square", "blue"), rng, box=box)
        control, (cx, cy) = blob(box, rng)
        x0, y0, side = box
        assert math.dist((cx, cy), (x0 + side / 2, y0 + side / 2)) <= 3 * math.sqrt(2)
        white = np.asarray(control)[..., 0] > 127
        assert white[int(cy), int(cx)] and 0.3 < white.sum() / side ** 2 < 1.4  # about the shape's size
        found = detect(image)
        assert math.dist(found.centre, (x0 + side / 2, y0 + side / 2)) <= 1.0  # a drawn square's own centre


def test_placement_counts_shapes_near_their_blob():
    rng = np.random.default_rng(1)
    scene = Scene("yellow", "circle", "purple")
    boxes = [random_box(rng) for _ in range(4)]
    images = [render(scene, rng, box=box) for box in boxes]
    centres = [(x0 + s / 2, y0 + s / 2) for x0, y0, s in boxes]
    assert placement(images, [scene] * 4, centres).near == 4
    far = [(64 - x, 64 - y) for x, y in centres]
    moved = [math.dist(a, b) > 8 for a, b in zip(centres, far)]
    assert placement(images, [scene] * 4, far).near == 4 - sum(moved)


def test_training_runs_and_writes_a_loadable_file(tmp_path):
    path = train_controlnet(ControlNetTrainConfig(steps=2, batch=4, pool_size=64), tmp_path)
    assert path.with_suffix(".yaml").is_file()
    trained = ControlNetModel.from_pretrained(path)
    assert any(p.any() for p in trained.zero_convs.parameters())  # two steps moved the zero convolutions


def test_the_bundled_controlnet_is_the_default_recipe_and_loads():
    with safe_open(toy.BLOB_CONTROLNET, "pt") as f:
        recipe = f.metadata()["diffusion_core_train_controlnet"]
    assert recipe == str(asdict(ControlNetTrainConfig()))
    controlnet = ControlNetModel.from_pretrained(toy.BLOB_CONTROLNET)
    assert controlnet.controlnet_config.unet.num_heads == DiffusionModel().unet.config.num_heads
