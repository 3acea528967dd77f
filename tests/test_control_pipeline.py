"""Control images steer generation as diffusers' ControlNet and T2I-Adapter pipelines do, pixel for pixel.

Tiny random checkpoints (checkpoint_fixtures, sdxl_fixtures) with random ControlNets (their zero convolutions
too, or every residual would be 0 and bugs would hide) and random adapters, each loaded by us from the folder
diffusers saved it to, and run by us and by diffusers' StableDiffusion(XL)ControlNet(Img2Img|Inpaint)Pipeline /
StableDiffusion(XL)AdapterPipeline with the same seeded generator. The tiny VAEs downsample by 4, so the tiny
ControlNets' hint embeddings do too (two stride-2 convolutions) and the adapters unshuffle by 4 (SDXL's by 8).
"""
from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from diffusers import (MultiAdapter, StableDiffusionAdapterPipeline, StableDiffusionControlNetImg2ImgPipeline,
                       StableDiffusionControlNetInpaintPipeline, StableDiffusionControlNetPipeline,
                       StableDiffusionXLAdapterPipeline, StableDiffusionXLControlNetPipeline)
from PIL import Image

import checkpoint_fixtures as fx
import sdxl_fixtures as sx
from diffusion_core import ControlInput, ControlNetModel, DiffusionModel, GenerationConfig, T2IAdapter
from diffusion_core.cli import control_argument, main
from diffusion_core.generation import read_png_parameters
from diffusion_core.models.controlnet import controlnet_config_for, copy_encoder
from diffusion_core.preprocess import canny, inpaint_condition
from test_controlnet import build_controlnet
from test_pipeline import DIFFUSERS_CLASS, PROMPT, assert_same_pixels, sample_image, sample_mask, seeded
from test_t2i_adapter import build_adapter

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

UNETS = {"sd1": fx.TINY_UNET["sd1"], "sd2": fx.TINY_UNET["sd2_v"], "sdxl": sx.unet_config("base")}
HINT = dict(conditioning_embedding_out_channels=(16, 32, 32))  # x4, as the tiny VAEs
ADAPTERS = {"sd1": dict(in_channels=1, channels=[32, 64, 64], num_res_blocks=2, downscale_factor=4,
                        adapter_type="full_adapter"),
            "sd1_light": dict(in_channels=3, channels=[32, 64], num_res_blocks=2, downscale_factor=4,
                              adapter_type="light_adapter"),
            "sdxl": dict(in_channels=3, channels=[32, 64, 128, 128], num_res_blocks=2, downscale_factor=8,
                         adapter_type="full_adapter_xl")}
