"""SDXL images equal diffusers' SDXL pipelines pixel for pixel: text-to-image, image-to-image, inpainting, the
ensemble of base and refiner, the refiner alone, and one Turbo step.

Tiny random SDXL models (tests/sdxl_fixtures.py) are loaded from both layouts, a diffusers folder and an
sgm single file. diffusers runs StableDiffusionXL(Img2Img|Inpaint)Pipeline on the reference modules with
`generator=torch.Generator("cpu").manual_seed(s)` and the sampler built as
`SamplerClass.from_config(<the layout's default scheduler>.config)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image
from diffusers import (EulerAncestralDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline)

import checkpoint_fixtures as fx
import sdxl_fixtures as sx
from diffusion_core import DiffusionModel, GenerationConfig, make_scheduler
from diffusion_core.cli import main
from diffusion_core.generation import read_png_parameters
from test_pipeline import DIFFUSERS_CLASS, PROMPT, assert_same_pixels, sample_image, sample_mask, seeded

SIZE = dict(width=64, height=64)  # a single file knows no native size but SDXL's 1024: say it


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Checkpoint:
    ref: dict      # the diffusers / transformers reference modules (sdxl_fixtures.tiny_sdxl)
    paths: dict    # layout ("folder", "single") -> the checkpoint on disk
    models: dict   # layout -> our DiffusionModel loaded from it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(kind: str) -> Checkpoint:
        if kind not in cache:
            ref = sx.tiny_sdxl(kind, seed={"base": 0, "refiner": 10, "inpaint": 20}[kind])
            root = tmp_path_factory.mktemp(f"sdxl_{kind}")
            paths = {"folder": sx.save_sdxl_folder(ref, root / "folder"),
                     "single": sx.save_sdxl_single_file(ref, root / f"{kind}.safetensors")}
            cache[kind] = Checkpoint(ref, paths, {layout: DiffusionModel.from_pretrained(p) for layout, p in paths.items()})
        return cache[kind]
    return get


def pipeline(ck: Checkpoint, sampler: str | None, pipeline_class=None):
    """diffusers' pipeline with `sampler` built from the reference's scheduler config, as ours builds it (both
    layouts default to SDXL's Euler scheduler config)."""
    default = ck.ref["scheduler"]
    scheduler = default if sampler is None else DIFFUSERS_CLASS[sampler].from_config(default.config)
    return sx.sdxl_pipeline(ck.ref, pipeline_class, scheduler)


def differs(a, b, by: int = 5) -> bool:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max() > by


# ---------------------------------------------------------------- text to image

TEXT_TO_IMAGE = [  # layout, sampler, steps, guidance, negative_prompt, negative_prompt_2, prompt_2
    ("folder", None, 4, 5.0, "", None, None),                       # the empty negative is all zeros
    ("single", "euler_a", 4, 5.0, "blurry", None, None),
    ("folder", "dpmpp_2m", 4, 7.5, "blurry", "dark", "a blue square on a red background"),
    ("single", "ddim", 3, 3.0, "", "grainy", None),                 # negative_prompt_2 alone: encoded, not zeros
    ("folder", "unipc", 5, 1.0, "", None, "an orange triangle"),    # no guidance: the conditional pass only
    ("single", "ddpm", 3, 5.0, "green", None, "a white square"),
    ("folder", "pndm", 4, 5.0, "", None, None),
]


@pytest.mark.parametrize("layout, sampler, steps, guidance, negative, negative_2, prompt_2", TEXT_TO_IMAGE)
def test_sdxl_text_to_image_equals_diffusers(checkpoint, layout, sampler, steps, guidance, negative, negative_2,
                                             prompt_2):
    ck = checkpoint("base")
    config = GenerationConfig(PROMPT, negative_prompt=negative, negative_prompt_2=negative_2, prompt_2=prompt_2,
                              num_inference_steps=steps, guidance_scale=guidance, seed=7, sampler=sampler, **SIZE)
    ours = ck.models[layout].generate(config, progress=False)
    pipe = pipeline(ck, sampler)
    # our "" is diffusers' None (zeros on the base); with a negative_prompt_2 it is the text "" for ViT-L
    theirs = pipe(PROMPT, prompt_2=prompt_2, negative_prompt=negative if negative or negative_2 else None,
                  negative_prompt_2=negative_2,
                  num_inference_steps=steps, guidance_scale=guidance, generator=seeded(7), **SIZE).images[0]
    assert_same_pixels(ours.image, theirs)
    assert ours.steps_taken == pipe.num_timesteps
    assert ours.config.original_size == ours.config.target_size == (64, 64)


def test_prompt_2_and_the_empty_negative_change_the_image(checkpoint):
    model = checkpoint("base").models["folder"]
    base = GenerationConfig(PROMPT, num_inference_steps=3, seed=2, **SIZE)
    plain = model.generate(base, progress=False).image
    assert differs(plain, model.generate(GenerationConfig(**{**base.to_dict(), "prompt_2": "a green square"}),
                                         progress=False).image)
    assert differs(plain, model.generate(GenerationConfig(**{**base.to_dict(), "negative_prompt_2": "blurry"}),
                                         progress=False).image)
    resolved = model.generate(base, progress=False).config
    negative = model.conditioning([resolved], guided=True)
    assert torch.count_nonzero(negative.context[0]) == 0 and torch.count_nonzero(negative.text_embeds[0]) == 0


MICRO = [  # layout, fields (diffusers' names and meaning: sizes (height, width), crops (top, left))
    ("single", dict(original_size=(512, 384), crops_coords_top_left=(96, 32), target_size=(64, 48))),
    ("folder", dict(crops_coords_top_left=(256, 0), negative_original_size=(128, 128),
                    negative_crops_coords_top_left=(8, 16), negative_target_size=(256, 512))),
]


@pytest.mark.parametrize("layout, fields", MICRO)
def test_size_and_crop_conditioning_equals_diffusers(checkpoint, layout, fields):
    ck = checkpoint("base")
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=4, seed=9, width=48, height=64,
                              **fields)
    ours = ck.models[layout].generate(config, progress=False)
    theirs = pipeline(ck, None)(PROMPT, negative_prompt="blurry", num_inference_steps=4, width=48, height=64,
                                generator=seeded(9), **fields).images[0]
    assert_same_pixels(ours.image, theirs)
    plain = ck.models[layout].generate(GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=4,
                                                        seed=9, width=48, height=64), progress=False)
    assert differs(plain.image, ours.image, by=2)  # the ids reach the image


