"""What a Stable Diffusion checkpoint is: its three networks' architectures, its noise schedule and defaults.

The presets are the released models, so a single file (which carries no config) loads with no network:
LDM's v1-inference.yaml (SD 1.x), v2-inference(-v).yaml (SD 2.x) and the two inpainting yamls, sgm's
sd_xl_base.yaml and sd_xl_refiner.yaml (SDXL), with the scheduler each model's diffusers folder ships.
An SDXL file's architecture is read from its weights alone (`sdxl_config_from_weights`).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import open_clip

from ..models.text_encoder import SD1_TEXT, SD2_TEXT, SDXL_CLIP_G, SDXL_CLIP_L, TextEncoderConfig
from ..models.unet import (SD2_INPAINT_UNET, SD15_INPAINT_UNET, SD15_UNET, SD21_UNET, SDXL_BASE_UNET,
                           SDXL_INPAINT_UNET, SDXL_REFINER_UNET, UNetConfig)
from ..models.vae import SD_VAE, SDXL_VAE, VAEConfig
from ..schedulers import SamplerType

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sd_scheduler_config(prediction_type: str = "epsilon", beta_start: float = 0.00085, beta_end: float = 0.012,
                        num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The scheduler_config.json of SD's published folders (no timestep_spacing: each algorithm's default)."""
    return {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
            "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "set_alpha_to_one": False,
            "skip_prk_steps": True, "clip_sample": False, "prediction_type": prediction_type}


def sdxl_scheduler_config(prediction_type: str = "epsilon") -> dict[str, Any]:
    """stable-diffusion-xl-base-1.0's scheduler_config.json (Euler, "leading" timesteps; the refiner's is the same)."""
    return {**sd_scheduler_config(prediction_type), "timestep_spacing": "leading", "interpolation_type": "linear",
            "use_karras_sigmas": False, "sample_max_value": 1.0}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a checkpoint's models and sample from them like its diffusers pipeline."""

    name: str                      # a label: the preset's name, or the file / folder it was loaded from
    unet: UNetConfig               # the noise predictor
    vae: VAEConfig                 # the autoencoder, scaling factor included
    text: TextEncoderConfig | None  # the CLIP text encoder (SDXL: ViT-L; None for the refiner), layer and pad token
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (ε) or "v_prediction" (v)
    native_size: int = 512         # image side the model was trained at, in pixels
    scheduler: dict[str, Any] = field(default_factory=sd_scheduler_config)  # diffusers-style scheduler config
    scheduler_name: str = "pndm"   # the default sampler: "pndm" for SD 1.x, "ddim" for SD 2.x, as their folders ship
    default_steps: int = 50        # num_inference_steps of the diffusers pipeline's __call__
    default_guidance: float = 7.5  # guidance_scale of the diffusers pipeline's __call__
    text_2: TextEncoderConfig | None = None  # SDXL: OpenCLIP ViT-bigG, the second context and the pooled embedding
    force_zeros_for_empty_prompt: bool = False  # SDXL base: an empty negative prompt is all-zero embeddings

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        SamplerType(self.scheduler_name)  # a ValueError names the valid samplers
        # prediction_type is the one source of truth: the scheduler config always carries it
        object.__setattr__(self, "scheduler", {**self.scheduler, "prediction_type": self.prediction_type})
        if self.text is None and self.text_2 is None:
            raise ValueError("a ModelConfig needs a text encoder: text, text_2 (SDXL) or both")
        if self.text_2 is not None:
            pooled, ids = self.text_2.projection_dim or 0, 5 if self.text is None else 6
            if self.unet.adm_in_channels != pooled + ids * self.unet.time_id_dim:
                raise ValueError(f"an SDXL{' refiner' if ids == 5 else ''} UNet takes the pooled text ({pooled}) and "
                                 f"{ids} time ids x {self.unet.time_id_dim} = {pooled + ids * self.unet.time_id_dim} "
                                 f"added values, but this one's label_emb takes {self.unet.adm_in_channels}")

    @property
    def family(self) -> str:
        """"sd1" (OpenAI CLIP, QuickGELU), "sd2" (OpenCLIP ViT-H, GELU), "sdxl" (both CLIPs; base, inpainting,
        Turbo) or "sdxl_refiner" (bigG only, with an aesthetic score among its time ids)."""
        if self.text_2 is not None:
            return "sdxl" if self.text is not None else "sdxl_refiner"
        return "sd1" if self.text.activation == "quick_gelu" else "sd2"


