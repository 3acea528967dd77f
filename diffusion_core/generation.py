"""What to generate and what came out: GenerationConfig, GeneratedImage and the parameters a PNG carries.

SDXL adds two kinds of fields, with diffusers' names, defaults and meaning: a second prompt for its second
text encoder, and the micro-conditioning of Podell et al. 2023 (arXiv:2307.01952), §2.2, where the UNet is told
the size of the image it was trained on, where that image was cropped, and (the refiner) its aesthetic score.
Sizes are (height, width) and crops (top, left), in pixels, as in diffusers.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from .a1111 import infotext
from .schedulers import SamplerType

PNG_KEY = "diffusion-core"  # PNG text chunk holding a GeneratedImage's parameters as JSON
MODES = ("text_to_image", "image_to_image", "inpaint")
SIZE_FIELDS = ("original_size", "target_size", "negative_original_size", "negative_target_size")
CROP_FIELDS = ("crops_coords_top_left", "negative_crops_coords_top_left")
SDXL_FIELDS = ("prompt_2", "negative_prompt_2", *SIZE_FIELDS, *CROP_FIELDS, "aesthetic_score", "negative_aesthetic_score")


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
    use_karras_sigmas: bool | None = None    # Karras et al. 2022 eq. 5 σs (euler, dpmpp_2m, unipc; A1111's "Karras"
                                             # schedule); None = as the checkpoint's scheduler config says
    clip_skip: int | None = None             # text-encoder blocks skipped before the one read, diffusers' meaning
                                             # (SD 1.x: 1 = the penultimate); A1111's "Clip skip" is this + 1
    prompt_weighting: bool = False           # read prompts in A1111's syntax: (word:1.3), [word], BREAK, [a:b:10],
                                             # [a|b], no 77-token limit (weighted_text.py); False = literal text
    # SDXL only (a ValueError on SD 1.x / 2.x):
    prompt_2: str | None = None              # the text for the second encoder (OpenCLIP bigG); None = prompt
    negative_prompt_2: str | None = None     # the negative text for bigG; None = negative_prompt
    original_size: tuple[int, int] | None = None  # (height, width) the image "was" before resizing; None = the size
    crops_coords_top_left: tuple[int, int] = (0, 0)  # (top, left) of the crop it "was" cut from; (0, 0) = uncropped
    target_size: tuple[int, int] | None = None     # (height, width) it was trained at; None = the size
    negative_original_size: tuple[int, int] | None = None  # the negative pass's; with negative_target_size
    negative_crops_coords_top_left: tuple[int, int] = (0, 0)
    negative_target_size: tuple[int, int] | None = None
    aesthetic_score: float = 6.0             # the refiner's: the aesthetic score the image should have
    negative_aesthetic_score: float = 2.5    # the refiner's negative pass: a low score to steer away from

    def __post_init__(self):
        for name in ("prompt", "negative_prompt", "prompt_2", "negative_prompt_2"):
            value = getattr(self, name)
            if not isinstance(value, str) and not (value is None and name.endswith("_2")):
                raise ValueError(f"prompt and negative_prompt must be strings, got {name}={value!r}; use "
                                 f"generate_batch for several prompts")
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
        if self.use_karras_sigmas not in (None, True, False):
            raise ValueError(f"use_karras_sigmas must be True, False or None (the checkpoint's), "
                             f"got {self.use_karras_sigmas!r}")
        if self.clip_skip is not None and (not _is_int(self.clip_skip) or self.clip_skip < 1):
            raise ValueError(f"clip_skip must be an integer >= 1 (diffusers' meaning: 1 reads SD 1.x's penultimate "
                             f"layer, A1111's 'Clip skip 2') or None, got {self.clip_skip!r}")
        if not isinstance(self.prompt_weighting, bool):
            raise ValueError(f"prompt_weighting must be True (A1111's prompt syntax) or False (literal text), "
                             f"got {self.prompt_weighting!r}")
        for name in SIZE_FIELDS + CROP_FIELDS:  # JSON gives lists
            object.__setattr__(self, name, _pair(name, getattr(self, name), minimum=0 if name in CROP_FIELDS else 1))
        for name in ("aesthetic_score", "negative_aesthetic_score"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise ValueError(f"{name} must be a number (the refiner was trained on scores 0-10), "
                                 f"got {getattr(self, name)!r}")

    def sdxl_fields(self) -> list[str]:
        """The SDXL-only fields this config sets to something other than their default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [name for name in SDXL_FIELDS if getattr(self, name) != defaults[name]]

    def time_ids(self, aesthetic: bool) -> tuple[list[float], list[float]]:
        """SDXL's micro-conditioning ids (Podell et al. 2023, §2.2) for the conditional and the negative pass.

        Base: (original h, w, crop top, left, target h, w); the negative pass uses the negative_* triple when
        both negative sizes are set, else the conditional ids (diffusers' StableDiffusionXLPipeline).
        Refiner (`aesthetic`): (original h, w, crop top, left, aesthetic score) and (negative_original_size or
        original_size, negative crop, negative score), as diffusers' StableDiffusionXLImg2ImgPipeline.
        original_size and target_size must be filled in (DiffusionModel does: the image's size).
        """
        if aesthetic:
            negative_original = self.negative_original_size or self.original_size
            return ([*self.original_size, *self.crops_coords_top_left, self.aesthetic_score],
                    [*negative_original, *self.negative_crops_coords_top_left, self.negative_aesthetic_score])
        positive = [*self.original_size, *self.crops_coords_top_left, *self.target_size]
        sizes = (self.negative_original_size, self.negative_target_size)
        if sizes == (None, None):
            if self.negative_crops_coords_top_left != (0, 0):
                raise ValueError("negative_crops_coords_top_left applies together with negative_original_size and "
                                 "negative_target_size; set both (diffusers ignores it otherwise)")
            return positive, positive
        if None in sizes:
            raise ValueError("set negative_original_size and negative_target_size together, or neither (then the "
                             "negative pass takes the conditional sizes, as in diffusers)")
        return positive, [*sizes[0], *self.negative_crops_coords_top_left, *sizes[1]]

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
    refiner: str | None = None   # SDXL ensemble of experts: the refiner's name
    refiner_switch_at: float | None = None  # and the fraction of the schedule after which it took over
    loras: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # LoraReport.record() of each LoRA loaded
    embeddings: list[dict[str, str]] = dataclasses.field(default_factory=list)  # {token, file, sha256} of each
                                                                                # embedding the prompts use
    controls: list[dict[str, Any]] = dataclasses.field(default_factory=list)  # ControlInput.record() of each
    guess_mode: bool = False                 # the ControlNets saw the conditional half only
    interrupted: bool = False                # the callback stopped the loop early: the image is that step's x̂0

    def parameters(self) -> dict[str, Any]:
        """What the PNG text chunk records: the config, the mode, the model (and refiner)."""
        refiner = {"refiner": self.refiner, "refiner_switch_at": self.refiner_switch_at} if self.refiner else {}
        loras = {"loras": self.loras} if self.loras else {}
        embeddings = {"embeddings": self.embeddings} if self.embeddings else {}
        controls = {"controls": self.controls, "guess_mode": self.guess_mode} if self.controls else {}
        interrupted = {"interrupted": True} if self.interrupted else {}
        return {**self.config.to_dict(), "mode": self.mode, "strength": self.strength, "model": self.model,
                "steps_taken": self.steps_taken, **refiner, **loras, **embeddings, **controls, **interrupted}

    def png_info(self, model_hash: str | None = None, extra: dict[str, Any] | None = None) -> PngImagePlugin.PngInfo:
        """The PNG text chunks: parameters() as JSON, and A1111's infotext that other SD tools read (with the
        checkpoint's sha256 as its "Model hash" and `extra` keys, when given)."""
        info = PngImagePlugin.PngInfo()
        info.add_text(PNG_KEY, json.dumps(self.parameters()))
        info.add_text("parameters", infotext(self, model_hash, extra))
        return info

    def save(self, path: str | Path, overwrite: bool = False) -> Path:
        """Write a PNG carrying parameters() in its text chunk; an existing file is an error unless overwrite."""
        path = Path(path)
        with open(path, "wb" if overwrite else "xb") as file:  # "x": never replace an existing image
            self.image.save(file, format="PNG", pnginfo=self.png_info())
        return path