def test_sdxl_batch_with_per_image_seeds_equals_diffusers(checkpoint):
    ck = checkpoint("base")
    prompts = [PROMPT, "a yellow circle on a purple background", "a black square"]
    configs = [GenerationConfig(p, negative_prompt="blurry", num_inference_steps=3, seed=s, sampler="euler_a", **SIZE)
               for p, s in zip(prompts, (4, 5, 6))]
    ours = ck.models["single"].generate_batch(configs, progress=False)
    theirs = pipeline(ck, "euler_a")(prompts, negative_prompt=["blurry"] * 3, num_inference_steps=3,
                                     generator=[seeded(s) for s in (4, 5, 6)], **SIZE).images
    for result, image in zip(ours, theirs):
        assert_same_pixels(result.image, image)
    alone = ck.models["single"].generate(configs[1], progress=False)
    assert_same_pixels(alone.image, ours[1].image)


# ---------------------------------------------------------------- image to image, inpainting


@pytest.mark.parametrize("layout, sampler, strength", [("folder", None, 0.6), ("single", "euler_a", None)])
def test_sdxl_image_to_image_equals_diffusers(checkpoint, layout, sampler, strength):
    ck = checkpoint("base")
    init = sample_image(70, 66)
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=10, seed=11, sampler=sampler)
    ours = ck.models[layout].image_to_image(config, init, strength, progress=False)
    pipe = pipeline(ck, sampler, StableDiffusionXLImg2ImgPipeline)
    kwargs = {} if strength is None else {"strength": strength}  # None: diffusers' SDXL default, 0.3
    theirs = pipe(PROMPT, image=init, negative_prompt="blurry", num_inference_steps=10, generator=seeded(11),
                  **kwargs).images[0]
    assert ours.image.size == (68, 64) and ours.strength == (strength or 0.3)
    assert_same_pixels(ours.image, theirs)
    assert ours.steps_taken == pipe.num_timesteps