SD15 = ModelConfig("sd15", SD15_UNET, SD_VAE, SD1_TEXT)
# 768-v overflows fp16 attention without the fp32 upcast (its folder turns it on); base does not need it
SD21_BASE = ModelConfig("sd21-base", replace(SD21_UNET, upcast_attention=False), SD_VAE, SD2_TEXT,
                        scheduler_name="ddim")
SD21_768V = ModelConfig("sd21-768-v", SD21_UNET, SD_VAE, SD2_TEXT, prediction_type="v_prediction", native_size=768,
                        scheduler_name="ddim")
SD15_INPAINT = ModelConfig("sd15-inpaint", SD15_INPAINT_UNET, SD_VAE, SD1_TEXT)
SD2_INPAINT = ModelConfig("sd2-inpaint", SD2_INPAINT_UNET, SD_VAE, SD2_TEXT, scheduler_name="ddim")
SDXL_BASE = ModelConfig("sdxl-base", SDXL_BASE_UNET, SDXL_VAE, SDXL_CLIP_L, native_size=1024,
                        scheduler=sdxl_scheduler_config(), scheduler_name="euler", default_guidance=5.0,
                        text_2=SDXL_CLIP_G, force_zeros_for_empty_prompt=True)
SDXL_REFINER = replace(SDXL_BASE, name="sdxl-refiner", unet=SDXL_REFINER_UNET, text=None,
                       force_zeros_for_empty_prompt=False)
SDXL_INPAINT = replace(SDXL_BASE, name="sdxl-inpaint", unet=SDXL_INPAINT_UNET)
PRESETS = {c.name: c for c in (SD15, SD21_BASE, SD21_768V, SD15_INPAINT, SD2_INPAINT)}  # LDM's yamls
SDXL_PRESETS = {c.name: c for c in (SDXL_BASE, SDXL_REFINER, SDXL_INPAINT)}  # sgm's

# The text towers LDM's embedders build when the yaml names none: FrozenCLIPEmbedder loads OpenAI's ViT-L/14,
# FrozenOpenCLIPEmbedder open_clip's ViT-H-14.
DEFAULT_TOWER = {"sd1": "ViT-L-14", "sd2": "ViT-H-14"}
SDXL_BIG_TOWER = "ViT-bigG-14"  # FrozenOpenCLIPEmbedder2's arch in sgm's SDXL yamls
# SD1 uses OpenAI CLIP (QuickGELU, pads with <|endoftext|>); SD2 OpenCLIP (GELU, pads with "!" = 0).
TEXT_STYLE = {"sd1": SD1_TEXT, "sd2": SD2_TEXT}
_BLOCK = re.compile(r"(?:encoder\.layers|transformer\.resblocks)\.(\d+)\.")


