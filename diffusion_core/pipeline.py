"""Text-to-image, image-to-image and inpainting: Stable Diffusion's sampling, step for step as diffusers does it.

The method (Rombach et al. 2022, arXiv:2112.10752, §3.3 and §4.3) in four lines:
encode the prompt with CLIP; draw x_T ~ N(0, I) in the VAE's latent space; run `denoise`, which asks the
UNet for ε (or v) at each timestep, steers it with classifier-free guidance and lets the scheduler take
one step; decode x_0 with the VAE. Everything else in this file is bookkeeping around `denoise`: the
seed rule, image and mask preparation, batching, timings.

Seed rule: `seed=s` draws every random number (x_T, the VAE's posterior samples, the schedulers' noise)
from `torch.Generator("cpu").manual_seed(s)` in diffusers' order, so the image is the one diffusers
makes with that generator, on any device.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import nn
from tqdm import tqdm

from .guidance import classifier_free_guidance, is_guided
from .images import image_to_model_input, mask_to_model_input, tensor_to_pil
from .models.vae import DiagonalGaussian
from .noise import randn
from .schedulers import NoiseScheduler, SamplerType, scheduler_class

if TYPE_CHECKING:
    from .checkpoints.loader import Components

logger = logging.getLogger(__name__)

# callback(step_index, t, x, pred_x0): x is the sample after the step, pred_x0 the model's x̂0 at t
StepCallback = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], None]
PNG_KEY = "diffusion-core"  # PNG text chunk holding a GeneratedImage's parameters as JSON
MODES = ("text_to_image", "image_to_image", "inpaint")
# quality -> (sampler, fraction of the model's default steps); None keeps the checkpoint's own sampler.
# DPM-Solver++(2M) reaches in 20 steps what first-order samplers reach in 50 (Lu et al. 2022, arXiv:2211.01095).
QUALITY_PRESETS = {"fast": ("dpmpp_2m", 0.4), "balanced": ("dpmpp_2m", 0.6), "high": (None, 1.0)}


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate; None fields take the model's defaults (SD: native size, 50 steps, guidance 7.5)."""

    prompt: str                              # the text the image should show
    negative_prompt: str = ""                # what guidance steers away from ("" = plain unconditional)
    width: int | None = None                 # pixels, a multiple of the VAE factor (8 for SD); None = native size
    height: int | None = None                # pixels, as width
    num_inference_steps: int | None = None   # scheduler steps; None = the model's default (SD: 50)
    guidance_scale: float | None = None      # CFG scale s; <= 1 skips the unconditional pass; None = default (7.5)
    guidance_rescale: float = 0.0            # φ of Lin et al. 2023 §3.4 in [0, 1]; 0 = plain CFG
    seed: int | None = 0                     # seeds torch.Generator("cpu"); None draws one (recorded in the result)
    sampler: str | None = None               # a SamplerType name ("euler_a", ...); None = the checkpoint's scheduler

    def __post_init__(self):
        if not isinstance(self.prompt, str) or not isinstance(self.negative_prompt, str):
            raise ValueError(f"prompt and negative_prompt must be strings, got {type(self.prompt).__name__} and "
                             f"{type(self.negative_prompt).__name__}; use generate_batch for several prompts")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ValueError(f"{name} must be a positive integer (pixels) or None, got {value!r}")
        steps = self.num_inference_steps
        if steps is not None and (not _is_int(steps) or steps < 1):
            raise ValueError(f"num_inference_steps must be an integer >= 1 or None, got {steps!r}")
        if self.guidance_scale is not None and not self.guidance_scale >= 0:
            raise ValueError(f"guidance_scale must be >= 0 (1 = no guidance, 7.5 = SD's default), "
                             f"got {self.guidance_scale!r}")
        if not 0 <= self.guidance_rescale <= 1:
            raise ValueError(f"guidance_rescale must lie in [0, 1], got {self.guidance_rescale!r}")
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed < 2**64):
            raise ValueError(f"seed must be an integer in [0, 2**64) or None, got {self.seed!r}")
        if self.sampler is not None:
            object.__setattr__(self, "sampler", _sampler_name(self.sampler))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> GenerationConfig:
        """The config stored in a dict; other keys (a PNG's mode, strength, model...) are ignored."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    @classmethod
    def from_png(cls, path: str | Path) -> GenerationConfig:
        """The config a PNG written by GeneratedImage.save (or the CLI) was made with."""
        return cls.from_dict(read_png_parameters(path))


@dataclass
class DenoisingStep:
    """One step of the loop as `return_intermediates` keeps it (on the CPU)."""

    index: int                # step number, 0 first
    timestep: float           # t the UNet saw
    latents: torch.Tensor     # x after the step, (C, h, w); decode with DiffusionModel.decode
    pred_x0: torch.Tensor     # the model's x̂0 at t, (C, h, w)


@dataclass
class GeneratedImage:
    """An image and everything needed to reproduce and account for it."""

    image: Image.Image
    prompt: str
    config: GenerationConfig     # with every default filled in: generate(config) makes this image again
    seed: int
    generation_time: float       # wall seconds of the whole call (for a batch: of the batch)
    steps_taken: int             # denoising steps run (UNet evaluations per image; fewer with strength < 1)
    timings: dict[str, float]    # seconds per stage: text_encoding, image_encoding, denoising, decoding
    peak_memory: int | None      # bytes the device allocated at most during the call (CUDA); None elsewhere
    mode: str = "text_to_image"  # "text_to_image", "image_to_image" or "inpaint"
    strength: float | None = None  # image_to_image / inpaint: how far the input image was noised
    model: str = ""              # the checkpoint's name
    intermediates: list[DenoisingStep] | None = None  # with return_intermediates=True

    def parameters(self) -> dict[str, Any]:
        """What the PNG text chunk records: the config, the mode and the model."""
        return {**self.config.to_dict(), "mode": self.mode, "strength": self.strength, "model": self.model,
                "steps_taken": self.steps_taken}

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a PNG carrying parameters() in its text chunk; an existing file is an error unless overwrite."""
        path = Path(path)
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, json.dumps(self.parameters()))
        info.add_text("parameters", _a1111_parameters(self))  # the line other SD tools read
        with open(path, "wb" if overwrite else "xb") as file:  # "x": never replace an existing image
            self.image.save(file, format="PNG", pnginfo=info)
        return path


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters a diffusion-core PNG carries; a ValueError if it carries none."""
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path}: no {PNG_KEY!r} text chunk; only PNGs written by diffusion-core carry one")
    return json.loads(text)


def _a1111_parameters(result: GeneratedImage) -> str:
    c = result.config
    negative = f"\nNegative prompt: {c.negative_prompt}" if c.negative_prompt else ""
    return (f"{c.prompt}{negative}\nSteps: {c.num_inference_steps}, Sampler: {c.sampler}, CFG scale: "
            f"{c.guidance_scale}, Seed: {c.seed}, Size: {c.width}x{c.height}, Model: {result.model}")


# ---------------------------------------------------------------- the sampling loop


@dataclass
class InpaintingLatents:
    """What inpainting adds to the loop, at latent resolution (diffusers' StableDiffusionInpaintPipeline)."""

    mask: torch.Tensor                      # (B, 1, h, w): 1 = repaint, 0 = keep
    masked_image_latents: torch.Tensor      # (B, 4, h, w): latents of the image with the hole blanked
    image_latents: torch.Tensor | None = None  # (B, 4, h, w): latents of the whole image (4-channel UNets)
    noise: torch.Tensor | None = None       # (B, 4, h, w): the noise x_T was made with (4-channel UNets)


@torch.no_grad()
def denoise(unet: nn.Module, scheduler: NoiseScheduler, latents: torch.Tensor, context: torch.Tensor,
            timesteps: torch.Tensor, guidance_scale: float, guidance_rescale: float = 0.0,
            generator: torch.Generator | list[torch.Generator] | None = None,
            inpainting: InpaintingLatents | None = None, callback: StepCallback | None = None,
            progress: bool = True) -> torch.Tensor:
    """Run the reverse process from `latents` = x_T (or a noised image) down to x_0 (LDM §3.3; Ho & Salimans 2022).

    Args:
        unet: ε_θ(x_t, t, c), or v_θ; the scheduler knows which.
        scheduler: set_timesteps already called; it turns each prediction into the next sample.
        latents: x at timesteps[0], (B, 4, h, w), already scaled by scheduler.init_noise_sigma.
        context: text states (B, 77, D), or (2B, 77, D) ordered [unconditional; conditional] when guided.
        timesteps: the timesteps to visit, usually scheduler.timesteps (a tail of it for image-to-image).
        guidance_scale: s of classifier-free guidance; <= 1 runs the conditional pass only.
        guidance_rescale: φ of Lin et al. 2023 §3.4; 0 is plain guidance.
        generator: the noise source of stochastic samplers (one per image, or one for the batch).
        inpainting: the mask and image latents: fed to a 9-channel UNet, or pasted back (re-noised)
            outside the mask after every step for a 4-channel one.
        callback: called after each step with (step index, t, x after the step, x̂0 predicted at t).
        progress: show a tqdm bar.
    """
    guided = is_guided(guidance_scale)
    conditioning = None  # 9-channel UNets also see the mask and the masked image's latents
    if inpainting is not None and unet.config.in_channels == 9:
        conditioning = torch.cat([inpainting.mask, inpainting.masked_image_latents], dim=1)  # (B, 5, h, w)
        conditioning = torch.cat([conditioning] * 2) if guided else conditioning
    for i, t in enumerate(tqdm(timesteps, desc="denoising", disable=not progress)):
        # both halves of the guided batch start from the same x_t; only their text differs
        x_in = torch.cat([latents] * 2) if guided else latents
        x_in = scheduler.scale_model_input(x_in, t)
        if conditioning is not None:
            x_in = torch.cat([x_in, conditioning], dim=1)  # (B', 9, h, w)
        prediction = unet(x_in, t, context)
        if guided:
            uncond, cond = prediction.chunk(2)
            prediction = classifier_free_guidance(uncond, cond, guidance_scale, guidance_rescale)
        step = scheduler.step(prediction, t, latents, generator=generator)
        latents = step.prev_sample
        if inpainting is not None and conditioning is None:
            latents = _keep_outside_mask(latents, inpainting, scheduler, timesteps, i)
        if callback is not None:
            callback(i, t, latents, step.pred_original_sample)
    return latents


def _keep_outside_mask(latents: torch.Tensor, inpainting: InpaintingLatents, scheduler: NoiseScheduler,
                       timesteps: torch.Tensor, i: int) -> torch.Tensor:
    """4-channel inpainting, RePaint eq. 8 without resampling (Lugmayr et al. 2022, arXiv:2201.09865), in latent
    space as diffusers does: outside the mask the original image noised to the next timestep (with the noise
    x_T was made with), inside the sample."""
    known = inpainting.image_latents
    if i < len(timesteps) - 1:
        known = scheduler.add_noise(known, inpainting.noise, timesteps[i + 1:i + 2])
    return (1 - inpainting.mask) * known + inpainting.mask * latents


def timesteps_for_strength(scheduler: NoiseScheduler, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The last int(n·strength) steps of the schedule: image-to-image starts part-way down (SDEdit, Meng et al. 2021)."""
    init_steps = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - init_steps, 0)
    return scheduler.timesteps[start * scheduler.order:]


# ---------------------------------------------------------------- the model


class DiffusionModel:
    """A Stable Diffusion checkpoint ready to generate: UNet, VAE, text encoder, default scheduler and config.

    Memory options for large images (all off by default): `vae_slicing` decodes one image of a batch at a
    time, `vae_tiling` decodes overlapping tiles and blends them, `unet_slice_size` runs the UNet on at most
    that many samples at a time. Attention needs no slicing: PyTorch's fused attention never holds the
    (H·W)² score matrix that diffusers' attention slicing splits.
    """

    def __init__(self, components: Components | None = None, *, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, compile: bool = False):
        """Args:
            components: a checkpoints.loader.Components; None loads the bundled shapes model.
            device, dtype: move the models there (default: where they are; the bundled model: CPU, fp32).
            compile: the fast path: the UNet in channels_last and torch.compile'd (first call compiles).
        """
        bundled = components is None
        if bundled:
            components = _bundled_components(device or "cpu", dtype or torch.float32)
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.scheduler = components.scheduler
        self.config = components.config
        self.vae_slicing = False
        self.vae_tiling = False
        self.unet_slice_size: int | None = None
        self.compiled = compile
        self._compiled_unet: nn.Module | None = None
        if not bundled and (device is not None or dtype is not None):
            self.to(device, dtype)

    @classmethod
    def from_pretrained(cls, path: str | Path, original_config: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        prediction_type: str | None = None, compile: bool = False) -> DiffusionModel:
        """Load a diffusers folder or an original .safetensors / .ckpt file (see checkpoints.loader.load_components).

        Args:
            original_config: the LDM yaml of a single file; without it SD 1.x / 2.x / inpainting are recognised.
            prediction_type: "epsilon" or "v_prediction", when the file alone cannot tell (SD 2.x).
            compile: see DiffusionModel.
        """
        from .checkpoints.loader import load_components

        components = load_components(path, original_config=original_config, device=device, dtype=dtype,
                                     prediction_type=prediction_type)
        return cls(components, compile=compile)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        self._compiled_unet = None
        return self

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent pixel along each side: 2^(levels - 1) of the VAE, 8 for SD."""
        return 2 ** (len(self.vae.config.ch_mult) - 1)

    def __repr__(self) -> str:
        return (f"DiffusionModel({self.config.name!r}, {self.config.prediction_type}, sampler="
                f"{type(self.scheduler).__name__}, device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------ public generation API

    def generate(self, config: GenerationConfig, *, callback: StepCallback | None = None, progress: bool = True,
                 return_intermediates: bool = False) -> GeneratedImage:
        """Text to image: diffusers' StableDiffusionPipeline with generator=torch.Generator("cpu").manual_seed(seed).

        Args:
            callback: called after every step with (step index, t, x after the step, x̂0 predicted at t).
            progress: show a tqdm bar.
            return_intermediates: keep x and x̂0 of every step in the result's `intermediates`.
        """
        return self.generate_batch([config], callback=callback, progress=progress,
                                   return_intermediates=return_intermediates)[0]

    def generate_batch(self, configs: list[GenerationConfig], *, callback: StepCallback | None = None,
                       progress: bool = True, return_intermediates: bool = False) -> list[GeneratedImage]:
        """Several configs, those that share size, steps, guidance and sampler in one batch; image i equals
        generate(configs[i]), because each image draws from its own seeded generator."""
        if not isinstance(configs, (list, tuple)) or not all(isinstance(c, GenerationConfig) for c in configs):
            raise ValueError("generate_batch takes a list of GenerationConfig")
        resolved = [self._resolve(c, self._native_size()) for c in configs]
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(resolved):
            key = (c.width, c.height, c.num_inference_steps, c.guidance_scale, c.guidance_rescale, c.sampler)
            groups.setdefault(key, []).append(i)
        for indices in groups.values():  # every group fits, or nothing runs
            self._check_memory(resolved[indices[0]].width, resolved[indices[0]].height, len(indices))
        results: list[GeneratedImage | None] = [None] * len(configs)
        for indices in groups.values():
            batch = [resolved[i] for i in indices]
            if self.unet.config.in_channels == 9:  # an inpainting UNet draws on a blank canvas: mask all
                w, h = batch[0].width, batch[0].height
                outputs = self._run(batch, "text_to_image", Image.new("RGB", (w, h)), Image.new("L", (w, h), 255),
                                    1.0, callback, progress, return_intermediates)
            else:
                outputs = self._run(batch, "text_to_image", None, None, 1.0, callback, progress,
                                    return_intermediates)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    def image_to_image(self, config: GenerationConfig, init_image: Image.Image, strength: float = 0.75, *,
                       callback: StepCallback | None = None, progress: bool = True,
                       return_intermediates: bool = False) -> GeneratedImage:
        """SDEdit (Meng et al. 2021, arXiv:2108.01073): noise the image to step int(n·strength), then denoise.

        As diffusers' StableDiffusionImg2ImgPipeline; width/height None keep the image's size, rounded down to
        a multiple of the VAE factor. A 9-channel inpainting checkpoint repaints everywhere (a white mask).

        Args:
            strength: in (0, 1]; 1 ignores the image's content, small values change little.
        """
        _check_image("init_image", init_image)
        _check_strength(strength, config, self)
        f = self.vae_scale_factor
        size = (init_image.width - init_image.width % f, init_image.height - init_image.height % f)
        resolved = self._resolve(config, size)
        self._check_memory(resolved.width, resolved.height, 1)
        if self.unet.config.in_channels == 9:
            white = Image.new("L", (resolved.width, resolved.height), 255)
            return self._run([resolved], "image_to_image", init_image, white, strength, callback, progress,
                             return_intermediates)[0]
        return self._run([resolved], "image_to_image", init_image, None, strength, callback, progress,
                         return_intermediates)[0]

    def inpaint(self, config: GenerationConfig, image: Image.Image, mask: Image.Image, strength: float = 1.0, *,
                callback: StepCallback | None = None, progress: bool = True,
                return_intermediates: bool = False) -> GeneratedImage:
        """Repaint where `mask` is white (>= 50% grey), keep where it is black, as diffusers'
        StableDiffusionInpaintPipeline: a 9-channel inpainting UNet sees the mask and the masked image; a
        4-channel UNet has the original (re-noised) pasted back outside the mask after every step.

        width/height None mean the model's native size, as in diffusers; image and mask are resized to it.
        """
        _check_image("image", image)
        _check_image("mask", mask)
        _check_strength(strength, config, self)
        resolved = self._resolve(config, self._native_size())
        self._check_memory(resolved.width, resolved.height, 1)
        return self._run([resolved], "inpaint", image, mask, strength, callback, progress, return_intermediates)[0]

    def get_optimal_config(self, quality: str = "balanced", prompt: str = "", **fields: Any) -> GenerationConfig:
        """A GenerationConfig for a speed/quality trade-off: "fast" (DPM-Solver++ 2M, 40% of the default steps),
        "balanced" (DPM-Solver++ 2M, 60%) or "high" (the checkpoint's sampler and steps). For SD: 20, 30, 50.

        Args:
            fields: any other GenerationConfig field (negative_prompt, seed, width, ...).
        """
        if quality not in QUALITY_PRESETS:
            raise ValueError(f"unknown quality {quality!r}; choose one of {list(QUALITY_PRESETS)}")
        sampler, fraction = QUALITY_PRESETS[quality]
        steps = max(1, round(self.config.default_steps * fraction))
        return GenerationConfig(prompt, **{"sampler": sampler, "num_inference_steps": steps, **fields})

    # ------------------------------------------------------------ pieces a notebook can call one by one

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str], negative_prompts: list[str], guided: bool) -> torch.Tensor:
        """The UNet's context: (B, 77, D), or (2B, 77, D) = [negative prompts; prompts] when guided."""
        return self.text_encoder(list(negative_prompts) + list(prompts) if guided else list(prompts))

    def make_scheduler(self, sampler: str | None = None) -> NoiseScheduler:
        """A fresh scheduler: a copy of self.scheduler for None; else that algorithm built from the checkpoint's
        scheduler config (shared keys carry over, the rest take the algorithm's defaults, as diffusers'
        `SchedulerClass.from_config(default.config)`)."""
        if sampler is None:
            return type(self.scheduler)(self.scheduler.config)  # schedulers keep per-run state: never reuse one
        return scheduler_class(sampler).from_config(self.config.scheduler)

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
        """Latents z = scaling_factor · (a sample of q(z|x)), one sample per generator, all of the same image(s)."""
        vae_dtype = next(self.vae.parameters()).dtype
        moments = self.vae.encode(pixels.to(self.device, vae_dtype)).moments  # (1, 2·C, h, w)
        posterior = DiagonalGaussian(moments.expand(len(generators), -1, -1, -1))  # one draw per generator
        return (self.vae.scaling_factor * posterior.sample(generators)).to(self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from latents (B, 4, h, w); an fp16 VAE that overflows (NaN/inf) moves to fp32
        for good and decodes again, as SD's fp16 VAE is known to overflow on some images."""
        z = latents / self.vae.scaling_factor
        vae_dtype = next(self.vae.parameters()).dtype
        images = self._vae_decode(z.to(vae_dtype))
        if vae_dtype in (torch.float16, torch.bfloat16) and not torch.isfinite(images).all():
            logger.warning("the %s VAE decoded to NaN/inf; it is now fp32 and decodes again", vae_dtype)
            self.vae.float()
            images = self._vae_decode(latents.float() / self.vae.scaling_factor)
        return images

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """PIL images of latents (B, 4, h, w) or (4, h, w): to look at x_t or x̂0 of DenoisingStep."""
        latents = latents if latents.ndim == 4 else latents[None]
        return tensor_to_pil(self.decode_latents(latents.to(self.device, self.dtype)))

    # ------------------------------------------------------------ internals

    def _native_size(self) -> tuple[int, int]:
        return self.config.native_size, self.config.native_size

    def _resolve(self, config: GenerationConfig, default_size: tuple[int, int]) -> GenerationConfig:
        """The config with every default filled in, checked against this model before any heavy work."""
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"expected a GenerationConfig, got {type(config).__name__}")
        sampler = config.sampler or self._default_sampler_name()
        if config.sampler is not None:
            scheduler_class(config.sampler)  # a ValueError lists the valid names
        resolved = dataclasses.replace(
            config, width=config.width or default_size[0], height=config.height or default_size[1],
            num_inference_steps=config.num_inference_steps or self.config.default_steps,
            guidance_scale=self.config.default_guidance if config.guidance_scale is None else config.guidance_scale,
            seed=secrets.randbits(63) if config.seed is None else config.seed, sampler=sampler)
        f = self.vae_scale_factor
        if resolved.width % f or resolved.height % f:
            raise ValueError(f"width and height must be multiples of {f} (the VAE's downsampling factor), "
                             f"got {resolved.width}x{resolved.height}")
        if resolved.num_inference_steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be at most {self.scheduler.config.num_train_timesteps} "
                             f"(the training timesteps), got {resolved.num_inference_steps}")
        return resolved

    def _default_sampler_name(self) -> str | None:
        """The SamplerType name of self.scheduler, when it is the checkpoint's own algorithm (it usually is)."""
        name = self.config.scheduler_name
        return name if type(self.scheduler) is scheduler_class(name) else None

    def _scheduler_for(self, sampler: str | None) -> NoiseScheduler:
        return self.make_scheduler(None if sampler == self._default_sampler_name() else sampler)

    def _check_memory(self, width: int, height: int, batch: int) -> None:
        """Refuse a size whose activations cannot fit in the device's free memory (a coarse lower bound)."""
        free = _free_memory(self.device)
        if free is None:
            return
        element = torch.finfo(self.dtype).bits // 8
        f = self.vae_scale_factor
        # The UNet: its skips and feed-forward hold ~16 x model_channels values per latent pixel and sample.
        unet_batch = 2 * batch if self.unet_slice_size is None else min(self.unet_slice_size, 2 * batch)
        unet = unet_batch * (width // f) * (height // f) * self.unet.config.model_channels * 16 * element
        # The VAE decoder's full-resolution stage: ~8 buffers of ch channels per pixel alive at once.
        side = _TILE_LATENT * f
        pixels = min(width, side) * min(height, side) if self.vae_tiling else width * height
        images = 1 if (self.vae_slicing or self.vae_tiling) else batch
        vae = images * pixels * self.vae.config.ch * 8 * element
        need = max(unet, vae)
        if need > free:
            raise ValueError(f"{width}x{height} x {batch} needs at least {need / 2**30:.1f} GiB on {self.device}, "
                             f"which has {free / 2**30:.1f} GiB free; use a smaller size or batch, or set "
                             f"model.vae_tiling = True (VAE) / model.unet_slice_size = 1 (UNet)")

    def _sampling_unet(self) -> nn.Module:
        unet: nn.Module = self.unet
        if self.compiled:
            if self._compiled_unet is None:
                self.unet.to(memory_format=torch.channels_last)
                self._compiled_unet = torch.compile(self.unet)
            unet = self._compiled_unet
        if self.unet_slice_size is not None:
            unet = BatchSlicedUNet(unet, self.unet_slice_size, self.unet.config)
        return unet

    @torch.no_grad()
    def _run(self, configs: list[GenerationConfig], mode: str, image: Image.Image | None, mask: Image.Image | None,
             strength: float, callback: StepCallback | None, progress: bool,
             return_intermediates: bool) -> list[GeneratedImage]:
        """One batch of resolved configs sharing size, steps, guidance and sampler, in diffusers' order of draws."""
        first = configs[0]
        batch, width, height = len(configs), first.width, first.height
        scheduler = self._scheduler_for(first.sampler)
        guided = is_guided(first.guidance_scale)
        device, dtype = self.device, self.dtype
        clock = _StageClock(device)

        with clock("text_encoding"):
            context = self.encode_prompt([c.prompt for c in configs], [c.negative_prompt for c in configs], guided)
        scheduler.set_timesteps(first.num_inference_steps, device=device)
        timesteps = scheduler.timesteps
        if image is not None:
            timesteps = timesteps_for_strength(scheduler, first.num_inference_steps, strength)
        generators = [torch.Generator("cpu").manual_seed(c.seed) for c in configs]  # the seed rule
        shape = (batch, self.vae.config.embed_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

        inpainting = None
        with clock("image_encoding"):
            if image is None:  # x_T ~ N(0, I), scaled to the scheduler's first noise level
                latents = randn(shape, generators, device, dtype) * scheduler.init_noise_sigma
            elif mask is None:  # image-to-image: the image's latents noised to the first timestep
                image_latents = self.encode_image(image_to_model_input(image, width, height), generators)
                noise = randn(shape, generators, device, dtype)
                latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
            else:
                latents, inpainting = self._prepare_inpainting(image, mask, strength, scheduler, timesteps,
                                                               generators, shape)
        steps: list[list[DenoisingStep]] = [[] for _ in configs]

        def on_step(i: int, t: torch.Tensor, x: torch.Tensor, pred_x0: torch.Tensor) -> None:
            if return_intermediates:
                for k in range(batch):
                    steps[k].append(DenoisingStep(i, float(t), x[k].float().cpu(), pred_x0[k].float().cpu()))
            if callback is not None:
                callback(i, t, x, pred_x0)

        with clock("denoising"):
            latents = denoise(self._sampling_unet(), scheduler, latents, context, timesteps, first.guidance_scale,
                              first.guidance_rescale, generators, inpainting, on_step, progress)
        with clock("decoding"):
            pictures = tensor_to_pil(self.decode_latents(latents))
        wall = clock.total()
        return [GeneratedImage(image=picture, prompt=c.prompt, config=c, seed=c.seed, generation_time=wall,
                               steps_taken=len(timesteps), timings=dict(clock.seconds),
                               peak_memory=clock.peak_memory(), mode=mode,
                               strength=None if image is None or mode == "text_to_image" else strength,
                               model=self.config.name, intermediates=steps[k] if return_intermediates else None)
                for k, (picture, c) in enumerate(zip(pictures, configs))]

    def _prepare_inpainting(self, image: Image.Image, mask: Image.Image, strength: float, scheduler: NoiseScheduler,
                            timesteps: torch.Tensor, generators: list[torch.Generator],
                            shape: tuple[int, ...]) -> tuple[torch.Tensor, InpaintingLatents]:
        """x_T, the latent mask and the image latents, drawing from the generators in diffusers' order:
        the image's posterior (when needed), the noise, then the masked image's posterior."""
        batch, _, h, w = shape
        device, dtype = self.device, self.dtype
        pixels = image_to_model_input(image, w * self.vae_scale_factor, h * self.vae_scale_factor)
        mask_pixels = mask_to_model_input(mask, w * self.vae_scale_factor, h * self.vae_scale_factor)
        from_noise = strength == 1.0
        blend = self.unet.config.in_channels == 4
        image_latents = self.encode_image(pixels, generators) if blend or not from_noise else None
        noise = randn(shape, generators, device, dtype)
        if from_noise:
            latents = noise * scheduler.init_noise_sigma
        else:
            latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
        # diffusers encodes the masked image for 4-channel UNets too: its draw is part of the seed's stream
        masked_image_latents = self.encode_image(pixels * (mask_pixels < 0.5), generators)
        mask_latents = F.interpolate(mask_pixels, size=(h, w)).to(device, dtype).expand(batch, -1, -1, -1)
        return latents, InpaintingLatents(mask_latents, masked_image_latents, image_latents if blend else None,
                                          noise if blend else None)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae_tiling:
            return torch.cat([_decode_tiled(self.vae, z[i:i + 1], _TILE_LATENT) for i in range(len(z))])
        if self.vae_slicing:
            return torch.cat([self.vae.decode(z[i:i + 1]) for i in range(len(z))])
        return self.vae.decode(z)


class BatchSlicedUNet(nn.Module):
    """Runs a UNet on at most `slice_size` samples at a time: less activation memory, same predictions."""

    def __init__(self, unet: nn.Module, slice_size: int, config: Any):
        super().__init__()
        self.unet, self.slice_size, self.config = unet, slice_size, config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        n = self.slice_size
        return torch.cat([self.unet(sample[i:i + n], timestep, context[i:i + n]) for i in range(0, len(sample), n)])


_TILE_LATENT = 64  # VAE tiles of 64x64 latents (512 px for SD), overlapping by a quarter


def _decode_tiled(vae: nn.Module, z: torch.Tensor, tile: int) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps: memory of one tile, any image size."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return vae.decode(z)
    f = 2 ** (len(vae.config.ch_mult) - 1)
    overlap = tile // 4
    out = torch.zeros(z.shape[0], vae.config.out_ch, h * f, w * f, device=z.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=torch.float32)
    for top in _tile_starts(h, tile, tile - overlap):
        for left in _tile_starts(w, tile, tile - overlap):
            piece = vae.decode(z[..., top:top + tile, left:left + tile]).float()
            ramp = _ramp(piece.shape[-2], overlap * f, z.device)[:, None] * _ramp(piece.shape[-1], overlap * f,
                                                                                  z.device)[None, :]
            rows, cols = slice(top * f, top * f + piece.shape[-2]), slice(left * f, left * f + piece.shape[-1])
            out[..., rows, cols] += piece * ramp
            weight[..., rows, cols] += ramp
    return (out / weight).to(z.dtype)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Weights rising linearly over `overlap` pixels at both ends (never 0, so lone borders keep their tile)."""
    x = torch.arange(length, device=device, dtype=torch.float32)
    return torch.minimum(torch.ones_like(x), torch.minimum(x + 1, length - x) / (overlap + 1))


# ---------------------------------------------------------------- small helpers


class _StageClock:
    """Wall seconds per stage (the device synchronised at each end) and the CUDA peak allocation."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}
        self.start = time.perf_counter()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    @contextmanager
    def __call__(self, stage: str) -> Iterator[None]:
        begin = time.perf_counter()
        yield
        self._sync()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - begin

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def total(self) -> float:
        self._sync()
        return time.perf_counter() - self.start

    def peak_memory(self) -> int | None:
        return torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None


def _free_memory(device: torch.device) -> int | None:
    """Free bytes on the device: CUDA's own count, or MemAvailable of Linux's /proc/meminfo; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def _bundled_components(device: str | torch.device, dtype: torch.dtype) -> Components:
    """The bundled shapes model (diffusion_core.toy), trained on a CPU and shipped with the package."""
    from .toy import load_toy

    return load_toy(device=device, dtype=dtype)


def _sampler_name(sampler: str | SamplerType) -> str:
    try:
        return SamplerType(sampler).value
    except ValueError:
        valid = ", ".join(s.value for s in SamplerType)
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {valid} (or None for the checkpoint's "
                         f"own scheduler)") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_image(name: str, image: Any) -> None:
    if not isinstance(image, Image.Image):
        raise ValueError(f"{name} must be a PIL.Image.Image, got {type(image).__name__}; open files with "
                         f"PIL.Image.open(path)")


def _check_strength(strength: float, config: GenerationConfig, model: DiffusionModel) -> None:
    """strength in (0, 1], and at least one step left: int(steps · strength) >= 1."""
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength!r}")
    steps = config.num_inference_steps or model.config.default_steps
    if int(steps * strength) < 1:
        raise ValueError(f"strength {strength} of {steps} steps leaves int({steps} x {strength}) = 0 steps to run; "
                         f"raise strength or num_inference_steps")


__all__ = ["DiffusionModel", "GenerationConfig", "GeneratedImage", "DenoisingStep", "InpaintingLatents", "denoise",
           "timesteps_for_strength", "read_png_parameters", "QUALITY_PRESETS"]
