"""Whole images equal diffusers' pipelines pixel for pixel, with the same weights, prompts, seed and scheduler.

Each tiny random checkpoint (SD1, SD2 768-v, SD1 inpainting) is loaded from both layouts, a diffusers
folder and an original single file. The diffusers reference runs diffusers' StableDiffusionPipeline /
Img2Img / Inpaint pipelines on the reference modules, with `generator=torch.Generator("cpu").manual_seed(s)`
and the sampler built as `SamplerClass.from_config(<the layout's default scheduler>.config)`: the folder's
scheduler_config.json for folders, SD's published config for single files.
"""
from __future__ import annotations

import dataclasses

import logging
from dataclasses import dataclass

import diffusers
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline, StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from PIL import Image

import checkpoint_fixtures as fx
from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.checkpoints.loader import SAMPLER_OF_CLASS
from diffusion_core.guidance import classifier_free_guidance, is_guided
from diffusion_core.memory import BatchSlicedUNet, decode_tiled

DIFFUSERS_CLASS = {name: getattr(diffusers, cls) for cls, name in SAMPLER_OF_CLASS.items()}
PROMPT = "a red circle on a blue background"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@dataclass
class Checkpoint:
    ref: dict                 # the diffusers / transformers reference modules (checkpoint_fixtures.tiny_reference)
    paths: dict               # layout ("folder", "single") -> the checkpoint on disk
    models: dict              # layout -> our DiffusionModel loaded from it
    schedulers: dict          # layout -> the default scheduler diffusers builds for that layout


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    cache = {}

    def get(kind: str) -> Checkpoint:
        if kind not in cache:
            ref = fx.tiny_reference(kind)
            root = tmp_path_factory.mktemp(kind)
            folder = fx.save_diffusers_folder(ref, root / "folder")
            single = fx.save_single_file_from_reference(ref, root / f"{kind}.safetensors")
            scheduler_class = type(ref["scheduler"])
            paths = {"folder": folder, "single": single}
            cache[kind] = Checkpoint(
                ref, paths, {layout: DiffusionModel.from_pretrained(path) for layout, path in paths.items()},
                {"folder": scheduler_class.from_pretrained(folder, subfolder="scheduler"), "single": ref["scheduler"]})
        return cache[kind]
    return get