def text_config_from_weights(family: str, shapes: Mapping[str, tuple[int, ...]], layer: str = "last",
                             tower: str | None = None) -> TextEncoderConfig:
    """The text encoder a file's weights hold, read at `layer` ("last" or "penultimate") of its tower.

    Width, depth, vocabulary and context length come from the weights; heads = width / 64 as in every
    released CLIP. "penultimate" counts from the tower's full depth (ViT-H-14: 24), not from the blocks
    the file holds: diffusers' SD2 exports drop the never-used last block, and still read block 23.

    Args:
        family: "sd1" (transformers layout, `text_model.` optional) or "sd2" (open_clip layout).
        shapes: the text encoder's keys (file prefix removed) and shapes.
        tower: open_clip's name of the tower; its depth counts only if its width is the weights'.
    """
    if layer not in ("last", "penultimate"):
        raise ValueError(f"text encoder layer {layer!r} is not supported; use 'last' or 'penultimate'")
    token_key, position_key = ("token_embedding.weight", "positional_embedding") if family == "sd2" else (
        "embeddings.token_embedding.weight", "embeddings.position_embedding.weight")
    shapes = {k.removeprefix("text_model."): s for k, s in shapes.items()}
    blocks = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK.match(k))), default=-1)
    if token_key not in shapes or position_key not in shapes or blocks == 0:
        raise ValueError(f"no {family} text encoder here: expected {token_key!r}, {position_key!r} and "
                         f"numbered blocks, found {sorted(shapes)[:5]}")
    vocab_size, width = shapes[token_key]
    if width % 64:
        raise ValueError(f"text encoder width {width} is not a multiple of 64 (heads = width / 64)")
    tower_config = open_clip.get_model_config(tower or DEFAULT_TOWER[family]) or {}
    tower_text = tower_config.get("text_cfg", {})
    full_depth = tower_text["layers"] if tower_text.get("width") == width and tower_text["layers"] >= blocks else blocks
    used = full_depth - (layer == "penultimate")
    if used > blocks:
        raise ValueError(f"the {layer} layer of a {full_depth}-block text encoder is block {used}, "
                         f"but the weights hold only {blocks} blocks")
    return replace(TEXT_STYLE[family], width=width, layers=blocks, heads=width // 64, layer_index=used - blocks - 1,
                   vocab_size=vocab_size, context_length=shapes[position_key][0])


def text_layer_name(text: TextEncoderConfig) -> tuple[str, str | None]:
    """(layer, tower) as an LDM yaml states them for this text encoder; the inverse of text_config_from_weights."""
    family = "sd1" if text.activation == "quick_gelu" else "sd2"
    tower = DEFAULT_TOWER[family]
    tower_text = (open_clip.get_model_config(tower) or {}).get("text_cfg", {})
    matches_tower = tower_text.get("width") == text.width and tower_text["layers"] >= text.layers
    full_depth = tower_text["layers"] if matches_tower else text.layers
    used = text.layers + text.layer_index + 1
    layer = {full_depth: "last", full_depth - 1: "penultimate"}.get(used)
    if layer is None or (family == "sd1" and layer != "last"):
        raise ValueError(f"text encoder reads block {used} of {full_depth}; an LDM yaml can state only the last "
                         f"block{'' if family == 'sd1' else ' or the penultimate one'} for {family}")
    return layer, tower if matches_tower else None


