"""An A1111 request, turned into the DiffusionModel calls that make its images, and their answer in A1111's shape.

The translation is the whole contract: a request's images are `generate_batch` / `image_to_image` /
`inpaint` of the GenerationConfigs built here, with A1111's meanings: its prompt syntax (emphasis, BREAK,
editing: prompt_weighting=True), `seed: -1` drawn at random and image i seeded seed + i, `<lora:name:w>`
merged for the request, "Clip skip" = clip_skip + 1, and img2img's strength its `denoising_strength`.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from .. import a1111
from ..generation import GeneratedImage, GenerationConfig
from ..pipeline import DiffusionModel
from .a1111_masks import INPAINTING_FILL, paste_original, prepare_inpainting
from .models import Checkpoint, ModelStore
from .schemas import Img2Img, Options, Txt2Img, unsupported
from .security import Limits, RequestError, decode_image
from .worker import Task

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network syntax, <lora:name:weight>
ETA_OF = {"ddim": 0.0, "euler_a": 1.0}  # the η our samplers use where A1111 reads `eta`; elsewhere it reads none


@dataclass
class Job:
    """Everything the worker needs to make a request's images, decided before it is queued."""

    mode: str                                   # "text_to_image", "image_to_image" or "inpaint"
    configs: list[GenerationConfig]             # one per image, in order
    batch_size: int
    checkpoint: Checkpoint
    loras: list[tuple[str, Path, float]] = field(default_factory=list)  # (name, file, weight) from the prompt
    init_images: list[Image.Image] = field(default_factory=list)
    mask: Image.Image | None = None             # inpainting: A1111's blurred latent mask
    originals: list[Image.Image] = field(default_factory=list)  # inpainting: pasted back outside the mask
    strength: float | None = None
    infotext_extra: dict[str, Any] = field(default_factory=dict)

    @property
    def n_iter(self) -> int:
        return len(self.configs) // self.batch_size

    def steps_per_batch(self) -> int:
        """The steps each batch's loop runs (img2img: the last int(n·strength) of n)."""
        steps = self.configs[0].num_inference_steps
        return steps if self.strength is None else min(int(steps * self.strength), steps)

    def cache_key(self, store: ModelStore) -> str:
        """The result cache's key: the normalised request (every config, image and LoRA by content), the
        checkpoint's sha256 and the package version."""
        images = [hashlib.sha256(image.tobytes()).hexdigest()
                  for image in [*self.init_images, *self.originals, self.mask] if image is not None]
        loras = [(name, store.lora_sha256(path), weight) for name, path, weight in self.loras]
        normalised = {"mode": self.mode, "configs": [c.to_dict() for c in self.configs], "batch": self.batch_size,
                      "images": images, "strength": self.strength, "loras": loras, "extra": self.infotext_extra,
                      "checkpoint": self.checkpoint.sha256, "version": a1111.version()}
        return hashlib.sha256(json.dumps(normalised, sort_keys=True, default=str).encode()).hexdigest()


def build_job(request: Txt2Img, store: ModelStore, options: dict[str, Any], limits: Limits) -> Job:
    """The Job of a txt2img or img2img request; a RequestError names the first field that cannot be honoured."""
    problems = unsupported(request)
    if problems:
        raise RequestError(f"not supported by this server: {'; '.join(problems)}", status=400)
    limits.check(request.width, request.height, request.steps, request.batch_size, request.n_iter)
    settings = {**options, **option_changes(request.override_settings or {}, "override_settings")}
    checkpoint = store.find(settings["sd_model_checkpoint"])
    sampler, karras = _sampler(request)
    prompt, loras = _extra_networks(request, store)
    clip_skip = settings["CLIP_stop_at_last_layers"] - 1 or None
    seed = secrets.randbelow(2**32 - 1) if request.seed == -1 else request.seed  # A1111 draws below 2³² - 1
    try:
        configs = [GenerationConfig(prompt, request.negative_prompt, request.width, request.height, request.steps,
                                    request.cfg_scale, seed=seed + i, sampler=sampler, use_karras_sigmas=karras,
                                    clip_skip=clip_skip, prompt_weighting=True)
                   for i in range(request.batch_size * request.n_iter)]
    except ValueError as error:
        raise RequestError(str(error)) from None
    job = Job("text_to_image", configs, request.batch_size, checkpoint, loras)
    if isinstance(request, Img2Img):
        _add_images(job, request, limits)
    return job