def diffusers_pipeline(pipeline_class, ck: Checkpoint, layout: str, sampler: str | None):
    default = ck.schedulers[layout]
    scheduler_class = type(default) if sampler is None else DIFFUSERS_CLASS[sampler]
    ref = ck.ref
    pipe = pipeline_class(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"], unet=ref["unet"],
                          scheduler=scheduler_class.from_config(default.config), safety_checker=None,
                          feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def assert_same_pixels(ours: Image.Image, theirs: Image.Image) -> None:
    """Every pixel within 1/255, on an image with real content (so equality means something)."""
    a, b = np.asarray(ours, dtype=np.int16), np.asarray(theirs, dtype=np.int16)
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"max pixel difference {np.abs(a - b).max()}/255"
    assert a.std() > 10, "a flat image proves nothing"


def sample_image(width: int = 64, height: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    smooth = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(smooth).resize((width, height), Image.Resampling.BICUBIC)


def sample_mask(width: int = 64, height: int = 64) -> Image.Image:
    mask = Image.new("L", (width, height), 0)
    mask.paste(200, (width // 4, height // 8, 3 * width // 4, height // 2))  # grey 200 >= 128: repaint
    return mask


# ---------------------------------------------------------------- text to image

TEXT_TO_IMAGE = [  # kind, layout, sampler (None = the checkpoint's), steps, guidance, negative prompt, size
    ("sd1", "folder", None, 4, 7.5, "blurry, dark", (64, 64)),
    ("sd1", "single", "euler_a", 4, 7.5, "", (64, 64)),
    ("sd1", "folder", "dpmpp_2m", 4, 1.0, "", (64, 64)),
    ("sd1", "single", "ddim", 3, 3.0, "blurry", (64, 48)),
    ("sd1", "single", "ddpm", 3, 7.5, "", (64, 64)),
    ("sd1", "single", None, 8, 7.5, "", (64, 64)),
    ("sd1", "folder", "unipc", 5, 7.5, "", (64, 64)),
    ("sd2", "folder", None, 3, 7.5, "blurry", (64, 64)),
    ("sd2_v", "folder", None, 4, 7.5, "blurry", (64, 64)),
    ("sd2_v", "single", "euler_a", 3, 7.5, "", (64, 64)),
    ("sd2_v", "single", "euler", 4, 1.0, "", (48, 64)),
    ("sd2_v", "folder", "dpmpp_2m", 3, 5.0, "green", (64, 64)),
    ("sd2_v", "single", "unipc", 4, 7.5, "", (64, 64)),
]


@pytest.mark.parametrize("kind, layout, sampler, steps, guidance, negative, size", TEXT_TO_IMAGE)
def test_text_to_image_equals_diffusers(checkpoint, kind, layout, sampler, steps, guidance, negative, size):
    ck = checkpoint(kind)
    width, height = size
    config = GenerationConfig(PROMPT, negative_prompt=negative, width=width, height=height, num_inference_steps=steps,
                              guidance_scale=guidance, seed=7, sampler=sampler)
    ours = ck.models[layout].generate(config, progress=False)
    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, layout, sampler)
    theirs = pipe(PROMPT, negative_prompt=negative or None, width=width, height=height, num_inference_steps=steps,
                  guidance_scale=guidance, generator=seeded(7)).images[0]
    assert_same_pixels(ours.image, theirs)
    assert ours.steps_taken == pipe.num_timesteps


@pytest.mark.parametrize("kind, sampler", [("sd1", "dpmpp_2m"), ("sd2_v", "euler"), ("sd1", "unipc")])
def test_karras_sigmas_equal_diffusers(checkpoint, kind, sampler):
    """use_karras_sigmas=True (A1111's "Karras" schedule) is diffusers' scheduler with use_karras_sigmas=True."""
    ck = checkpoint(kind)
    config = GenerationConfig(PROMPT, num_inference_steps=4, seed=5, sampler=sampler, use_karras_sigmas=True)
    ours = ck.models["folder"].generate(config, progress=False)
    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, "folder", sampler)
    pipe.scheduler = DIFFUSERS_CLASS[sampler].from_config(pipe.scheduler.config, use_karras_sigmas=True)
    theirs = pipe(PROMPT, num_inference_steps=4, generator=seeded(5)).images[0]
    assert_same_pixels(ours.image, theirs)
    plain = ck.models["folder"].generate(dataclasses.replace(config, use_karras_sigmas=None), progress=False)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(ours.image))
    with pytest.raises(ValueError, match="use_karras_sigmas applies to the samplers"):
        ck.models["folder"].generate(dataclasses.replace(config, sampler="euler_a"), progress=False)


def test_guidance_rescale_equals_diffusers(checkpoint):
    ck = checkpoint("sd2_v")
    config = GenerationConfig(PROMPT, num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7, seed=3,
                              sampler="ddim")
    ours = ck.models["folder"].generate(config, progress=False)
    pipe = diffusers_pipeline(StableDiffusionPipeline, ck, "folder", "ddim")
    theirs = pipe(PROMPT, num_inference_steps=3, guidance_scale=7.5, guidance_rescale=0.7,
                  generator=seeded(3)).images[0]
    assert_same_pixels(ours.image, theirs)
    plain = ck.models["folder"].generate(GenerationConfig(PROMPT, num_inference_steps=3, guidance_scale=7.5, seed=3,
                                                          sampler="ddim"), progress=False)
    assert np.abs(np.asarray(plain.image, np.int16) - np.asarray(ours.image, np.int16)).max() > 5


def test_inpainting_checkpoint_generates_as_inpainting_everything(checkpoint):
    """A 9-channel UNet draws text-to-image as its inpainting does with a white mask (the masked image is blank).

    Not compared with diffusers: encoding a constant image with the tiny VAE (one channel per GroupNorm group)
    divides rounding noise by sqrt(eps), so two correct implementations disagree; SD's VAE has four per group.
    """
    model = checkpoint("sd1_inpaint").models["folder"]
    config = GenerationConfig(PROMPT, num_inference_steps=3, seed=2, sampler="ddim")
    ours = model.generate(config, progress=False)
    inpainted = model.inpaint(config, sample_image(), Image.new("L", (64, 64), 255), progress=False)
    assert np.array_equal(np.asarray(ours.image), np.asarray(inpainted.image)) and ours.mode == "text_to_image"


# ---------------------------------------------------------------- image to image, inpainting

IMAGE_TO_IMAGE = [  # kind, layout, sampler, steps, strength, guidance
    ("sd1", "folder", None, 5, 0.6, 7.5),
    ("sd1", "single", "dpmpp_2m", 4, 1.0, 1.0),
    ("sd2_v", "single", "euler_a", 4, 0.75, 7.5),
    ("sd2_v", "folder", "unipc", 6, 0.5, 7.5),
]


@pytest.mark.parametrize("kind, layout, sampler, steps, strength, guidance", IMAGE_TO_IMAGE)
def test_image_to_image_equals_diffusers(checkpoint, kind, layout, sampler, steps, strength, guidance):
    ck = checkpoint(kind)
    init = sample_image(70, 66)  # not a multiple of the VAE factor: both keep the size rounded down, 68x64
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=steps, guidance_scale=guidance,
                              seed=11, sampler=sampler)
    ours = ck.models[layout].image_to_image(config, init, strength, progress=False)
    pipe = diffusers_pipeline(StableDiffusionImg2ImgPipeline, ck, layout, sampler)
    theirs = pipe(PROMPT, image=init, strength=strength, negative_prompt="blurry", num_inference_steps=steps,
                  guidance_scale=guidance, generator=seeded(11)).images[0]
    assert ours.image.size == (68, 64)
    assert_same_pixels(ours.image, theirs)
    assert ours.steps_taken == pipe.num_timesteps  # the last int(steps · strength) steps
    assert ours.config.width == 68 and ours.strength == strength