INPAINT = [  # kind (inpaint: a 9-channel UNet; base: 4 channels, pasted back), layout, sampler, strength
    ("inpaint", "folder", None, None),
    ("inpaint", "single", "euler_a", 0.75),
    ("base", "folder", "ddim", 1.0),
    ("base", "single", None, None),
]


@pytest.mark.parametrize("kind, layout, sampler, strength", INPAINT)
def test_sdxl_inpaint_equals_diffusers(checkpoint, kind, layout, sampler, strength):
    ck = checkpoint(kind)
    image, mask = sample_image(80, 72), sample_mask(80, 72)
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=5, seed=5, sampler=sampler, **SIZE)
    ours = ck.models[layout].inpaint(config, image, mask, strength, progress=False)
    kwargs = {} if strength is None else {"strength": strength}  # None: diffusers' SDXL default, 0.9999
    theirs = pipeline(ck, sampler, StableDiffusionXLInpaintPipeline)(
        PROMPT, image=image, mask_image=mask, negative_prompt="blurry", num_inference_steps=5, generator=seeded(5),
        **SIZE, **kwargs).images[0]
    assert_same_pixels(ours.image, theirs)
    assert ours.config.guidance_scale == 7.5 and ours.strength == (strength or 0.9999)  # diffusers' defaults


# ---------------------------------------------------------------- the ensemble of experts, the refiner alone


@pytest.mark.parametrize("base_layout, refiner_layout, sampler, switch_at", [
    ("folder", "single", None, 0.8), ("single", "folder", "euler_a", 0.6), ("folder", "folder", "dpmpp_2m", 0.5)])
def test_base_then_refiner_equals_diffusers(checkpoint, base_layout, refiner_layout, sampler, switch_at):
    base, refiner = checkpoint("base"), checkpoint("refiner")
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=8, seed=3, sampler=sampler,
                              aesthetic_score=7.0, negative_aesthetic_score=2.0, **SIZE)
    steps = []
    ours = base.models[base_layout].generate(config, refiner=refiner.models[refiner_layout],
                                             refiner_switch_at=switch_at, progress=False,
                                             callback=lambda i, t, x, x0: steps.append(i))
    generator = seeded(3)  # one generator, continuing from the base into the refiner
    latents = pipeline(base, sampler)(PROMPT, negative_prompt="blurry", num_inference_steps=8, denoising_end=switch_at,
                                      output_type="latent", generator=generator, **SIZE).images
    refiner_pipe = pipeline(refiner, sampler)
    theirs = refiner_pipe(PROMPT, negative_prompt="blurry", image=latents, num_inference_steps=8,
                          denoising_start=switch_at, aesthetic_score=7.0, negative_aesthetic_score=2.0,
                          generator=generator).images[0]
    assert_same_pixels(ours.image, theirs)
    assert steps == list(range(8)) and ours.steps_taken == 8
    assert (ours.refiner, ours.refiner_switch_at) == (refiner.models[refiner_layout].config.name, switch_at)


def test_the_refiner_alone_is_image_to_image_equal_to_diffusers(checkpoint):
    ck = checkpoint("refiner")
    init = sample_image(64, 64, seed=3)
    config = GenerationConfig(PROMPT, num_inference_steps=10, seed=4, original_size=(1024, 1024),
                              crops_coords_top_left=(0, 64), aesthetic_score=8.0)
    ours = ck.models["single"].image_to_image(config, init, progress=False)
    theirs = pipeline(ck, None)(PROMPT, image=init, num_inference_steps=10, original_size=(1024, 1024),
                                crops_coords_top_left=(0, 64), aesthetic_score=8.0, generator=seeded(4)).images[0]
    assert_same_pixels(ours.image, theirs)
    assert ours.strength == 0.3 and ours.steps_taken == 3  # diffusers' refiner default: strength 0.3


# ---------------------------------------------------------------- Turbo