SIZE = 64


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (the reference modules, our DiffusionModel from diffusers' folder, its scheduler, the folder)."""
    @functools.cache
    def get(kind: str):
        root = tmp_path_factory.mktemp(kind)
        if kind == "sdxl":
            ref = sx.tiny_sdxl("base")
            folder = sx.save_sdxl_folder(ref, root)
            return ref, DiffusionModel.from_pretrained(folder), ref["scheduler"], folder
        ref = fx.tiny_reference(kind)
        folder = fx.save_diffusers_folder(ref, root)
        scheduler = type(ref["scheduler"]).from_pretrained(folder, subfolder="scheduler")
        return ref, DiffusionModel.from_pretrained(folder), scheduler, folder
    return get


@pytest.fixture(scope="module")
def controlnets(tmp_path_factory):
    """(family, seed, global pooling) -> (diffusers' ControlNet, ours loaded from the folder it saved)."""
    @functools.cache
    def get(family: str, seed: int = 0, pooled: bool = False):
        ref = build_controlnet(UNETS[family], seed, **HINT, global_pool_conditions=pooled)
        folder = tmp_path_factory.mktemp(f"controlnet_{family}_{seed}")
        ref.save_pretrained(folder)
        return ref, ControlNetModel.from_pretrained(folder)
    return get


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    @functools.cache
    def get(name: str, seed: int = 0):
        ref = build_adapter(ADAPTERS[name], seed)
        folder = tmp_path_factory.mktemp(f"adapter_{name}_{seed}")
        ref.save_pretrained(folder)
        return ref, T2IAdapter.from_pretrained(folder)
    return get


def scheduler_for(models, kind: str, sampler: str | None):
    default = models(kind)[2]
    return default if sampler is None else DIFFUSERS_CLASS[sampler].from_config(default.config)


def sd_pipeline(pipeline_class, models, kind: str, sampler: str | None, **control):
    ref = models(kind)[0]
    pipe = pipeline_class(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                          unet=ref["unet"], scheduler=scheduler_for(models, kind, sampler), safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False, **control)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def xl_pipeline(pipeline_class, models, sampler: str | None, **control):
    ref = models("sdxl")[0]
    pipe = pipeline_class(vae=ref["vae"], text_encoder=ref["text_encoder"], text_encoder_2=ref["text_encoder_2"],
                          tokenizer=ref["tokenizer"], tokenizer_2=ref["tokenizer_2"], unet=ref["unet"],
                          scheduler=scheduler_for(models, "sdxl", sampler), force_zeros_for_empty_prompt=True,
                          **control)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def edges(seed: int, width: int = SIZE, height: int = SIZE) -> Image.Image:
    """A Canny edge map of a smooth random image: what a canny ControlNet is given."""
    return canny(sample_image(width, height, seed), 20, 60)


def diffusers_scales(scales: list[float]) -> float | list[float]:
    return scales[0] if len(scales) == 1 else scales


# ---------------------------------------------------------------- ControlNet, text to image

TEXT_TO_IMAGE = [  # id, kind, [(scale, start, end)], sampler, steps, guidance, guess mode, negative prompt
    ("one", "sd1", [(0.7, 0.0, 1.0)], None, 4, 7.5, False, "blurry"),
    ("two_scales_window_euler_a", "sd1", [(0.8, 0.0, 1.0), (0.5, 0.2, 0.8)], "euler_a", 5, 7.5, False, ""),
    ("guess_mode_dpmpp", "sd1", [(1.0, 0.0, 1.0)], "dpmpp_2m", 4, 7.5, True, ""),
    ("guess_mode_unguided", "sd1", [(0.9, 0.0, 0.75)], None, 4, 1.0, True, ""),
    ("sd2_v", "sd2_v", [(0.9, 0.0, 1.0)], "unipc", 4, 7.5, False, "dark"),
]


@pytest.mark.parametrize("kind, nets, sampler, steps, guidance, guess_mode, negative",
                         [case[1:] for case in TEXT_TO_IMAGE], ids=[case[0] for case in TEXT_TO_IMAGE])
def test_controlnet_text_to_image_equals_diffusers(models, controlnets, kind, nets, sampler, steps, guidance,
                                                   guess_mode, negative):
    family = "sd2" if kind.startswith("sd2") else "sd1"
    pairs = [controlnets(family, seed) for seed in range(len(nets))]
    images = [edges(seed, SIZE + 3, SIZE + 2) for seed in range(len(nets))]  # the size rounds down to 64 x 64
    model = models(kind)[1]
    config = GenerationConfig(PROMPT, negative_prompt=negative, num_inference_steps=steps, guidance_scale=guidance,
                              sampler=sampler, seed=3)
    control = [ControlInput(ours, image, scale, start, end)
               for (_, ours), image, (scale, start, end) in zip(pairs, images, nets)]
    result = model.generate(config, control=control, guess_mode=guess_mode, progress=False)
    refs = [ref for ref, _ in pairs]
    pipe = sd_pipeline(StableDiffusionControlNetPipeline, models, kind, sampler,
                       controlnet=refs[0] if len(refs) == 1 else refs)
    theirs = pipe(PROMPT, image=images[0] if len(images) == 1 else images, negative_prompt=negative,
                  num_inference_steps=steps, guidance_scale=guidance, generator=seeded(3), guess_mode=guess_mode,
                  controlnet_conditioning_scale=diffusers_scales([s for s, _, _ in nets]),
                  control_guidance_start=diffusers_scales([s for _, s, _ in nets]),
                  control_guidance_end=diffusers_scales([e for _, _, e in nets])).images[0]
    assert result.image.size == (SIZE, SIZE)
    assert_same_pixels(result.image, theirs)
    plain = model.generate(config, progress=False).image
    assert np.abs(np.asarray(plain, dtype=int) - np.asarray(result.image, dtype=int)).max() > 8  # the control acts


def test_global_pooling_controlnet_runs_in_guess_mode_as_diffusers(models, controlnets):
    """A shuffle ControlNet (global_pool_conditions) is always run on the conditional half, residuals averaged."""
    ref, ours = controlnets("sd1", 5, pooled=True)
    image = sample_image(SIZE, SIZE, 9)
    config = GenerationConfig(PROMPT, num_inference_steps=3, width=SIZE, height=SIZE, seed=1)
    result = models("sd1")[1].generate(config, control=[ControlInput(ours, image)], progress=False)
    pipe = sd_pipeline(StableDiffusionControlNetPipeline, models, "sd1", None, controlnet=ref)
    theirs = pipe(PROMPT, image=image, num_inference_steps=3, width=SIZE, height=SIZE, generator=seeded(1)).images[0]
    assert_same_pixels(result.image, theirs)


def test_a_fresh_controlnet_changes_nothing(models):
    """ControlNet §3: the UNet's encoder copied, joined through zero convolutions, leaves the output exactly as it
    was."""
    model = models("sd1")[1]
    fresh = copy_encoder(ControlNetModel(controlnet_config_for(model.unet.config, embedding_channels=(16, 32, 32))),
                         model.unet).eval()
    config = GenerationConfig(PROMPT, num_inference_steps=3, width=SIZE, height=SIZE, seed=2)
    with_control = model.generate(config, control=[ControlInput(fresh, edges(1))], progress=False)
    assert np.array_equal(np.asarray(with_control.image), np.asarray(model.generate(config, progress=False).image))


# ---------------------------------------------------------------- ControlNet, image to image and inpainting

@pytest.mark.parametrize("sampler, strength, scale, guess_mode", [(None, None, None, False), ("ddim", 0.6, 1.2, True)],
                         ids=["defaults", "ddim_guess_mode"])
def test_controlnet_image_to_image_equals_diffusers(models, controlnets, sampler, strength, scale, guess_mode):
    """None is diffusers' default for its ControlNet img2img pipeline: strength 0.8 and control scale 0.8."""
    ref, ours = controlnets("sd1")
    init, control = sample_image(SIZE, SIZE, 4), edges(2)
    config = GenerationConfig(PROMPT, num_inference_steps=5, sampler=sampler, seed=4)
    result = models("sd1")[1].image_to_image(config, init, strength, control=[ControlInput(ours, control, scale)],
                                             guess_mode=guess_mode, progress=False)
    pipe = sd_pipeline(StableDiffusionControlNetImg2ImgPipeline, models, "sd1", sampler, controlnet=ref)
    given = {k: v for k, v in dict(strength=strength, controlnet_conditioning_scale=scale).items() if v is not None}
    theirs = pipe(PROMPT, image=init, control_image=control, num_inference_steps=5, generator=seeded(4),
                  guess_mode=guess_mode, **given).images[0]
    assert result.strength == (strength or 0.8)
    assert_same_pixels(result.image, theirs)


@pytest.mark.parametrize("kind, sampler, strength", [("sd1_inpaint", None, None), ("sd1", "euler", 0.8)],
                         ids=["9_channel", "4_channel"])
def test_inpainting_controlnet_equals_diffusers(models, controlnets, kind, sampler, strength):
    """ControlNet 1.1 inpaint reads the image with its masked pixels at -1 (a tensor); the scale is diffusers'
    default for its ControlNet inpainting pipeline, 0.5."""
    ref, ours = controlnets("sd1", 3)
    image, mask = sample_image(SIZE, SIZE, 5), sample_mask(SIZE, SIZE)
    condition = inpaint_condition(image, mask)
    config = GenerationConfig(PROMPT, num_inference_steps=4, sampler=sampler, seed=6)
    result = models(kind)[1].inpaint(config, image, mask, strength, control=[ControlInput(ours, condition)],
                                     progress=False)
    pipe = sd_pipeline(StableDiffusionControlNetInpaintPipeline, models, kind, sampler, controlnet=ref)
    theirs = pipe(PROMPT, image=image, mask_image=mask, control_image=condition, num_inference_steps=4,
                  generator=seeded(6), **({} if strength is None else {"strength": strength})).images[0]
    assert result.image.size == image.size  # diffusers' ControlNet inpainting keeps the image's size
    assert_same_pixels(result.image, theirs)


# ---------------------------------------------------------------- SDXL

@pytest.mark.parametrize("guess_mode", [False, True], ids=["plain", "guess_mode"])
def test_sdxl_controlnet_equals_diffusers(models, controlnets, guess_mode):
    ref, ours = controlnets("sdxl")
    control = edges(7)
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=4, seed=8)
    result = models("sdxl")[1].generate(config, control=[ControlInput(ours, control, 0.9, 0.0, 0.8)],
                                        guess_mode=guess_mode, progress=False)
    pipe = xl_pipeline(StableDiffusionXLControlNetPipeline, models, None, controlnet=ref)
    theirs = pipe(PROMPT, image=control, negative_prompt="blurry", num_inference_steps=4, generator=seeded(8),
                  controlnet_conditioning_scale=0.9, control_guidance_end=0.8, guess_mode=guess_mode).images[0]
    assert_same_pixels(result.image, theirs)