INPAINT = [  # kind (sd1: latent blending with a 4-channel UNet; sd1_inpaint: 9 channels), layout, sampler, steps,
    ("sd1", "folder", "ddim", 4, 1.0),                                                          # strength
    ("sd1", "single", "euler_a", 4, 0.7),
    ("sd1_inpaint", "folder", None, 4, 1.0),
    ("sd1_inpaint", "single", "euler_a", 4, 0.75),
]


@pytest.mark.parametrize("kind, layout, sampler, steps, strength", INPAINT)
def test_inpaint_equals_diffusers(checkpoint, kind, layout, sampler, steps, strength):
    ck = checkpoint(kind)
    image, mask = sample_image(80, 72), sample_mask(80, 72)  # resized to the native 64x64, as diffusers does
    config = GenerationConfig(PROMPT, negative_prompt="blurry", num_inference_steps=steps, seed=5, sampler=sampler)
    ours = ck.models[layout].inpaint(config, image, mask, strength, progress=False)
    pipe = diffusers_pipeline(StableDiffusionInpaintPipeline, ck, layout, sampler)
    theirs = pipe(PROMPT, image=image, mask_image=mask, strength=strength, negative_prompt="blurry",
                  num_inference_steps=steps, generator=seeded(5)).images[0]
    assert_same_pixels(ours.image, theirs)
    assert ours.mode == "inpaint"


# ---------------------------------------------------------------- batches, callbacks, reproduction


def test_batch_image_i_equals_its_single_run(checkpoint):
    model = checkpoint("sd1").models["folder"]
    configs = [GenerationConfig(PROMPT, seed=1, num_inference_steps=3, sampler="euler_a"),
               GenerationConfig("a blue square", negative_prompt="green", seed=2, num_inference_steps=3,
                                sampler="euler_a"),
               GenerationConfig(PROMPT, seed=3, num_inference_steps=3, guidance_scale=1.0, sampler="euler_a")]
    batch = model.generate_batch(configs, progress=False)
    assert [r.seed for r in batch] == [1, 2, 3]
    for result in batch:  # each result's config has every default filled in, so it reproduces the image alone
        single = model.generate(result.config, progress=False)
        assert_same_pixels(single.image, result.image)
    assert np.abs(np.asarray(batch[0].image, np.int16) - np.asarray(batch[2].image, np.int16)).max() > 5


def test_callback_and_intermediates(checkpoint):
    model = checkpoint("sd1").models["folder"]
    calls = []
    result = model.generate(GenerationConfig(PROMPT, num_inference_steps=3, seed=4, sampler="euler"),
                            callback=lambda i, t, x, x0: calls.append((i, float(t), x.clone(), x0.clone())),
                            progress=False, return_intermediates=True)
    scheduler = model.make_scheduler("euler")
    scheduler.set_timesteps(3)
    assert [c[0] for c in calls] == [0, 1, 2]
    assert [c[1] for c in calls] == scheduler.timesteps.tolist()
    steps = result.intermediates
    assert [s.index for s in steps] == [0, 1, 2]
    for (_, _, x, x0), step in zip(calls, steps):
        torch.testing.assert_close(step.latents, x[0], rtol=0, atol=0)
        torch.testing.assert_close(step.pred_x0, x0[0], rtol=0, atol=0)
    # Euler's last step goes to σ = 0: x_0 = x + (0 - σ)·(x - x̂0)/σ = x̂0, so the final sample is the last x̂0
    torch.testing.assert_close(steps[-1].latents, steps[-1].pred_x0, rtol=1e-5, atol=1e-5)
    assert np.array_equal(np.asarray(model.decode(steps[-1].latents)[0]), np.asarray(result.image))
    assert set(result.timings) == {"text_encoding", "image_encoding", "denoising", "decoding"}
    assert 0 < sum(result.timings.values()) <= result.generation_time
    assert result.peak_memory is None and result.steps_taken == 3


