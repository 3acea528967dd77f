"""DiffusionModel: text-to-image, image-to-image and inpainting, step for step as diffusers does them.

The method (Rombach et al. 2022, arXiv:2112.10752, §3.3 and §4.3) in four lines: encode the prompt; draw
x_T ~ N(0, I) in the VAE's latent space; run `sampling.denoise`, which asks the UNet for ε (or v) at each
timestep, steers it with classifier-free guidance and lets the scheduler take one step; decode x_0 with the
VAE. This file is the bookkeeping around that loop: the seed rule, the conditioning each model family
needs, image and mask preparation, batching, timings. SDXL (Podell et al. 2023) is the same loop with more
conditioning (docs/sdxl.md), and its ensemble of experts hands the latents from the base to the refiner.

Seed rule: `seed=s` draws every random number (x_T, the VAE's posterior samples, the schedulers' noise)
from `torch.Generator("cpu").manual_seed(s)` in diffusers' order, so the image is the one diffusers
makes with that generator, on any device.
"""
from __future__ import annotations

import dataclasses
import logging
import secrets
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from .adapters.lora import LoraReport, LoraStack, file_sha256
from .control import ControlInput, Controls, check_controls
from .generation import GeneratedImage, GenerationConfig, DenoisingStep, read_png_parameters
from .guidance import is_guided
from .images import image_to_model_input, mask_to_model_input, tensor_to_pil
from .memory import TILE_LATENT, BatchSlicedUNet, decode_tiled, free_memory
from .models.text_encoder import token_pattern
from .models.vae import DiagonalGaussian
from .noise import randn
from .sampling import (Conditioning, ConditioningSchedule, InpaintingLatents, StepCallback, denoise,
                       timesteps_after_handover, timesteps_before_handover, timesteps_for_strength)
from .schedulers import (KARRAS_SAMPLERS, NoiseScheduler, make_scheduler, scheduler_class,
                         supports_karras_sigmas)
from .weighted_text import WeightedTextEncoder, merged_schedule, text_at

if TYPE_CHECKING:
    from .checkpoints.loader import Components

logger = logging.getLogger(__name__)

# quality -> (sampler, fraction of the model's default steps); None keeps the checkpoint's own sampler.
# DPM-Solver++(2M) reaches in 20 steps what first-order samplers reach in 50 (Lu et al. 2022, arXiv:2211.01095).
QUALITY_PRESETS = {"fast": ("dpmpp_2m", 0.4), "balanced": ("dpmpp_2m", 0.6), "high": (None, 1.0)}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}  # the commands' --dtype
# diffusers' defaults of `strength` (and inpainting's guidance) per pipeline: SDXL's img2img and inpaint differ
PIPELINE_DEFAULTS = {"sd": {"image_to_image": {"strength": 0.75}, "inpaint": {"strength": 1.0}},
                     "sdxl": {"image_to_image": {"strength": 0.3}, "inpaint": {"strength": 0.9999,
                                                                               "guidance_scale": 7.5}}}
# ... and of its ControlNet pipelines: image-to-image at 0.8, SDXL's inpainting at the model's guidance (5.0), and
# their controlnet_conditioning_scale (a ControlInput's scale None); an adapter's is always 1.0
CONTROL_DEFAULTS = {"sd": {"text_to_image": {"control_scale": 1.0},
                           "image_to_image": {"strength": 0.8, "control_scale": 0.8},
                           "inpaint": {"strength": 1.0, "control_scale": 0.5}},
                    "sdxl": {"text_to_image": {"control_scale": 1.0},
                             "image_to_image": {"strength": 0.8, "control_scale": 0.8},
                             "inpaint": {"strength": 0.9999, "control_scale": 1.0}}}