def config_from_weights(unet_shapes: Mapping[str, tuple[int, ...]], text_family: str,
                        text_shapes: Mapping[str, tuple[int, ...]], global_step: int | None = None,
                        prediction_type: str | None = None) -> ModelConfig:
    """Recognise SD 1.x, SD 2.x (base or 768-v) and their inpainting models from a file's shapes alone.

    SD2 base and SD2 768-v have identical weights; unless `prediction_type` says which, we guess as
    diffusers does (single_file_utils.py): 768-v, unless the file's global_step is 875000, the step
    of 512-base-ema.ckpt. The guess is logged as a warning.

    Args:
        unet_shapes: the UNet's keys (without `model.diffusion_model.`) and shapes.
        text_family: "sd1" for a transformers-layout text encoder in the file, "sd2" for an open_clip one.
        prediction_type: "epsilon" or "v_prediction" to choose, None to guess.
    """
    first_conv, to_k = "input_blocks.0.0.weight", "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    if first_conv not in unet_shapes or to_k not in unet_shapes:
        raise ValueError(f"UNet weights lack {first_conv!r} or {to_k!r}: not an SD 1.x / 2.x UNet")
    in_channels, context_dim = unet_shapes[first_conv][1], unet_shapes[to_k][1]
    family = {768: "sd1", 1024: "sd2"}.get(context_dim)
    if family is None or in_channels not in (4, 9):
        raise ValueError(f"a UNet with {in_channels} input channels and context width {context_dim} is neither "
                         f"SD 1.x (768) nor SD 2.x (1024) with 4 (txt2img) or 9 (inpainting) input channels; "
                         f"pass original_config= with its LDM yaml")
    if family != text_family:
        raise ValueError(f"the UNet is {family} (context width {context_dim}) but the text encoder is {text_family}")
    if in_channels == 9:
        preset = SD15_INPAINT if family == "sd1" else SD2_INPAINT
    elif family == "sd1":
        preset = SD15
    elif prediction_type is not None:
        preset = SD21_768V if prediction_type == "v_prediction" else SD21_BASE
    else:
        preset = SD21_BASE if global_step == 875000 else SD21_768V
        logger.warning("SD 2.x weights with global_step=%s: guessing %s (%s); pass prediction_type=%r if wrong",
                       global_step, preset.prediction_type, preset.name,
                       "v_prediction" if preset is SD21_BASE else "epsilon")
    if prediction_type is not None and preset.prediction_type != prediction_type:
        preset = replace(preset, prediction_type=prediction_type)
    text = text_config_from_weights(family, text_shapes, layer="last" if family == "sd1" else "penultimate")
    return replace(preset, text=text)


# ---------------------------------------------------------------- SDXL, recognised from the weights


def sdxl_config_from_weights(unet_shapes: Mapping[str, tuple[int, ...]], vae_shapes: Mapping[str, tuple[int, ...]],
                             clip_l_shapes: Mapping[str, tuple[int, ...]] | None,
                             clip_g_shapes: Mapping[str, tuple[int, ...]], prediction_type: str = "epsilon",
                             name: str = "sdxl") -> ModelConfig:
    """An SDXL base, inpainting, Turbo or refiner file's architecture from its shapes, with SDXL's defaults.

    What the shapes cannot tell is SDXL's everywhere: 64 channels per attention head, 32 GroupNorm groups,
    256-wide time-id embeddings, the VAE scale 0.13025 and the base's scheduler.

    Args:
        unet_shapes, vae_shapes: the UNet's and the VAE's keys (file prefixes removed) and shapes.
        clip_l_shapes: OpenAI CLIP ViT-L's, transformers layout (None for the refiner); clip_g_shapes: bigG's, open_clip's.
    """
    clip_l = None if clip_l_shapes is None else replace(
        text_config_from_weights("sd1", clip_l_shapes, layer="penultimate"), final_norm=False)
    if "text_projection" not in clip_g_shapes:
        raise ValueError("the OpenCLIP bigG text encoder lacks text_projection, which gives SDXL's pooled embedding")
    clip_g = replace(text_config_from_weights("sd2", clip_g_shapes, layer="penultimate", tower=SDXL_BIG_TOWER),
                     final_norm=False, projection_dim=clip_g_shapes["text_projection"][1])
    preset = SDXL_BASE if clip_l is not None else SDXL_REFINER
    return replace(preset, name=name, unet=sdxl_unet_config_from_weights(unet_shapes), vae=vae_config_from_weights(
        vae_shapes, SDXL_VAE), text=clip_l, text_2=clip_g, prediction_type=prediction_type)


def _count(shapes: Mapping[str, tuple[int, ...]], pattern: str) -> int:
    """How many consecutive indices i from 0 have a key starting with pattern.format(i)."""
    i = 0
    while any(k.startswith(pattern.format(i)) for k in shapes):
        i += 1
    return i