def test_sdxl_turbo_one_step_equals_diffusers(checkpoint, tmp_path):
    """A single file carries no scheduler: set SDXL-Turbo's (Euler-A, trailing) by hand, or say turbo=True.
    (SDXL's own config states timestep_spacing, so it is replaced in the dict, not passed twice.)"""
    ck = checkpoint("base")
    path = sx.save_sdxl_single_file(ck.ref, tmp_path / "sd_xl_turbo_1.0.safetensors")
    by_hand = DiffusionModel.from_pretrained(path)
    by_hand.scheduler = make_scheduler("euler_a", **{**by_hand.config.scheduler, "timestep_spacing": "trailing"})
    config = GenerationConfig(PROMPT, num_inference_steps=1, guidance_scale=0.0, seed=6, sampler=None, **SIZE)
    ours = by_hand.generate(config, progress=False)
    scheduler = EulerAncestralDiscreteScheduler.from_config(ck.ref["scheduler"].config, timestep_spacing="trailing")
    theirs = sx.sdxl_pipeline(ck.ref, scheduler=scheduler)(PROMPT, num_inference_steps=1, guidance_scale=0.0,
                                                           generator=seeded(6), **SIZE).images[0]
    assert_same_pixels(ours.image, theirs)
    preset = DiffusionModel.from_pretrained(path, turbo=True)
    turbo = preset.generate(GenerationConfig(PROMPT, seed=6, **SIZE), progress=False)
    assert (turbo.config.num_inference_steps, turbo.config.guidance_scale, turbo.config.sampler) == (1, 0.0, "euler_a")
    assert np.array_equal(np.asarray(turbo.image), np.asarray(ours.image))


def test_sd_turbo_single_file_equals_diffusers(tmp_path):
    """SD-Turbo is an SD 2.1 file trained for ε at 512 px: turbo=True says so, as the file cannot."""
    ref = fx.tiny_reference("sd2")
    path = fx.save_single_file_from_reference(ref, tmp_path / "sd_turbo.safetensors")  # the tiny size needs its yaml
    model = DiffusionModel.from_pretrained(path, turbo=True)
    assert model.config.prediction_type == "epsilon" and model.config.native_size == 512
    ours = model.generate(GenerationConfig(PROMPT, num_inference_steps=2, seed=8, **SIZE), progress=False)
    scheduler = EulerAncestralDiscreteScheduler.from_config(fx.sd_scheduler("sd2").config, timestep_spacing="trailing")
    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                                   unet=ref["unet"], scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(PROMPT, num_inference_steps=2, guidance_scale=0.0, generator=seeded(8), **SIZE).images[0]
    assert_same_pixels(ours.image, theirs)


# ---------------------------------------------------------------- metadata and validation


def test_png_records_every_sdxl_field(checkpoint, tmp_path):
    base, refiner = checkpoint("base"), checkpoint("refiner")
    config = GenerationConfig(PROMPT, prompt_2="a blue square", num_inference_steps=4, seed=1,
                              crops_coords_top_left=(16, 8), original_size=(96, 128), aesthetic_score=7.5, **SIZE)
    result = base.models["folder"].generate(config, refiner=refiner.models["single"], refiner_switch_at=0.5,
                                            progress=False)
    path = result.save(tmp_path / "xl.png")
    parameters = read_png_parameters(path)
    assert parameters["refiner"] == refiner.models["single"].config.name and parameters["refiner_switch_at"] == 0.5
    again = GenerationConfig.from_png(path)
    assert again == result.config and again.crops_coords_top_left == (16, 8) and again.target_size == (64, 64)
    redo = base.models["folder"].generate(again, refiner=refiner.models["single"], refiner_switch_at=0.5,
                                          progress=False)
    assert np.array_equal(np.asarray(redo.image), np.asarray(result.image))