class DiffusionModel:
    """A Stable Diffusion checkpoint ready to generate: UNet, VAE, text encoder(s), default scheduler and config.

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
        self.loras = LoraStack(self)
        self.embeddings: dict[str, dict[str, str]] = {}  # token -> {"token", "file", "sha256"} of each loaded one
        self.vae_slicing = False
        self.vae_tiling = False
        self.unet_slice_size: int | None = None
        self.compiled = compile
        self._compiled_unet: nn.Module | None = None
        if not bundled and (device is not None or dtype is not None):
            self.to(device, dtype)
        self._upcast_vae()

    @classmethod
    def from_pretrained(cls, path: str | Path, original_config: str | Path | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                        prediction_type: str | None = None, compile: bool = False,
                        turbo: bool = False) -> DiffusionModel:
        """Load a diffusers folder or an original .safetensors / .ckpt file (see checkpoints.loader.load_components).

        Args:
            original_config: the LDM yaml of an SD 1.x / 2.x single file; without it the model is recognised.
            prediction_type: "epsilon" or "v_prediction", when the file alone cannot tell (SD 2.x).
            compile: see DiffusionModel.
            turbo: an SD-Turbo / SDXL-Turbo file: ε-prediction, then `use_turbo()` (a single file has no
                scheduler to say so).
        """
        from .checkpoints.loader import load_components

        components = load_components(path, original_config=original_config, device=device, dtype=dtype,
                                     prediction_type=prediction_type or ("epsilon" if turbo else None))
        model = cls(components, compile=compile)
        return model.use_turbo() if turbo else model

    def use_turbo(self) -> DiffusionModel:
        """Sample as the SD-Turbo and SDXL-Turbo model cards say (Sauer et al. 2023, adversarial diffusion
        distillation): Euler ancestral on "trailing" timesteps, 1 step by default (up to 4 work), no guidance, 512 px."""
        scheduler = {**self.config.scheduler, "timestep_spacing": "trailing"}
        self.config = dataclasses.replace(self.config, scheduler=scheduler, scheduler_name="euler_a", default_steps=1,
                                          default_guidance=0.0, native_size=512)
        self.scheduler = make_scheduler("euler_a", **scheduler)
        return self

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> DiffusionModel:
        for module in (self.unet, self.vae, self.text_encoder):
            module.to(device=device, dtype=dtype)
        self.loras.to(device, dtype)
        self._compiled_unet = None
        self._upcast_vae()
        return self

    def load_lora(self, path: str | Path, scale: float = 1.0, name: str | None = None,
                  strict: bool = True) -> LoraReport:
        """Merge a LoRA / LyCORIS file into the UNet and text encoder weights (adapters/lora.py); files stack.

        Args:
            path: a kohya / A1111 file (diffusers- or LDM-named), a diffusers or PEFT file (with its
                adapter_config.json beside it), LyCORIS LoCon / LoHa / LoKr, DoRA.
            scale: the strength s in W + s·ΔW.
            name: what `unload_lora` calls it; the file's stem by default.
            strict: a key that matches no weight refuses the whole file (nothing changes); False loads the
                rest and warns, naming the keys.
        Returns: what the file changed, network by network.
        """
        return self.loras.load(path, scale, name, strict)

    def unload_lora(self, name: str | None = None) -> None:
        """Take one LoRA (None: all) out of the weights; a weight no other file changes is restored bit for bit."""
        self.loras.unload(name)

    def load_textual_inversion(self, path: str | Path, token: str | None = None) -> str:
        """Add a textual-inversion embedding's word to the text encoder(s) (adapters/textual_inversion.py).

        Args:
            path: an A1111 .pt / .safetensors, a diffusers .bin / .safetensors, or an SDXL clip_l + clip_g file.
            token: the word prompts use; by default the file's stem (A1111, SDXL) or its one key (diffusers).
                It matches in any case and only as a whole word; a word CLIP knows or one already loaded is refused.
        Returns: the token.
        """
        from .adapters.textual_inversion import load_textual_inversion

        token = load_textual_inversion(self.text_encoder, path, token)
        self.embeddings[token] = {"token": token, "file": Path(path).name, "sha256": file_sha256(Path(path))}
        return token

    def _embeddings_used(self, config: GenerationConfig) -> list[dict[str, str]]:
        """The loaded embeddings whose token one of the config's texts uses (what A1111's "TI hashes" lists)."""
        texts = [t for t in (config.prompt, config.negative_prompt, config.prompt_2, config.negative_prompt_2) if t]
        return [e for token, e in self.embeddings.items() if any(token_pattern([token]).search(t) for t in texts)]

    def _upcast_vae(self) -> None:
        """SDXL's VAE overflows in fp16: it runs in fp32 on weights rounded to fp16, as diffusers' force_upcast."""
        if self.vae.config.force_upcast and next(self.vae.parameters()).dtype == torch.float16:
            self.vae.float()

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
        return (f"DiffusionModel({self.config.name!r}, {self.config.family}, {self.config.prediction_type}, sampler="
                f"{type(self.scheduler).__name__}, device={self.device}, dtype={self.dtype})")

    # ------------------------------------------------------------ public generation API

    def generate(self, config: GenerationConfig, *, control: list[ControlInput] | None = None,
                 guess_mode: bool = False, refiner: DiffusionModel | None = None, refiner_switch_at: float = 0.8,
                 callback: StepCallback | None = None, progress: bool = True,
                 return_intermediates: bool = False) -> GeneratedImage:
        """Text to image: diffusers' StableDiffusion(XL)Pipeline with generator=torch.Generator("cpu").manual_seed(seed).

        Args:
            control: ControlNets and T2I-Adapters with their images (control.py), as diffusers' StableDiffusion(XL)
                ControlNetPipeline / AdapterPipeline; width/height None then take the first control image's size,
                rounded down to a multiple of 8 (an adapter's: of its unshuffle factor).
            guess_mode: the ControlNets see the conditional half of the guided batch only (ControlNet §4.6).
            refiner: SDXL's ensemble of experts (eDiff-I; Podell et al. 2023, §2.5): this base model denoises the
                first `refiner_switch_at` of the schedule, the refiner the rest, the generators carrying on.
            callback: called after every step with (step index, t, x after the step, x̂0 predicted at t).
            progress: show a tqdm bar.
            return_intermediates: keep x and x̂0 of every step in the result's `intermediates`.
        """
        return self.generate_batch([config], control=control, guess_mode=guess_mode, refiner=refiner,
                                   refiner_switch_at=refiner_switch_at, callback=callback, progress=progress,
                                   return_intermediates=return_intermediates)[0]

    def generate_batch(self, configs: list[GenerationConfig], *, control: list[ControlInput] | None = None,
                       guess_mode: bool = False, refiner: DiffusionModel | None = None,
                       refiner_switch_at: float = 0.8, callback: StepCallback | None = None, progress: bool = True,
                       return_intermediates: bool = False) -> list[GeneratedImage]:
        """Several configs, those that share size, steps, guidance, sampler and text reading in one batch; image i
        equals generate(configs[i]), because each image draws from its own seeded generator. `control` steers
        every image."""
        if not isinstance(configs, (list, tuple)) or not all(isinstance(c, GenerationConfig) for c in configs):
            raise ValueError("generate_batch takes a list of GenerationConfig")
        control = self._check_control(control, guess_mode, "text_to_image")
        if refiner is not None:
            if control:
                raise ValueError("control= steers one model's denoising; with refiner= it would stop at the handover "
                                 "(diffusers has no such pipeline): generate with the base, then refine with "
                                 "refiner.image_to_image")
            self._check_refiner(refiner, refiner_switch_at)
        size = self._control_size(control) if control else self._native_size()
        resolved = [self._resolve(c, size, "text_to_image", refined=refiner is not None, controlled=bool(control))
                    for c in configs]
        groups: dict[tuple, list[int]] = {}
        for i, c in enumerate(resolved):
            key = (c.width, c.height, c.num_inference_steps, c.guidance_scale, c.guidance_rescale, c.sampler,
                   c.use_karras_sigmas, c.clip_skip, c.prompt_weighting,
                   self._chunk_count(c))  # a context as long as its own
            groups.setdefault(key, []).append(i)
        for indices in groups.values():  # every group fits, or nothing runs
            self._check_memory(resolved[indices[0]].width, resolved[indices[0]].height, len(indices))
        results: list[GeneratedImage | None] = [None] * len(configs)
        handover = (refiner, refiner_switch_at) if refiner is not None else None
        for indices in groups.values():
            batch = [resolved[i] for i in indices]
            if self.unet.config.in_channels == 9:  # an inpainting UNet draws on a blank canvas: mask all
                w, h = batch[0].width, batch[0].height
                outputs = self._run(batch, "text_to_image", Image.new("RGB", (w, h)), Image.new("L", (w, h), 255),
                                    1.0, callback, progress, return_intermediates, handover, control, guess_mode)
            else:
                outputs = self._run(batch, "text_to_image", None, None, 1.0, callback, progress,
                                    return_intermediates, handover, control, guess_mode)
            for i, output in zip(indices, outputs):
                results[i] = output
        return results

    def image_to_image(self, config: GenerationConfig, init_image: Image.Image, strength: float | None = None, *,
                       control: list[ControlInput] | None = None, guess_mode: bool = False,
                       callback: StepCallback | None = None, progress: bool = True,
                       return_intermediates: bool = False) -> GeneratedImage:
        """SDEdit (Meng et al. 2021, arXiv:2108.01073): noise the image to step int(n·strength), then denoise.

        As diffusers' StableDiffusion(XL)Img2ImgPipeline; width/height None keep the image's size, rounded down
        to a multiple of the VAE factor. A 9-channel inpainting checkpoint repaints everywhere (a white mask).
        The SDXL refiner used alone is this: image-to-image on a finished picture.

        Args:
            strength: in (0, 1]; 1 ignores the image's content, small values change little. None: diffusers'
                default, 0.75 (SD) or 0.3 (SDXL); with control 0.8 (its ControlNet img2img pipelines).
            control, guess_mode: as in `generate`; the control images are resized to the image's size.
        """
        _check_image("init_image", init_image)
        control = self._check_control(control, guess_mode, "image_to_image")
        strength = self._pipeline_default("image_to_image", "strength", strength, bool(control))
        _check_strength(strength, config, self)
        size = self._rounded_size(init_image.size)
        resolved = self._resolve(config, size, "image_to_image", controlled=bool(control))
        self._check_memory(resolved.width, resolved.height, 1)
        white = Image.new("L", (resolved.width, resolved.height), 255) if self.unet.config.in_channels == 9 else None
        return self._run([resolved], "image_to_image", init_image, white, strength, callback, progress,
                         return_intermediates, None, control, guess_mode)[0]

    def inpaint(self, config: GenerationConfig, image: Image.Image, mask: Image.Image, strength: float | None = None,
                *, control: list[ControlInput] | None = None, guess_mode: bool = False,
                callback: StepCallback | None = None, progress: bool = True,
                return_intermediates: bool = False) -> GeneratedImage:
        """Repaint where `mask` is white (>= 50% grey), keep where it is black, as diffusers'
        StableDiffusion(XL)InpaintPipeline: a 9-channel inpainting UNet sees the mask and the masked image; a
        4-channel UNet has the original (re-noised) pasted back outside the mask after every step.

        width/height None mean the model's native size, as in diffusers; image and mask are resized to it.
        strength None is diffusers' default: 1.0 (SD), 0.9999 (SDXL, which keeps a trace of the image).
        control, guess_mode: as in `generate`, as diffusers' StableDiffusion(XL)ControlNetInpaintPipeline, whose
        width/height None mean the image's size rounded down to a multiple of 8. An inpainting ControlNet reads
        `preprocess.inpaint_condition(image, mask)`.
        """
        _check_image("image", image)
        _check_image("mask", mask)
        control = self._check_control(control, guess_mode, "inpaint")
        strength = self._pipeline_default("inpaint", "strength", strength, bool(control))
        _check_strength(strength, config, self)
        size = self._rounded_size(image.size) if control else self._native_size()
        resolved = self._resolve(config, size, "inpaint", controlled=bool(control))
        self._check_memory(resolved.width, resolved.height, 1)
        return self._run([resolved], "inpaint", image, mask, strength, callback, progress, return_intermediates,
                         None, control, guess_mode)[0]

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
        configs = [GenerationConfig(p, negative_prompt=n) for p, n in zip(prompts, negative_prompts, strict=True)]
        return self._encode_text(configs, guided).context

    @torch.no_grad()
    def conditioning(self, configs: list[GenerationConfig], guided: bool) -> Conditioning:
        """Everything the UNet sees besides x_t and t for these configs, [negative; positive] when guided: the
        text context, and for SDXL the pooled embedding and the micro-conditioning time ids.

        The configs must be resolved (sizes filled in), as every GeneratedImage's `config` is.
        """
        text = self._encode_text(configs, guided)
        if self.config.text_2 is None:
            return text
        ids = [c.time_ids(aesthetic=self.config.family == "sdxl_refiner") for c in configs]
        positive = torch.tensor([p for p, _ in ids], device=self.device, dtype=self.dtype)  # (B, 6), refiner (B, 5)
        negative = torch.tensor([n for _, n in ids], device=self.device, dtype=self.dtype)
        return text.replace(time_ids=torch.cat([negative, positive]) if guided else positive)

    def _encode_text(self, configs: list[GenerationConfig], guided: bool) -> Conditioning | ConditioningSchedule:
        for name in ("clip_skip", "prompt_weighting"):
            values = {getattr(c, name) for c in configs}
            if len(values) > 1:
                raise ValueError(f"the configs of one batch must share {name}, got {sorted(values, key=str)}")
        skip = configs[0].clip_skip  # applied to the negative prompt too (diffusers skips on the positive prompt only)
        if configs[0].prompt_weighting:
            return self._encode_weighted(configs, guided)
        prompts = [c.prompt for c in configs]
        if self.config.text_2 is None:  # SD 1.x / 2.x: one CLIP, [negative; positive] in one pass
            texts = [c.negative_prompt for c in configs] + prompts if guided else prompts
            return Conditioning(self.text_encoder(texts, clip_skip=skip))
        # SDXL: bigG reads prompt_2 (the refiner, which has bigG only, reads prompt, as in diffusers)
        second = None if self.config.family == "sdxl_refiner" else [c.prompt_2 or c.prompt for c in configs]
        positive = Conditioning(*self.text_encoder(prompts, second, clip_skip=skip))
        if not guided:
            return positive
        negative_second = None if second is None else [c.negative_prompt_2 or c.negative_prompt for c in configs]
        negative = Conditioning(*self.text_encoder([c.negative_prompt for c in configs], negative_second,
                                                   clip_skip=skip))
        # SDXL base: no negative prompt means all-zero negative embeddings (its force_zeros_for_empty_prompt)
        zeros = torch.tensor([self._zero_negative(c) for c in configs], device=negative.context.device)
        negative = Conditioning(negative.context * ~zeros[:, None, None], negative.text_embeds * ~zeros[:, None])
        return Conditioning.guided(negative, positive)

    def _encode_weighted(self, configs: list[GenerationConfig], guided: bool) -> Conditioning | ConditioningSchedule:
        """prompt_weighting=True: A1111's syntax (weighted_text.py), the text changing at A1111's steps.

        Every row ([negatives; prompts] when guided) is padded to the batch's longest text in chunks, at any step.
        """
        encoder = WeightedTextEncoder(self.text_encoder, configs[0].clip_skip)
        schedules = self._text_schedules(configs, guided)
        n_chunks = encoder.chunk_count(schedules)
        zero = ([self._zero_negative(c) for c in configs] if guided else []) + [False] * len(configs)
        ends = sorted({end for schedule in schedules for end, _ in schedule})
        parts = []
        for end in ends:
            texts_now = [text_at(schedule, end) for schedule in schedules]
            parts.append(Conditioning.cat([_zeroed(encoder(texts, n_chunks)) if z else encoder(texts, n_chunks)
                                           for texts, z in zip(texts_now, zero)]))
        return parts[0] if len(parts) == 1 else ConditioningSchedule(ends, parts)

    def _text_schedules(self, configs: list[GenerationConfig],
                        guided: bool) -> list[list[tuple[int, tuple[str, ...]]]]:
        """Each row's texts (one per tower) over the steps: [negatives; prompts] when guided."""
        rows = ([self._tower_texts(c, negative=True) for c in configs] if guided else []) + \
            [self._tower_texts(c, negative=False) for c in configs]
        return [merged_schedule(texts, configs[0].num_inference_steps) for texts in rows]

    def _chunk_count(self, config: GenerationConfig) -> int:
        """The chunks of 77 tokens a resolved config's context takes: 1 unless it has prompt_weighting."""
        if not config.prompt_weighting:
            return 1
        schedules = self._text_schedules([config], is_guided(config.guidance_scale))
        return WeightedTextEncoder(self.text_encoder).chunk_count(schedules)

    def _zero_negative(self, config: GenerationConfig) -> bool:
        """SDXL base: no negative prompt means all-zero negative embeddings (its force_zeros_for_empty_prompt)."""
        return self.config.force_zeros_for_empty_prompt and not config.negative_prompt and not config.negative_prompt_2

    def _tower_texts(self, config: GenerationConfig, negative: bool) -> tuple[str, ...]:
        """The text each tower reads: SDXL's bigG reads prompt_2 (the refiner, bigG only, reads prompt)."""
        first = config.negative_prompt if negative else config.prompt
        if self.config.text_2 is None or self.config.family == "sdxl_refiner":
            return (first,)
        second = config.negative_prompt_2 if negative else config.prompt_2
        return first, second or first

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
        vae_dtype = next(self.vae.parameters()).dtype
        images = self._vae_decode(latents.to(vae_dtype) / self.vae.scaling_factor)
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

    def _rounded_size(self, size: tuple[int, int], multiple: int = 1) -> tuple[int, int]:
        """(width, height) rounded down to a multiple of the VAE factor (and of `multiple`), as diffusers does."""
        m = max(self.vae_scale_factor, multiple)
        return size[0] - size[0] % m, size[1] - size[1] % m

    def _control_size(self, control: list[ControlInput]) -> tuple[int, int]:
        """diffusers' ControlNet / Adapter pipelines: the size of the first control image, rounded down."""
        return self._rounded_size(control[0].size, max(c.size_multiple for c in control))

    def _check_control(self, control: list[ControlInput] | None, guess_mode: bool, mode: str) -> list[ControlInput]:
        """The controls checked against this model, each scale None set to diffusers' default for the pipeline."""
        if not isinstance(guess_mode, bool):
            raise ValueError(f"guess_mode must be True or False, got {guess_mode!r}")
        if control is not None:
            check_controls(control, self.unet, self.config.family)
        if not control:
            if guess_mode:
                raise ValueError("guess_mode=True changes how ControlNets are run; pass control=[ControlInput(...)]")
            return []
        controlnet_scale = self._pipeline_default(mode, "control_scale", None, True)
        return [c if c.scale is not None else dataclasses.replace(c, scale=1.0 if c.is_adapter else controlnet_scale)
                for c in control]

    def _pipeline_default(self, mode: str, name: str, value: Any, controlled: bool = False) -> Any:
        """`value`, or diffusers' default for this pipeline (its ControlNet one when `controlled`) and model family
        when it is None."""
        if value is not None:
            return value
        table = CONTROL_DEFAULTS if controlled else PIPELINE_DEFAULTS
        return table["sdxl" if self.config.text_2 else "sd"].get(mode, {}).get(name)

    def _resolve(self, config: GenerationConfig, default_size: tuple[int, int], mode: str = "text_to_image",
                 refined: bool = False, controlled: bool = False) -> GenerationConfig:
        """The config with every default filled in, checked against this model before any heavy work."""
        if not isinstance(config, GenerationConfig):
            raise ValueError(f"expected a GenerationConfig, got {type(config).__name__}")
        self._check_family_fields(config, refined)
        sampler = config.sampler or self._default_sampler_name()
        guidance = self._pipeline_default(mode, "guidance_scale", None, controlled) or self.config.default_guidance
        resolved = dataclasses.replace(
            config, width=config.width or default_size[0], height=config.height or default_size[1],
            num_inference_steps=config.num_inference_steps or self.config.default_steps,
            guidance_scale=guidance if config.guidance_scale is None else config.guidance_scale,
            seed=secrets.randbits(63) if config.seed is None else config.seed, sampler=sampler)
        if resolved.use_karras_sigmas is not None and not supports_karras_sigmas(sampler or self.config.scheduler_name):
            raise ValueError(f"use_karras_sigmas applies to the samplers {KARRAS_SAMPLERS}; {sampler!r} has its own "
                             f"σ schedule (set it to None)")
        f = self.vae_scale_factor
        if resolved.width % f or resolved.height % f:
            raise ValueError(f"width and height must be multiples of {f} (the VAE's downsampling factor), "
                             f"got {resolved.width}x{resolved.height}")
        if resolved.num_inference_steps > self.scheduler.config.num_train_timesteps:
            raise ValueError(f"num_inference_steps must be at most {self.scheduler.config.num_train_timesteps} "
                             f"(the training timesteps), got {resolved.num_inference_steps}")
        if self.config.text_2 is not None:  # SDXL's sizes default to the image's own (height, width)
            size = (resolved.height, resolved.width)
            resolved = dataclasses.replace(
                resolved, original_size=resolved.original_size or size,
                target_size=None if self.config.family == "sdxl_refiner" else resolved.target_size or size)
            resolved.time_ids(aesthetic=self.config.family == "sdxl_refiner")  # a ValueError for half-set negatives
        return resolved

    def _check_family_fields(self, config: GenerationConfig, refined: bool) -> None:
        """SDXL's fields only where a model reads them: never silently ignored."""
        family, fields = self.config.family, config.sdxl_fields()
        if family in ("sd1", "sd2") and fields:
            raise ValueError(f"{fields} are SDXL-only fields; this {family} model has no second text encoder and no "
                             f"micro-conditioning")
        aesthetic = [f for f in fields if f.endswith("aesthetic_score")]
        if family == "sdxl" and aesthetic and not refined:
            raise ValueError(f"{aesthetic} condition the SDXL refiner; pass refiner= or leave them at their defaults")
        if family == "sdxl_refiner":
            unread = [f for f in fields if f.endswith("target_size")] + (
                ["prompt_2"] if config.prompt_2 not in (None, config.prompt) else []) + (
                ["negative_prompt_2"] if config.negative_prompt_2 not in (None, config.negative_prompt) else [])
            if unread:
                raise ValueError(f"{unread} do not reach the refiner: its one text encoder (bigG) reads prompt and "
                                 f"negative_prompt, and its time ids are size, crop and aesthetic score")

    def _check_refiner(self, refiner: DiffusionModel, switch_at: float) -> None:
        if not isinstance(refiner, DiffusionModel) or refiner.config.text_2 is None or self.config.family != "sdxl":
            raise ValueError(f"refiner= hands an SDXL base's latents to an SDXL refiner; got a "
                             f"{self.config.family} model and {getattr(getattr(refiner, 'config', None), 'family', refiner)!r}")
        if isinstance(switch_at, bool) or not isinstance(switch_at, (int, float)) or not 0 < switch_at < 1:
            raise ValueError(f"refiner_switch_at must lie in (0, 1) (the share of the schedule the base denoises), "
                             f"got {switch_at!r}")

    def _default_sampler_name(self) -> str | None:
        """The SamplerType name of self.scheduler, when it is the checkpoint's own algorithm (it usually is)."""
        name = self.config.scheduler_name
        return name if type(self.scheduler) is scheduler_class(name) else None

    def _scheduler_for(self, config: GenerationConfig) -> NoiseScheduler:
        """The scheduler a resolved config samples with; use_karras_sigmas None keeps the checkpoint's σs."""
        if config.use_karras_sigmas is None:
            return self.make_scheduler(None if config.sampler == self._default_sampler_name() else config.sampler)
        return scheduler_class(config.sampler).from_config({**self.config.scheduler,
                                                            "use_karras_sigmas": config.use_karras_sigmas})

    def _check_memory(self, width: int, height: int, batch: int) -> None:
        """Refuse a size whose activations cannot fit in the device's free memory (a coarse lower bound)."""
        free = free_memory(self.device)
        if free is None:
            return
        element = torch.finfo(self.dtype).bits // 8
        f = self.vae_scale_factor
        # The UNet: its skips and feed-forward hold ~16 x model_channels values per latent pixel and sample.
        unet_batch = 2 * batch if self.unet_slice_size is None else min(self.unet_slice_size, 2 * batch)
        unet = unet_batch * (width // f) * (height // f) * self.unet.config.model_channels * 16 * element
        # The VAE decoder's full-resolution stage: ~8 buffers of ch channels per pixel alive at once.
        side = TILE_LATENT * f
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
             strength: float, callback: StepCallback | None, progress: bool, return_intermediates: bool,
             handover: tuple[DiffusionModel, float] | None = None, control: list[ControlInput] = (),
             guess_mode: bool = False) -> list[GeneratedImage]:
        """One batch of resolved configs sharing size, steps, guidance and sampler, in diffusers' order of draws
        (control images take none)."""
        first = configs[0]
        batch, width, height = len(configs), first.width, first.height
        scheduler = self._scheduler_for(first)
        guided = is_guided(first.guidance_scale)
        clock = _StageClock(self.device)

        with clock("text_encoding"):
            conditioning = self.conditioning(configs, guided)
        scheduler.set_timesteps(first.num_inference_steps, device=self.device)
        timesteps = scheduler.timesteps
        if image is not None:
            timesteps = timesteps_for_strength(scheduler, first.num_inference_steps, strength)
        if handover is not None:  # the base's share of an ensemble of experts (diffusers' denoising_end)
            timesteps = timesteps_before_handover(scheduler, timesteps, handover[1])
        generators = [torch.Generator("cpu").manual_seed(c.seed) for c in configs]  # the seed rule
        shape = (batch, self.vae.config.embed_dim, height // self.vae_scale_factor, width // self.vae_scale_factor)

        inpainting = None
        with clock("image_encoding"):
            if image is None:  # x_T ~ N(0, I), scaled to the scheduler's first noise level
                latents = randn(shape, generators, self.device, self.dtype) * scheduler.init_noise_sigma
            elif mask is None:  # image-to-image: the image's latents noised to the first timestep
                image_latents = self.encode_image(image_to_model_input(image, width, height), generators)
                noise = randn(shape, generators, self.device, self.dtype)
                latents = scheduler.add_noise(image_latents, noise, timesteps[:1].repeat(batch))
            else:
                latents, inpainting, channels = self._prepare_inpainting(image, mask, strength, scheduler, timesteps,
                                                                         generators, shape)
                if channels is not None:  # a 9-channel UNet sees the mask and the masked image in both passes
                    conditioning = conditioning.replace(inpainting=torch.cat([channels] * 2) if guided else channels)
        if control:
            with clock("control"):
                conditioning = conditioning.replace(control=Controls(
                    control, width, height, batch, guided, guess_mode, len(timesteps), first.num_inference_steps,
                    self.device))
        log = _StepLog(batch, callback, return_intermediates)
        with clock("denoising"):
            latents = denoise(self._sampling_unet(), scheduler, latents, conditioning, timesteps, first.guidance_scale,
                              first.guidance_rescale, generators, inpainting, log, progress)
        decoder, steps = self, log.stopped_after or len(timesteps)
        if handover is not None and log.stopped_after is None:
            decoder, switch_at = handover
            log.offset = steps
            latents, refined = decoder._refine(latents, configs, generators, switch_at, steps, clock, log, progress)
            steps = log.stopped_after or steps + refined
        with clock("decoding"):
            pictures = tensor_to_pil(decoder.decode_latents(latents))
        wall = clock.total()
        records = [c.record() for c in control]
        return [GeneratedImage(image=picture, prompt=c.prompt, config=c, seed=c.seed, generation_time=wall,
                               steps_taken=steps, timings=dict(clock.seconds), peak_memory=clock.peak_memory(),
                               mode=mode, strength=None if image is None or mode == "text_to_image" else strength,
                               model=self.config.name, intermediates=log.steps[k] if return_intermediates else None,
                               refiner=handover[0].config.name if handover else None,
                               refiner_switch_at=handover[1] if handover else None,
                               loras=[report.record() for report in self.loras.reports],
                               embeddings=self._embeddings_used(c), controls=records,
                               guess_mode=guess_mode, interrupted=log.stopped_after is not None)
                for k, (picture, c) in enumerate(zip(pictures, configs))]

    def _refine(self, latents: torch.Tensor, configs: list[GenerationConfig], generators: list[torch.Generator],
                switch_at: float, steps_before: int, clock: _StageClock, log: _StepLog,
                progress: bool) -> tuple[torch.Tensor, int]:
        """The refiner's share of an ensemble: diffusers' img2img with denoising_start=switch_at, which takes the
        base's latents as they are (no noise added) with its own conditioning, its prompt schedule counting on
        from the base's `steps_before` steps. Returns x_0 and the steps run."""
        first = configs[0]
        guided = is_guided(first.guidance_scale)
        scheduler = self._scheduler_for(first)
        with clock("text_encoding"):
            conditioning = self.conditioning(configs, guided).after(steps_before)
        scheduler.set_timesteps(first.num_inference_steps, device=self.device)
        timesteps = timesteps_after_handover(scheduler, switch_at)
        with clock("denoising"):
            latents = denoise(self._sampling_unet(), scheduler, latents.to(self.device, self.dtype), conditioning,
                              timesteps, first.guidance_scale, first.guidance_rescale, generators, None, log, progress)
        return latents, len(timesteps)

    def _prepare_inpainting(self, image: Image.Image, mask: Image.Image, strength: float, scheduler: NoiseScheduler,
                            timesteps: torch.Tensor, generators: list[torch.Generator], shape: tuple[int, ...]
                            ) -> tuple[torch.Tensor, InpaintingLatents | None, torch.Tensor | None]:
        """x_T, then what 4-channel inpainting pastes back or the 9 channels' extra 5, drawing from the generators
        in diffusers' order: the image's posterior (when needed), the noise, then the masked image's posterior."""
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
        if blend:
            return latents, InpaintingLatents(mask_latents, image_latents, noise), None
        return latents, None, torch.cat([mask_latents, masked_image_latents], dim=1)  # (B, 5, h, w)

    def _vae_decode(self, z: torch.Tensor) -> torch.Tensor:
        if self.vae_tiling:
            return torch.cat([decode_tiled(self.vae, z[i:i + 1]) for i in range(len(z))])
        if self.vae_slicing:
            return torch.cat([self.vae.decode(z[i:i + 1]) for i in range(len(z))])
        return self.vae.decode(z)


# ---------------------------------------------------------------- small helpers


class _StepLog:
    """The loop's callback: forwards each step to the user's and keeps DenoisingSteps when asked. Step numbers
    run on from the base into the refiner of an ensemble (`offset`)."""

    def __init__(self, batch: int, callback: StepCallback | None, keep: bool):
        self.callback, self.keep, self.offset = callback, keep, 0
        self.steps: list[list[DenoisingStep]] = [[] for _ in range(batch)]
        self.stopped_after: int | None = None  # the steps run when the callback stopped the loop

    def __call__(self, i: int, t: torch.Tensor, x: torch.Tensor, pred_x0: torch.Tensor) -> bool:
        i += self.offset
        if self.keep:
            for k, steps in enumerate(self.steps):
                steps.append(DenoisingStep(i, float(t), x[k].float().cpu(), pred_x0[k].float().cpu()))
        if self.callback is not None and self.callback(i, t, x, pred_x0):
            self.stopped_after = i + 1
        return self.stopped_after is not None


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


def _bundled_components(device: str | torch.device, dtype: torch.dtype) -> Components:
    """The bundled shapes model (diffusion_core.toy), trained on a CPU and shipped with the package."""
    from .toy import load_toy

    return load_toy(device=device, dtype=dtype)


def _zeroed(row: Conditioning) -> Conditioning:
    """All-zero text embeddings of the same shapes (SDXL's negative for an empty negative prompt)."""
    return Conditioning(torch.zeros_like(row.context), torch.zeros_like(row.text_embeds))


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


__all__ = ["DiffusionModel", "GenerationConfig", "GeneratedImage", "DenoisingStep", "InpaintingLatents",
           "Conditioning", "denoise", "timesteps_for_strength", "read_png_parameters", "QUALITY_PRESETS"]


def device_and_dtype(device: str | None, dtype: str | None) -> tuple[str, torch.dtype]:
    """The commands' --device and --dtype defaults: cuda when there is one, fp16 there and fp32 elsewhere."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, DTYPES[dtype] if dtype else (torch.float16 if device.startswith("cuda") else torch.float32)