def encoder_from_weights(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The UNet fields its down path's keys (LDM names) show: widths, levels, ResBlocks, transformer depths,
    context width and the kind of proj_in; what they cannot show (heads, out channels) is the caller's."""
    if "input_blocks.0.0.weight" not in shapes:
        raise ValueError("weights lack 'input_blocks.0.0.weight': not a UNet or ControlNet in LDM's layout")
    model_channels, in_channels = shapes["input_blocks.0.0.weight"][:2]
    levels, depths, blocks = [[]], [], 1  # levels: the output width of each ResBlock, grouped by level
    while {f"input_blocks.{blocks}.0.in_layers.2.weight", f"input_blocks.{blocks}.0.op.weight"} & shapes.keys():
        if f"input_blocks.{blocks}.0.op.weight" in shapes:  # a Downsample ends the level
            levels.append([])
        else:
            levels[-1].append(shapes[f"input_blocks.{blocks}.0.in_layers.2.weight"][0])
            depths.append((len(levels) - 1, _count(shapes, f"input_blocks.{blocks}.1.transformer_blocks.{{}}.")))
        blocks += 1
    per_level = {len(widths) for widths in levels}
    level_depths = [{d for level, d in depths if level == i} for i in range(len(levels))]
    if len(per_level) != 1 or any(len(d) != 1 or len(set(w)) != 1 for d, w in zip(level_depths, levels)):
        raise ValueError("UNet weights: every level must have the same number of ResBlocks, one width and one "
                         "transformer depth")
    depth = tuple(d.pop() for d in level_depths)
    to_k = next((s for k, s in shapes.items() if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((s for k, s in shapes.items() if k.endswith(".proj_in.weight")), None)
    if to_k is None or proj_in is None:
        raise ValueError("UNet weights have no cross-attention (attn2.to_k, proj_in): not a text-conditioned UNet")
    return dict(in_channels=in_channels, model_channels=model_channels,
                channel_mult=tuple(w[0] // model_channels for w in levels), num_res_blocks=per_level.pop(),
                attention_resolutions=tuple(2 ** i for i, d in enumerate(depth) if d), context_dim=to_k[1],
                use_linear_in_transformer=len(proj_in) == 2, transformer_depth=depth,
                transformer_depth_middle=_count(shapes, "middle_block.1.transformer_blocks.{}."))


def sdxl_unet_config_from_weights(shapes: Mapping[str, tuple[int, ...]]) -> UNetConfig:
    """An SDXL-style UNet (label_emb, Linear proj_in, 64-channel heads) from its keys: levels, widths and depths."""
    for key in ("input_blocks.0.0.weight", "out.2.weight", "label_emb.0.0.weight"):
        if key not in shapes:
            raise ValueError(f"UNet weights lack {key!r}: not an SDXL UNet")
    return UNetConfig(**encoder_from_weights(shapes), out_channels=shapes["out.2.weight"][0], num_head_channels=64,
                      adm_in_channels=shapes["label_emb.0.0.weight"][1])


def vae_config_from_weights(shapes: Mapping[str, tuple[int, ...]], preset: VAEConfig) -> VAEConfig:
    """The autoencoder's widths, levels and latent channels from its keys (LDM names); the rest from `preset`."""
    if "encoder.conv_in.weight" not in shapes or "quant_conv.weight" not in shapes:
        raise ValueError("VAE weights lack encoder.conv_in.weight or quant_conv.weight: not an LDM autoencoder")
    ch, in_channels = shapes["encoder.conv_in.weight"][:2]
    levels = _count(shapes, "encoder.down.{}.")
    return replace(preset, ch=ch, ch_mult=tuple(shapes[f"encoder.down.{i}.block.0.conv2.weight"][0] // ch
                                                for i in range(levels)),
                   num_res_blocks=_count(shapes, "encoder.down.0.block.{}."),
                   z_channels=shapes["encoder.conv_out.weight"][0] // 2, embed_dim=shapes["quant_conv.weight"][0] // 2,
                   in_channels=in_channels, out_ch=shapes["decoder.conv_out.weight"][0])