# ---------------------------------------------------------------- T2I-Adapter

@pytest.mark.parametrize("names, scales, sampler", [(["sd1"], [0.8], None), (["sd1_light"], [1.0], "euler_a"),
                                                    (["sd1", "sd1_light"], [0.6, 0.9], None)],
                         ids=["sketch", "light", "multi"])
def test_adapter_text_to_image_equals_diffusers(models, adapters, names, scales, sampler):
    pairs = [adapters(name, seed) for seed, name in enumerate(names)]
    images = [edges(seed + 3) for seed in range(len(names))]  # the sketch adapter reads them in mode "L"
    config = GenerationConfig(PROMPT, num_inference_steps=4, sampler=sampler, seed=9)
    control = [ControlInput(ours, image, scale) for (_, ours), image, scale in zip(pairs, images, scales)]
    result = models("sd1")[1].generate(config, control=control, progress=False)
    refs = [ref for ref, _ in pairs]
    adapter = refs[0] if len(refs) == 1 else MultiAdapter(refs)
    pipe = sd_pipeline(StableDiffusionAdapterPipeline, models, "sd1", sampler, adapter=adapter)
    modes = [i.convert("L" if r.config.in_channels == 1 else "RGB") for i, r in zip(images, refs)]  # as given
    theirs = pipe(PROMPT, image=modes if len(refs) > 1 else modes[0], num_inference_steps=4, generator=seeded(9),
                  adapter_conditioning_scale=diffusers_scales(scales)).images[0]
    assert_same_pixels(result.image, theirs)