def option_changes(values: dict[str, Any], field: str = "options") -> dict[str, Any]:
    """The settings `values` changes: only the allowlist of schemas.Options, each in its range."""
    unknown = sorted(set(values) - set(Options.model_fields))
    if unknown:
        raise RequestError(f"{field}: {unknown} are not settings of this server; it has "
                           f"{list(Options.model_fields)}", status=400)
    try:
        changes = Options(**values).model_dump(exclude_none=True)
    except ValueError as error:  # pydantic's: a value of the wrong type
        problem = error.errors()[0]
        raise RequestError(f"{field}: {problem['loc'][0]}: {problem['msg']}") from None
    if not 1 <= changes.get("CLIP_stop_at_last_layers", 1) <= 12:
        raise RequestError(f"{field}: CLIP_stop_at_last_layers must lie in 1..12 (A1111's Clip skip), got "
                           f"{changes['CLIP_stop_at_last_layers']}")
    return changes


def _sampler(request: Txt2Img) -> tuple[str, bool | None]:
    """Our sampler and Karras flag for A1111's sampler_name (or sampler_index) and scheduler; eta must be the
    one that sampler uses (A1111 reads it for DDIM and the ancestral samplers only)."""
    try:
        sampler, karras = a1111.parse_sampler(request.sampler_name or request.sampler_index, request.scheduler)
    except ValueError as error:
        raise RequestError(str(error), status=400) from None
    if request.eta is not None and sampler in ETA_OF and request.eta != ETA_OF[sampler]:
        raise RequestError(f"eta={request.eta:g}: this server's {a1111.sampler_name(sampler)} uses η = "
                           f"{ETA_OF[sampler]:g}; send eta {ETA_OF[sampler]:g} or leave it out", status=400)
    return sampler, karras


def _extra_networks(request: Txt2Img, store: ModelStore) -> tuple[str, list[tuple[str, Path, float]]]:
    """The prompt without its `<lora:name:weight>` tags, and the LoRAs they name (A1111 strips them likewise)."""
    if EXTRA_NETWORK.search(request.negative_prompt) and not request.disable_extra_networks:
        raise RequestError("negative_prompt: <lora:...> tags belong in the prompt", status=400)
    if request.disable_extra_networks:
        return request.prompt, []
    loras = []
    for kind, arguments in EXTRA_NETWORK.findall(request.prompt):
        name, *weights = arguments.split(":")
        if kind != "lora" or len(weights) > 1:
            raise RequestError(f"prompt: <{kind}:{arguments}>: this server reads <lora:name> and "
                               f"<lora:name:weight> only", status=400)
        try:
            weight = float(weights[0]) if weights else 1.0
        except ValueError:
            raise RequestError(f"prompt: <lora:{arguments}>: the weight must be a number") from None
        if any(name == loaded for loaded, _, _ in loras):
            raise RequestError(f"prompt: <lora:{name}> appears twice; give each LoRA once", status=400)
        loras.append((name, store.find_lora(name), weight))
    return EXTRA_NETWORK.sub("", request.prompt), loras


def _add_images(job: Job, request: Img2Img, limits: Limits) -> None:
    """img2img's init images, strength and (inpainting) mask, prepared as A1111 prepares them."""
    if not request.init_images:
        raise RequestError("init_images: img2img needs at least one image")
    if request.denoising_strength is None or not 0 < request.denoising_strength <= 1:
        raise RequestError(f"denoising_strength must lie in (0, 1], got {request.denoising_strength}")
    job.mode, job.strength = "image_to_image", request.denoising_strength
    job.init_images = [decode_image(f"init_images[{i}]", text, limits) for i, text in enumerate(request.init_images)]
    if request.mask is None:
        return
    if request.inpaint_full_res:
        raise RequestError("inpaint_full_res=True ('Only masked': inpaint a crop around the mask, then paste it "
                           "back) is not supported here; send inpaint_full_res false ('Whole picture')", status=400)
    mask = decode_image("mask", request.mask, limits)
    blur_x, blur_y = (request.mask_blur, request.mask_blur) if request.mask_blur is not None else (
        request.mask_blur_x, request.mask_blur_y)
    try:
        prepared = [prepare_inpainting(image, mask, blur_x, blur_y, request.inpainting_fill,
                                       request.inpainting_mask_invert, (request.width, request.height))
                    for image in job.init_images]
    except ValueError as error:
        raise RequestError(str(error), status=400) from None
    job.mode, job.mask = "inpaint", prepared[0].mask
    job.init_images, job.originals = [p.image for p in prepared], [p.original for p in prepared]
    job.infotext_extra = {"Mask blur": blur_x if blur_x == blur_y else None,
                          "Mask blur x": blur_x if blur_x != blur_y else None,
                          "Mask blur y": blur_y if blur_x != blur_y else None,
                          "Masked content": INPAINTING_FILL[request.inpainting_fill]}