def read_png_parameters(path: str | Path) -> dict[str, Any]:
    """The parameters a diffusion-core PNG carries; a ValueError if it carries none."""
    with Image.open(path) as image:
        text = image.text.get(PNG_KEY) if hasattr(image, "text") else None
    if text is None:
        raise ValueError(f"{path}: no {PNG_KEY!r} text chunk; only PNGs written by diffusion-core carry one")
    return json.loads(text)


def _sampler_name(sampler: str | SamplerType) -> str:
    try:
        return SamplerType(sampler).value
    except ValueError:
        valid = ", ".join(s.value for s in SamplerType)
        raise ValueError(f"unknown sampler {sampler!r}; choose one of: {valid} (or None for the checkpoint's "
                         f"own scheduler)") from None


def _pair(name: str, value: Any, minimum: int) -> tuple[int, int] | None:
    """A (height, width) or (top, left) pair of integers >= minimum, from a tuple or a JSON list."""
    if value is None and name in SIZE_FIELDS:
        return None
    if not isinstance(value, (tuple, list)) or len(value) != 2 or not all(_is_int(v) and v >= minimum for v in value):
        what = "(top, left)" if name in CROP_FIELDS else "(height, width)"
        raise ValueError(f"{name} must be a pair {what} of integers >= {minimum}, got {value!r}")
    return tuple(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