def test_cli_sdxl_with_refiner_records_and_redoes_every_field(checkpoint, tmp_path, capsys):
    """--original-size W H and --crop X Y are the CLI's (width, height) and (left, top); the config holds
    diffusers' (height, width) and (top, left). --from redoes the image, refiner included."""
    base, refiner = checkpoint("base"), checkpoint("refiner")
    common = ["--checkpoint", base.paths["folder"], "--out", tmp_path, "--quiet", "--steps", "4", "--seed", "2",
              "--width", "64", "--height", "48"]
    assert main(["generate", PROMPT, "--prompt-2", "a green square", "--original-size", "96", "128", "--crop",
                 "8", "16", "--refiner", str(refiner.paths["single"]), "--refiner-switch-at", "0.5",
                 "--aesthetic-score", "7", *map(str, common)]) == 0
    first = capsys.readouterr().out.split()[0]
    config = GenerationConfig.from_png(first)
    assert (config.original_size, config.crops_coords_top_left, config.target_size) == ((128, 96), (16, 8), (48, 64))
    assert config.prompt_2 == "a green square" and config.aesthetic_score == 7.0
    expected = base.models["folder"].generate(config, refiner=refiner.models["single"], refiner_switch_at=0.5,
                                              progress=False)
    assert_same_pixels(Image.open(first), expected.image)
    assert main(["generate", "--from", first, "--refiner", str(refiner.paths["single"]), *map(str, common)]) == 0
    again = capsys.readouterr().out.split()[0]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    with pytest.raises(SystemExit):
        main(["generate", "--from", first, *map(str, common)])
    assert "was refined by" in capsys.readouterr().err


@pytest.fixture()
def untouchable(checkpoint):
    """The base and the refiner with hooks that fail if any network runs: errors must come first."""
    models = checkpoint("base").models["folder"], checkpoint("refiner").models["folder"]

    def forbid(*_):
        raise AssertionError("heavy work started before validation")
    handles = [m.register_forward_pre_hook(forbid) for model in models
               for m in (model.text_encoder, model.unet, model.vae.encoder, model.vae.decoder)]
    yield models
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("call, message", [
    (lambda b, r: b.generate(GenerationConfig(PROMPT, aesthetic_score=7.0)), "condition the SDXL refiner"),
    (lambda b, r: b.generate(GenerationConfig(PROMPT, negative_original_size=(64, 64))), "set negative_original_size "
                                                                                         "and negative_target_size"),
    (lambda b, r: b.generate(GenerationConfig(PROMPT, negative_crops_coords_top_left=(8, 8))), "applies together"),
    (lambda b, r: b.generate(GenerationConfig(PROMPT), refiner=r, refiner_switch_at=1.0), r"lie in \(0, 1\)"),
    (lambda b, r: r.generate(GenerationConfig(PROMPT), refiner=b), "hands an SDXL base's latents"),
    (lambda b, r: r.image_to_image(GenerationConfig(PROMPT, prompt_2="other"), sample_image()), "do not reach the"),
    (lambda b, r: r.image_to_image(GenerationConfig(PROMPT, target_size=(64, 64)), sample_image()), "target_size"),
])
def test_sdxl_requests_are_checked_before_heavy_work(untouchable, call, message):
    with pytest.raises(ValueError, match=message):
        call(*untouchable)


@pytest.mark.parametrize("field, value", [("prompt_2", "x"), ("original_size", (64, 64)),
                                          ("crops_coords_top_left", (8, 0)), ("aesthetic_score", 7.0)])
def test_sdxl_fields_on_sd_models_are_refused(field, value):
    model = DiffusionModel()  # the bundled SD-family shapes model
    with pytest.raises(ValueError, match=rf"\['{field}'\] are SDXL-only fields; this sd1 model"):
        model.generate(GenerationConfig(PROMPT, **{field: value}), progress=False)


@pytest.mark.parametrize("fields, message", [
    (dict(original_size=(64,)), r"original_size must be a pair \(height, width\)"),
    (dict(crops_coords_top_left=(-1, 0)), r"crops_coords_top_left must be a pair \(top, left\) of integers >= 0"),
    (dict(aesthetic_score="high"), "aesthetic_score must be a number"),
    (dict(prompt_2=3), "must be strings"),
])
def test_malformed_sdxl_fields(fields, message):
    with pytest.raises(ValueError, match=message):
        GenerationConfig(PROMPT, **fields)
