"""What a Stable Diffusion checkpoint is: its three networks' architectures, its noise schedule and defaults.

The presets are the released models, so a single file (which carries no config) loads with no network:
LDM's v1-inference.yaml (SD 1.x), v2-inference(-v).yaml (SD 2.x) and the two inpainting yamls, with the
scheduler each model's diffusers folder ships.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import open_clip

from ..models.text_encoder import SD1_TEXT, SD2_TEXT, TextEncoderConfig
from ..models.unet import SD2_INPAINT_UNET, SD15_INPAINT_UNET, SD15_UNET, SD21_UNET, UNetConfig
from ..models.vae import SD_VAE, VAEConfig
from ..schedulers import SamplerType

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction")


def sd_scheduler_config(prediction_type: str = "epsilon", beta_start: float = 0.00085, beta_end: float = 0.012,
                        num_train_timesteps: int = 1000) -> dict[str, Any]:
    """The scheduler_config.json of SD's published folders (no timestep_spacing: each algorithm's default)."""
    return {"num_train_timesteps": num_train_timesteps, "beta_start": beta_start, "beta_end": beta_end,
            "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "set_alpha_to_one": False,
            "skip_prk_steps": True, "clip_sample": False, "prediction_type": prediction_type}


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a checkpoint's models and sample from them like its diffusers pipeline."""

    name: str                      # a label: the preset's name, or the file / folder it was loaded from
    unet: UNetConfig               # the noise predictor
    vae: VAEConfig                 # the autoencoder, scaling factor included
    text: TextEncoderConfig        # the CLIP text encoder, layer read and pad token included
    prediction_type: str = "epsilon"  # what the UNet predicts: "epsilon" (ε) or "v_prediction" (v)
    native_size: int = 512         # image side the model was trained at, in pixels
    scheduler: dict[str, Any] = field(default_factory=sd_scheduler_config)  # diffusers-style scheduler config
    scheduler_name: str = "pndm"   # the default sampler: "pndm" for SD 1.x, "ddim" for SD 2.x, as their folders ship
    default_steps: int = 50        # num_inference_steps of the diffusers pipeline's __call__
    default_guidance: float = 7.5  # guidance_scale of the diffusers pipeline's __call__

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {self.prediction_type!r} is not one of {PREDICTION_TYPES}")
        SamplerType(self.scheduler_name)  # a ValueError names the valid samplers
        # prediction_type is the one source of truth: the scheduler config always carries it
        object.__setattr__(self, "scheduler", {**self.scheduler, "prediction_type": self.prediction_type})

    @property
    def family(self) -> str:
        """The text encoder's lineage: "sd1" for OpenAI CLIP (QuickGELU), "sd2" for OpenCLIP (GELU)."""
        return "sd1" if self.text.activation == "quick_gelu" else "sd2"


SD15 = ModelConfig("sd15", SD15_UNET, SD_VAE, SD1_TEXT)
# 768-v overflows fp16 attention without the fp32 upcast (its folder turns it on); base does not need it
SD21_BASE = ModelConfig("sd21-base", replace(SD21_UNET, upcast_attention=False), SD_VAE, SD2_TEXT,
                        scheduler_name="ddim")
SD21_768V = ModelConfig("sd21-768-v", SD21_UNET, SD_VAE, SD2_TEXT, prediction_type="v_prediction", native_size=768,
                        scheduler_name="ddim")
SD15_INPAINT = ModelConfig("sd15-inpaint", SD15_INPAINT_UNET, SD_VAE, SD1_TEXT)
SD2_INPAINT = ModelConfig("sd2-inpaint", SD2_INPAINT_UNET, SD_VAE, SD2_TEXT, scheduler_name="ddim")
PRESETS = {c.name: c for c in (SD15, SD21_BASE, SD21_768V, SD15_INPAINT, SD2_INPAINT)}

# The text towers LDM's embedders build when the yaml names none: FrozenCLIPEmbedder loads OpenAI's ViT-L/14,
# FrozenOpenCLIPEmbedder open_clip's ViT-H-14.
DEFAULT_TOWER = {"sd1": "ViT-L-14", "sd2": "ViT-H-14"}
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