def test_sdxl_adapter_with_a_conditioning_factor_equals_diffusers(models, adapters):
    """The adapter acts on the first int(n·end) steps: diffusers' adapter_conditioning_factor."""
    ref, ours = adapters("sdxl")
    control = sample_image(SIZE, SIZE, 11)
    config = GenerationConfig(PROMPT, num_inference_steps=5, seed=10)
    result = models("sdxl")[1].generate(config, control=[ControlInput(ours, control, 0.9, end=0.6)], progress=False)
    pipe = xl_pipeline(StableDiffusionXLAdapterPipeline, models, None, adapter=ref)
    theirs = pipe(PROMPT, image=control, num_inference_steps=5, generator=seeded(10), adapter_conditioning_scale=0.9,
                  adapter_conditioning_factor=0.6).images[0]
    assert_same_pixels(result.image, theirs)


# ---------------------------------------------------------------- what is refused

def test_a_control_for_another_model_is_refused(models, controlnets, adapters):
    sd1 = models("sd1")[1]
    config = GenerationConfig(PROMPT, num_inference_steps=2, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match=r"control\[0\] is a ControlNet for sdxl-like .*this model is sd1"):
        sd1.generate(config, control=[ControlInput(controlnets("sdxl")[1], edges(0))])
    with pytest.raises(ValueError, match=r"T2I-Adapter for sdxl models; this model is sd1"):
        sd1.generate(config, control=[ControlInput(adapters("sdxl")[1], edges(0))])
    half = ControlNetModel(controlnets("sd1")[1].controlnet_config).half()
    with pytest.raises(ValueError, match=r"in torch.float16, the model on cpu in torch.float32"):
        sd1.generate(config, control=[ControlInput(half, edges(0))])


