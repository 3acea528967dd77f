"""The `diffusion-core` command: its PNGs carry their parameters and reproduce; it never overwrites a file."""
from __future__ import annotations

import importlib.metadata

import numpy as np
import pytest
import torch
from PIL import Image

import checkpoint_fixtures as fx
from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.cli import main
from diffusion_core.pipeline import read_png_parameters

PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fx.save_diffusers_folder(fx.tiny_reference("sd1"), tmp_path_factory.mktemp("cli") / "sd1")


@pytest.fixture(scope="module")
def model(folder):
    return DiffusionModel.from_pretrained(folder)


def run(capsys, *args) -> list[str]:
    """Run the command in-process; return the paths it printed."""
    assert main([str(a) for a in args]) == 0
    return [line.split()[0] for line in capsys.readouterr().out.splitlines()]


def pixels(image) -> np.ndarray:
    return np.asarray(Image.open(image) if not isinstance(image, Image.Image) else image, dtype=np.int16)


def test_generate_writes_pngs_that_carry_and_reproduce_their_parameters(capsys, tmp_path, folder, model):
    out = tmp_path / "out"
    paths = run(capsys, "generate", PROMPT, "--checkpoint", folder, "--negative", "blurry", "--steps", 2, "--seed", 5,
                "--sampler", "euler_a", "--n", 3, "--batch-size", 2, "--out", out, "--quiet")
    assert paths == [str(out / "00000-5.png"), str(out / "00001-6.png"), str(out / "00002-7.png")]
    for seed, path in zip((5, 6, 7), paths):
        config = GenerationConfig.from_png(path)
        assert config == GenerationConfig(PROMPT, negative_prompt="blurry", width=64, height=64, num_inference_steps=2,
                                          guidance_scale=7.5, seed=seed, sampler="euler_a")
        assert read_png_parameters(path)["mode"] == "text_to_image"
        again = model.generate(config, progress=False).image  # the Python API, one image alone
        assert np.abs(pixels(path) - pixels(again)).max() <= 1
    assert np.abs(pixels(paths[0]) - pixels(paths[1])).max() > 5  # seeds 5 and 6 differ


def test_existing_files_are_never_overwritten(capsys, tmp_path, folder):
    out = tmp_path / "out"
    out.mkdir()
    taken = out / "00000-0.png"
    taken.write_bytes(b"not yours")
    first = run(capsys, "generate", PROMPT, "--checkpoint", folder, "--steps", 1, "--out", out, "--quiet")
    second = run(capsys, "generate", PROMPT, "--checkpoint", folder, "--steps", 1, "--out", out, "--quiet")
    assert taken.read_bytes() == b"not yours"
    assert first == [str(out / "00001-0.png")] and second == [str(out / "00002-0.png")]
    assert np.array_equal(pixels(first[0]), pixels(second[0]))  # same parameters, same image, new file


def test_from_png_reuses_parameters_and_flags_override_them(capsys, tmp_path, folder):
    out = tmp_path / "out"
    [first] = run(capsys, "generate", PROMPT, "--checkpoint", folder, "--steps", 2, "--cfg", 3, "--seed", 8,
                  "--sampler", "ddim", "--out", out, "--quiet")
    [same] = run(capsys, "generate", "--from", first, "--checkpoint", folder, "--out", out, "--quiet")
    [more] = run(capsys, "generate", "--from", first, "--checkpoint", folder, "--steps", 3, "--out", out, "--quiet")
    assert np.array_equal(pixels(first), pixels(same))
    assert GenerationConfig.from_png(more) == GenerationConfig(PROMPT, width=64, height=64, num_inference_steps=3,
                                                               guidance_scale=3.0, seed=8, sampler="ddim")


def test_img2img_and_inpaint_commands_equal_the_python_api(capsys, tmp_path, folder, model):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((64, 64), Image.Resampling.BICUBIC)
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    image.save(tmp_path / "in.png")
    mask.save(tmp_path / "mask.png")
    config = GenerationConfig(PROMPT, num_inference_steps=3, seed=2, sampler="dpmpp_2m")
    [i2i] = run(capsys, "img2img", PROMPT, "--image", tmp_path / "in.png", "--strength", 0.7, "--steps", 3, "--seed", 2,
                "--sampler", "dpmpp_2m", "--checkpoint", folder, "--out", tmp_path, "--quiet")
    assert np.array_equal(pixels(i2i), pixels(model.image_to_image(config, image, 0.7, progress=False).image))
    assert read_png_parameters(i2i)["mode"] == "image_to_image" and read_png_parameters(i2i)["strength"] == 0.7
    [inpainted] = run(capsys, "inpaint", PROMPT, "--image", tmp_path / "in.png", "--mask", tmp_path / "mask.png",
                      "--steps", 3, "--seed", 2, "--sampler", "dpmpp_2m", "--checkpoint", folder, "--out", tmp_path,
                      "--quiet")
    assert np.array_equal(pixels(inpainted), pixels(model.inpaint(config, image, mask, progress=False).image))
    assert read_png_parameters(inpainted)["mode"] == "inpaint"


def test_help_shows_worked_examples(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    text = capsys.readouterr().out
    assert exit_.value.code == 0
    assert "examples:" in text and 'diffusion-core generate "a red circle on a blue background"' in text
    assert "diffusion-core inpaint" in text and "--from" in text


@pytest.mark.parametrize("args, message", [
    (["generate", PROMPT, "--width", "63"], "multiples of 4"),
    (["generate", PROMPT, "--cfg", "-2"], "guidance_scale must be >= 0"),
    (["generate", "--steps", "2"], "give a prompt"),
    (["img2img", PROMPT, "--image", "missing.png"], "missing.png: no such file"),
    (["generate", PROMPT, "--sampler", "k_lms"], "invalid choice: 'k_lms'"),
    (["generate", PROMPT, "--n", "0"], "--n and --batch-size must be at least 1"),
])
def test_errors_exit_with_a_message(capsys, folder, args, message):
    with pytest.raises(SystemExit) as exit_:
        main(args + ["--checkpoint", str(folder), "--quiet"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_without_checkpoint_the_bundled_model_is_used(capsys, monkeypatch, tmp_path):
    import diffusion_core.toy as toy

    monkeypatch.setattr(toy, "WEIGHTS", tmp_path / "toy_shapes.safetensors")
    with pytest.raises(SystemExit):
        main(["generate", PROMPT, "--out", str(tmp_path)])
    assert "bundled shapes model is missing" in capsys.readouterr().err


def test_console_script_is_declared():
    scripts = importlib.metadata.entry_points(group="console_scripts")
    assert [s.value for s in scripts if s.name == "diffusion-core"] == ["diffusion_core.cli:main"]


@pytest.mark.parametrize("command", ["train", "evaluate", "train-lora", "train-embedding", "train-controlnet"])
def test_toy_commands_hand_every_flag_to_their_module(monkeypatch, command):
    module = importlib.import_module(f"diffusion_core.toy.{command.replace('-', '_')}")
    received = []
    monkeypatch.setattr(module, "main", received.append)
    flags = ["--out", "somewhere", "--seed", "3", "--help"]
    assert main([command, *flags]) == 0
    assert received == [flags]
