"""AUTOMATIC1111's request bodies, field for field with its defaults (stable-diffusion-webui 1.10, modules/api).

Every field A1111 accepts is declared, so a client's request validates unchanged; an unknown field is a 422,
never dropped. Fields for features this library does not have (hires fix, face restoration, scripts...) are
accepted only at the value that leaves them off: `unsupported` names each one set otherwise, and the server
answers 400 instead of silently making a different image than the client asked for.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class Txt2Img(BaseModel):
    """POST /sdapi/v1/txt2img (A1111's StableDiffusionTxt2ImgProcessingAPI)."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] | None = None
    seed: int = -1
    subseed: int = -1
    subseed_strength: float = 0.0
    seed_resize_from_h: int = -1
    seed_resize_from_w: int = -1
    sampler_name: str | None = None
    scheduler: str | None = None
    sampler_index: str = "Euler"   # A1111's API default sampler, used when sampler_name is not given
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    do_not_save_samples: bool = False
    do_not_save_grid: bool = False
    eta: float | None = None
    denoising_strength: float | None = None  # txt2img: the hires fix's only
    s_min_uncond: float | None = None
    s_churn: float | None = None
    s_tmax: float | None = None
    s_tmin: float | None = None
    s_noise: float | None = None
    override_settings: dict[str, Any] | None = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str | None = None
    refiner_switch_at: float | None = None
    disable_extra_networks: bool = False
    firstpass_image: str | None = None
    comments: dict[str, Any] | None = None
    enable_hr: bool = False
    firstphase_width: int = 0
    firstphase_height: int = 0
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str | None = None
    hr_sampler_name: str | None = None
    hr_scheduler: str | None = None
    hr_prompt: str = ""
    hr_negative_prompt: str = ""
    force_task_id: str | None = None
    script_name: str | None = None
    script_args: list[Any] = []
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict[str, Any] = {}
    infotext: str | None = None


class Img2Img(Txt2Img):
    """POST /sdapi/v1/img2img (A1111's StableDiffusionImg2ImgProcessingAPI): with `mask`, inpainting."""

    init_images: list[str] | None = None
    resize_mode: int = 0
    denoising_strength: float | None = 0.75
    image_cfg_scale: float | None = None
    mask: str | None = None
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    mask_blur: int | None = None
    mask_round: bool = True
    inpainting_fill: int = 0
    inpaint_full_res: bool = True
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0
    initial_noise_multiplier: float | None = None
    latent_mask: str | None = None
    include_init_images: bool = False


class Options(BaseModel):
    """POST /sdapi/v1/options: the allowlist of settings this server has (A1111 accepts ~400 keys)."""

    model_config = ConfigDict(extra="forbid")

    sd_model_checkpoint: str | None = None
    CLIP_stop_at_last_layers: int | None = None  # A1111's "Clip skip": 1 = the last layer (our clip_skip None)


class PngInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str


# field -> (the values that leave its feature off, what it is); a field set to anything else is refused
OFF = {
    "styles": ((None, []), "prompt styles"),
    "subseed_strength": ((0,), "variation seeds"),
    "restore_faces": ((None, False), "face restoration"),
    "tiling": ((None, False), "tiling"),
    "s_min_uncond": ((None, 0), "negative guidance minimum sigma"),
    "s_churn": ((None, 0), "sampler churn"),
    "s_tmax": ((None, 0), "sampler churn"),
    "s_tmin": ((None, 0), "sampler churn"),
    "s_noise": ((None, 1), "sampler noise multiplier"),
    "refiner_checkpoint": ((None, "", "None"), "the refiner switch (A1111 1.6)"),
    "firstpass_image": ((None,), "a first-pass image for the hires fix"),
    "comments": ((None, {}), "infotext comments"),
    "enable_hr": ((False,), "the hires fix (upscale, then image-to-image: call img2img on the upscaled image)"),
    "script_name": ((None, ""), "scripts (no script endpoints: they run arbitrary code)"),
    "script_args": (([],), "scripts (no script endpoints: they run arbitrary code)"),
    "alwayson_scripts": (({},), "extensions' always-on scripts"),
    "save_images": ((False,), "saving on the server's disk (the response carries the images)"),
    "infotext": ((None, ""), "reading settings from an infotext"),
    "resize_mode": ((0,), "resize modes other than 0, 'Just resize'"),
    "initial_noise_multiplier": ((None, 1), "an initial noise multiplier"),
    "latent_mask": ((None,), "a separate latent mask"),
    "include_init_images": ((False,), "returning the init images"),
}


def unsupported(request: Txt2Img) -> list[str]:
    """The fields of `request` that ask for a feature this server does not have, each with what it is."""
    fields = request.model_dump()
    problems = [f"{name}={fields[name]!r} ({what})" for name, (off, what) in OFF.items()
                if name in fields and fields[name] not in off]
    if request.seed_resize_from_h > 0 or request.seed_resize_from_w > 0:
        problems.append("seed_resize_from_h/w > 0 (resizing a seed)")
    return problems