def run_job(job: Job, model: DiffusionModel, task: Task) -> list[GeneratedImage]:
    """Make a job's images with the model of its checkpoint: batch by batch, stopping at the task's interrupt or
    skip. Runs where the model is: the worker thread, or a Ray replica."""
    merged = [model.load_lora(path, weight, name=name).name for name, path, weight in job.loras]
    try:
        results: list[GeneratedImage] = []
        for number in range(job.n_iter):
            if not task.start_batch(number, job.steps_per_batch()):
                break
            batch = job.configs[number * job.batch_size:(number + 1) * job.batch_size]
            common = {"callback": task.step_callback, "progress": False}
            if job.mode == "text_to_image":
                results += model.generate_batch(batch, **common)
                continue
            for config in batch:  # img2img and inpainting take one config at a time
                k = len(results) % len(job.init_images)
                if job.mode == "image_to_image":
                    results.append(model.image_to_image(config, job.init_images[k], job.strength, **common))
                else:
                    result = model.inpaint(config, job.init_images[k], job.mask, job.strength, **common)
                    result.image = paste_original(result.image, job.originals[k], job.mask)  # A1111's overlay
                    results.append(result)
                if task.interrupted.is_set() or task.skipped.is_set():
                    break
        return results
    finally:
        for name in merged:  # the cached model goes back to its own weights, bit for bit
            model.unload_lora(name)


def response(request: Txt2Img, job: Job, results: list[GeneratedImage], started: float) -> dict[str, Any]:
    """A1111's answer: base64 PNGs (each carrying its infotext), the request as `parameters`, `info` as JSON."""
    texts = [a1111.infotext(r, job.checkpoint.sha256, job.infotext_extra) for r in results]
    images = [_png_base64(r, job) for r in results] if request.send_images else []
    parameters = request.model_dump()
    if isinstance(request, Img2Img):  # A1111 does not echo the images back
        parameters.update(init_images=None, mask=None)
    first = results[0].config if results else job.configs[0]
    info = {"prompt": first.prompt, "all_prompts": [r.config.prompt for r in results],
            "negative_prompt": first.negative_prompt, "all_negative_prompts": [r.config.negative_prompt for r in results],
            "seed": first.seed, "all_seeds": [r.seed for r in results], "subseed": -1,
            "all_subseeds": [-1] * len(results), "subseed_strength": 0, "width": first.width, "height": first.height,
            "sampler_name": a1111.sampler_name(first.sampler), "scheduler": a1111.schedule_label(first.use_karras_sigmas),
            "cfg_scale": first.guidance_scale, "steps": first.num_inference_steps, "batch_size": job.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": job.checkpoint.model_name,
            "sd_model_hash": a1111.short_hash(job.checkpoint.sha256), "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": job.strength,
            "extra_generation_params": {k: v for k, v in job.infotext_extra.items() if v is not None},
            "index_of_first_image": 0, "infotexts": texts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S", time.localtime(started)),
            "clip_skip": (first.clip_skip or 0) + 1, "is_using_inpainting_conditioning": job.mode == "inpaint",
            "version": a1111.version(), "interrupted": any(r.interrupted for r in results)}
    return {"images": images, "parameters": parameters, "info": json.dumps(info)}


def _png_base64(result: GeneratedImage, job: Job) -> str:
    buffer = io.BytesIO()
    result.image.save(buffer, format="PNG", pnginfo=result.png_info(job.checkpoint.sha256, job.infotext_extra))
    return base64.b64encode(buffer.getvalue()).decode()


def png_info(image: Image.Image) -> dict[str, Any]:
    """POST /png-info: the infotext, every other text chunk, and the infotext parsed as A1111 parses it."""
    chunks = dict(getattr(image, "text", {}) or {})
    text = chunks.pop("parameters", None)
    return {"info": text or "", "items": chunks, "parameters": a1111.parse_infotext(text) if text else {}}