@pytest.mark.parametrize("fields, message", [
    (dict(model="canny"), "must be a ControlNetModel or a T2IAdapter"),
    (dict(image="edges.png"), "must be a PIL image or a tensor"),
    (dict(image=torch.zeros(2, 3, 8, 8)), r"must be \(C, H, W\) or \(1, C, H, W\)"),
    (dict(start=0.5, end=0.5), "0 <= start < end <= 1"),
    (dict(end=1.5), "0 <= start < end <= 1"),
    (dict(scale="1"), "scale must be a number"),
])
def test_malformed_control_inputs_are_refused(controlnets, fields, message):
    values = {"model": controlnets("sd1")[1], "image": edges(0), **fields}
    with pytest.raises(ValueError, match=message):
        ControlInput(**values)


def test_control_requests_that_cannot_work_are_refused(models, controlnets):
    sd1, cn = models("sd1")[1], controlnets("sd1")[1]
    config = GenerationConfig(PROMPT, num_inference_steps=2, width=SIZE, height=SIZE)
    for nothing in (None, []):
        with pytest.raises(ValueError, match="guess_mode=True .* pass control="):
            sd1.generate(config, control=nothing, guess_mode=True)
    with pytest.raises(ValueError, match="control= takes a list of ControlInput"):
        sd1.generate(config, control=[cn])
    sdxl = models("sdxl")[1]
    with pytest.raises(ValueError, match="with refiner= it would stop at the handover"):
        sdxl.generate(config, control=[ControlInput(controlnets("sdxl")[1], edges(0))], refiner=sdxl)


# ---------------------------------------------------------------- the command line

def test_cli_control_records_and_redoes_the_image(models, controlnets, adapters, tmp_path, capsys):
    """--control PRE=FILE:IMAGE:SCALE:START:END equals the Python API on the preprocessed image; the PNG records
    the files, and --from redoes the image only when every control is given again."""
    ref, ours = controlnets("sd1")
    ref.save_pretrained(tmp_path / "controlnet")
    adapter_ref, adapter = adapters("sd1_light")
    adapter_ref.save_pretrained(tmp_path / "adapter")
    sample_image(SIZE, SIZE, 1).save(tmp_path / "photo.png")
    sample_image(SIZE, SIZE, 2).save(tmp_path / "colours.png")
    common = ["--checkpoint", models("sd1")[3], "--out", tmp_path / "out", "--quiet", "--steps", "3", "--seed", "5"]
    controls = ["--control", f"canny={tmp_path / 'controlnet'}:{tmp_path / 'photo.png'}:0.7:0:0.8",
                "--control", f"{tmp_path / 'adapter'}:{tmp_path / 'colours.png'}"]
    assert main(["generate", PROMPT, *map(str, common + controls)]) == 0
    first = capsys.readouterr().out.split()[0]
    recorded = read_png_parameters(first)["controls"]
    assert [(c["kind"], c["preprocess"], c["scale"], c["end"]) for c in recorded] == [
        ("controlnet", "canny", 0.7, 0.8), ("t2i_adapter", None, 1.0, 1.0)]
    expected = models("sd1")[1].generate(GenerationConfig.from_png(first), control=[
        ControlInput(ours, canny(Image.open(tmp_path / "photo.png")), 0.7, 0.0, 0.8),
        ControlInput(adapter, Image.open(tmp_path / "colours.png"))], progress=False)
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(expected.image))
    assert main(["generate", "--from", first, *map(str, common + controls)]) == 0
    again = capsys.readouterr().out.split()[0]
    assert np.array_equal(np.asarray(Image.open(again)), np.asarray(Image.open(first)))
    with pytest.raises(SystemExit):
        main(["generate", "--from", first, *map(str, common + controls[:2])])
    error = capsys.readouterr().err
    assert "was made with control" in error and "colours.png" in error


@pytest.mark.parametrize("value, message", [
    ("cn.pth", "expected \\[PRE=\\]FILE:IMAGE"),
    ("cn.pth:img.png:1:2", "expected \\[PRE=\\]FILE:IMAGE"),
    ("blur=cn.pth:img.png", "unknown preprocessor 'blur'"),
])
def test_cli_malformed_controls_are_refused(value, message):
    with pytest.raises(ValueError, match=message):
        control_argument(value)