def test_seed_changes_the_image_and_seed_none_is_recorded(checkpoint):
    model = checkpoint("sd1").models["folder"]
    a = model.generate(GenerationConfig(PROMPT, num_inference_steps=2, seed=None, sampler="ddim"), progress=False)
    b = model.generate(GenerationConfig(PROMPT, num_inference_steps=2, seed=a.seed + 1, sampler="ddim"),
                       progress=False)
    again = model.generate(GenerationConfig(PROMPT, num_inference_steps=2, seed=a.seed, sampler="ddim"),
                           progress=False)
    assert isinstance(a.seed, int) and a.config.seed == a.seed
    assert np.array_equal(np.asarray(a.image), np.asarray(again.image))
    assert np.abs(np.asarray(a.image, np.int16) - np.asarray(b.image, np.int16)).max() > 5


def test_defaults_come_from_the_checkpoint(checkpoint):
    model = checkpoint("sd2_v").models["single"]
    resolved = model._resolve(GenerationConfig(PROMPT), model._native_size())
    assert (resolved.width, resolved.height) == (64, 64)  # the UNet's sample_size x the VAE factor
    assert (resolved.num_inference_steps, resolved.guidance_scale) == (50, 7.5)
    assert resolved.sampler == "ddim"  # SD 2.x ships DDIM
    assert type(model.make_scheduler(None)) is type(model.scheduler)
    assert model.make_scheduler(None) is not model.scheduler  # schedulers keep per-run state


def test_quality_presets(checkpoint):
    model = checkpoint("sd1").models["folder"]
    fast, balanced, high = (model.get_optimal_config(q, PROMPT, seed=9) for q in ("fast", "balanced", "high"))
    assert (fast.sampler, fast.num_inference_steps) == ("dpmpp_2m", 20)
    assert (balanced.sampler, balanced.num_inference_steps) == ("dpmpp_2m", 30)
    assert (high.sampler, high.num_inference_steps, high.seed) == (None, 50, 9)
    with pytest.raises(ValueError, match="fast"):
        model.get_optimal_config("ultra")


# ---------------------------------------------------------------- guidance


def test_guidance_formula():
    gen = torch.Generator().manual_seed(0)
    uncond, cond = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
    torch.testing.assert_close(classifier_free_guidance(uncond, cond, 1.0), cond, rtol=0, atol=1e-6)  # s = 1: ε_c
    assert torch.equal(classifier_free_guidance(uncond, cond, 0.0), uncond)                          # s = 0: ε_u
    assert torch.equal(classifier_free_guidance(uncond, cond, 7.5), uncond + 7.5 * (cond - uncond))
    guided = uncond + 7.5 * (cond - uncond)
    assert torch.equal(classifier_free_guidance(uncond, cond, 7.5, 0.7), rescale_noise_cfg(guided, cond, 0.7))
    # φ = 1: each sample takes the conditional prediction's standard deviation
    full = classifier_free_guidance(uncond, cond, 7.5, 1.0)
    torch.testing.assert_close(full.std(dim=(1, 2, 3)), cond.std(dim=(1, 2, 3)))
    assert not is_guided(1.0) and not is_guided(0.5) and is_guided(1.01)


# ---------------------------------------------------------------- validation


@pytest.fixture()
def untouchable(checkpoint):
    """The sd1 model with hooks that fail if the text encoder, UNet or VAE run: errors must come first."""
    model = checkpoint("sd1").models["folder"]

    def forbid(*_):
        raise AssertionError("heavy work started before validation")
    handles = [m.register_forward_pre_hook(forbid) for m in (model.text_encoder, model.unet, model.vae.encoder,
                                                             model.vae.decoder)]
    yield model
    for handle in handles:
        handle.remove()


@pytest.mark.parametrize("make, message", [
    (lambda: GenerationConfig(["two", "prompts"]), "prompt and negative_prompt must be strings"),
    (lambda: GenerationConfig(PROMPT, num_inference_steps=0), "num_inference_steps must be an integer >= 1"),
    (lambda: GenerationConfig(PROMPT, guidance_scale=-1.0), "guidance_scale must be >= 0"),
    (lambda: GenerationConfig(PROMPT, guidance_rescale=1.5), r"guidance_rescale must lie in \[0, 1\]"),
    (lambda: GenerationConfig(PROMPT, sampler="k_lms"), "unknown sampler 'k_lms'; choose one of: ddpm, ddim, pndm"),
    (lambda: GenerationConfig(PROMPT, seed=-1), "seed must be an integer"),
    (lambda: GenerationConfig(PROMPT, width=0), "width must be a positive integer"),
])
def test_invalid_configs_are_refused(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("call, message", [
    (lambda m: m.generate(GenerationConfig(PROMPT, width=66)), r"multiples of 4 .*got 66x64"),
    (lambda m: m.generate(GenerationConfig(PROMPT, num_inference_steps=1001)), "at most 1000"),
    (lambda m: m.generate(GenerationConfig(PROMPT, width=2**17, height=2**17)), "GiB free"),
    (lambda m: m.generate_batch([PROMPT]), "list of GenerationConfig"),
    (lambda m: m.image_to_image(GenerationConfig(PROMPT), sample_image(), 0.0), r"strength must lie in \(0, 1\]"),
    (lambda m: m.image_to_image(GenerationConfig(PROMPT), sample_image(), 1.5), r"strength must lie in \(0, 1\]"),
    (lambda m: m.image_to_image(GenerationConfig(PROMPT, num_inference_steps=10), sample_image(), 0.05), "0 steps"),
    (lambda m: m.image_to_image(GenerationConfig(PROMPT), np.zeros((64, 64, 3))), "PIL.Image.Image"),
    (lambda m: m.inpaint(GenerationConfig(PROMPT), sample_image(), "mask.png"), "mask must be a PIL.Image.Image"),
    (lambda m: m.generate(m.get_optimal_config("fast", PROMPT, width=30)), "multiples of 4"),
])
def test_invalid_requests_fail_before_heavy_work(untouchable, call, message):
    with pytest.raises(ValueError, match=message):
        call(untouchable)


def test_no_arguments_means_the_bundled_model(monkeypatch, tmp_path):
    import diffusion_core.toy as toy

    monkeypatch.setattr(toy, "WEIGHTS", tmp_path / "toy_shapes.safetensors")
    with pytest.raises(FileNotFoundError, match="bundled shapes model is missing"):
        DiffusionModel()


# ---------------------------------------------------------------- memory options, fp16 fallback


def test_vae_slicing_and_unet_slicing_change_nothing(checkpoint):
    model = checkpoint("sd1").models["folder"]
    z = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    whole = model.decode_latents(z)
    model.vae_slicing = True
    try:
        torch.testing.assert_close(model.decode_latents(z), whole, rtol=1e-5, atol=1e-5)
    finally:
        model.vae_slicing = False
    context = torch.randn(4, 77, 128, generator=torch.Generator().manual_seed(1))
    x = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        sliced = BatchSlicedUNet(model.unet, 1, model.unet.config)(x, torch.tensor(500), context)
        torch.testing.assert_close(sliced, model.unet(x, torch.tensor(500), context), rtol=1e-5, atol=1e-5)


class PointwiseVAE(torch.nn.Module):
    """A stand-in decoder with no spatial context (1x1 conv, nearest upsampling): tiling must not change it."""

    def __init__(self):
        super().__init__()
        self.config = type("Config", (), {"ch_mult": (1, 2, 2), "out_ch": 3})()
        self.conv = torch.nn.Conv2d(4, 3, 1)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(self.conv(z), scale_factor=4, mode="nearest")


def test_tiled_decoding_blends_tiles_into_the_whole_image():
    vae = PointwiseVAE()
    z = torch.randn(2, 4, 21, 30, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decode_tiled(vae, z, tile=8), vae.decode(z), rtol=1e-5, atol=1e-5)


def test_half_precision_vae_overflow_retries_in_fp32(checkpoint, caplog):
    """An fp16/bf16 decode that yields NaN is redone in fp32 (here bf16, which CPUs run; NaN injected)."""
    ck = checkpoint("sd1")
    model = DiffusionModel.from_pretrained(ck.paths["folder"])  # its own copy: the fallback changes the VAE
    model.vae.to(torch.bfloat16)
    poison = model.vae.decoder.conv_out.register_forward_hook(
        lambda module, inputs, out: out * float("nan") if out.dtype == torch.bfloat16 else out)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with caplog.at_level(logging.WARNING):
        images = model.decode_latents(z)
    poison.remove()
    assert next(model.vae.parameters()).dtype == torch.float32 and "now fp32" in caplog.text
    with torch.no_grad():
        torch.testing.assert_close(images, model.vae.decode(z / model.vae.scaling_factor), rtol=0, atol=0)
    assert torch.isfinite(images).all()
