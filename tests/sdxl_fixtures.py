"""Tiny random SDXL models (base, refiner, inpainting) built with diffusers/transformers, in both layouts.

`tiny_sdxl(kind)` builds a seeded, perturbed diffusers UNet (SDXL's "text_time" added embedding, no attention
at the first level, per-level transformer depth), a VAE, transformers' CLIPTextModel (ViT-L-like, QuickGELU)
and CLIPTextModelWithProjection (bigG-like, GELU), their tokenizers and SDXL's Euler scheduler. Heads are 64
channels wide and GroupNorms have 32 groups, as in every SDXL file, so a single file reads back from its
weights alone. `save_sdxl_single_file` writes sgm's layout through our own key maps.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline, UNet2DConditionModel)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from checkpoint_fixtures import clip_tokenizer, write_weights
from diffusion_core.checkpoints.configs import sdxl_scheduler_config
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers
from diffusion_core.checkpoints.loader import TEXT_TOWERS
from diffusion_core.checkpoints.text_keys import TRANSFORMERS_PREFIX, text_from_transformers
from diffusion_core.models.text_encoder import TextEncoderConfig
from diffusion_core.models.unet import UNetConfig
from diffusion_core.models.vae import VAEConfig
from parity import perturb_

KINDS = ("base", "refiner", "inpaint")
WIDTH_L, WIDTH_G, PROJECTION = 64, 128, 96  # the pooled width differs from bigG's, so a transposed projection fails
CONTEXT = {"base": WIDTH_L + WIDTH_G, "refiner": WIDTH_G, "inpaint": WIDTH_L + WIDTH_G}
TIME_IDS = {"base": 6, "refiner": 5, "inpaint": 6}
_DOWN, _CROSS, _UP, _CROSS_UP = "DownBlock2D", "CrossAttnDownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"


def unet_config(kind: str) -> dict:
    """SDXL's shape at a CPU's size: no attention at level 0, depths 1 and 2 below, 64-channel heads."""
    return dict(sample_size=16, in_channels=9 if kind == "inpaint" else 4, out_channels=4,
                block_out_channels=[32, 64, 128], layers_per_block=2, down_block_types=[_DOWN, _CROSS, _CROSS],
                up_block_types=[_CROSS_UP, _CROSS_UP, _UP], cross_attention_dim=CONTEXT[kind],
                attention_head_dim=[1, 1, 2], transformer_layers_per_block=[1, 1, 2], use_linear_projection=True,
                addition_embed_type="text_time", addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=PROJECTION + TIME_IDS[kind] * 256, norm_num_groups=32)


VAE_CONFIG = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=2,
                  down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                  latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.13025, force_upcast=True)


def text_config(width: int, activation: str, projection: bool) -> CLIPTextConfig:
    # bigG's config says eos_token_id=2: transformers then pools at argmax(ids), the first EOS when pads are 0
    return CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=3,
                          num_attention_heads=width // 64, max_position_embeddings=77, hidden_act=activation,
                          layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=2 if projection else 49407,
                          projection_dim=PROJECTION if projection else width)


def sdxl_scheduler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler.from_config(sdxl_scheduler_config())


def _seeded(build, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(build(), seed).eval()


def tiny_sdxl(kind: str, seed: int = 0) -> dict:
    """A random, perturbed tiny SDXL of one kind in diffusers' classes: unet, vae, text_encoder (None for the
    refiner), text_encoder_2, tokenizer, tokenizer_2, scheduler, and the pipeline flags of its model_index."""
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    refiner = kind == "refiner"
    text_encoder = None if refiner else _seeded(lambda: CLIPTextModel(text_config(WIDTH_L, "quick_gelu", False)),
                                                seed + 2)
    return dict(kind=kind, unet=_seeded(lambda: UNet2DConditionModel(**unet_config(kind)), seed),
                vae=_seeded(lambda: AutoencoderKL(**VAE_CONFIG), seed + 1), text_encoder=text_encoder,
                text_encoder_2=_seeded(lambda: CLIPTextModelWithProjection(text_config(WIDTH_G, "gelu", True)),
                                       seed + 3),
                tokenizer=None if refiner else clip_tokenizer("sd1"), tokenizer_2=clip_tokenizer("sd2"),
                scheduler=sdxl_scheduler(), requires_aesthetics_score=refiner, force_zeros_for_empty_prompt=not refiner)


PIPELINE = {"base": StableDiffusionXLPipeline, "refiner": StableDiffusionXLImg2ImgPipeline,
            "inpaint": StableDiffusionXLInpaintPipeline}


def sdxl_pipeline(ref: dict, pipeline_class=None, scheduler=None):
    """diffusers' own SDXL pipeline around the reference modules, no watermark."""
    pipeline_class = pipeline_class or PIPELINE[ref["kind"]]
    flags = {} if pipeline_class is StableDiffusionXLPipeline else {
        "requires_aesthetics_score": ref["requires_aesthetics_score"]}
    pipe = pipeline_class(vae=ref["vae"], text_encoder=ref["text_encoder"], text_encoder_2=ref["text_encoder_2"],
                          tokenizer=ref["tokenizer"], tokenizer_2=ref["tokenizer_2"], unet=ref["unet"],
                          scheduler=scheduler or ref["scheduler"], add_watermarker=False,
                          force_zeros_for_empty_prompt=ref["force_zeros_for_empty_prompt"], **flags)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_sdxl_folder(ref: dict, folder: str | Path) -> Path:
    """The reference as a diffusers folder, written by diffusers' own save_pretrained (safetensors)."""
    sdxl_pipeline(ref).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def sdxl_original_state_dict(ref: dict) -> dict[str, torch.Tensor]:
    """The reference under sgm's names (model.diffusion_model., first_stage_model., conditioner.embedders.*),
    converted by our key maps; bigG keeps open_clip's logit_scale as real files do."""
    unet, vae = ref["unet"], ref["vae"]
    state = {f"model.diffusion_model.{k}": v for k, v in
             unet_from_diffusers(unet.state_dict(), UNetConfig.from_diffusers(dict(unet.config))).items()}
    state.update({f"first_stage_model.{k}": v for k, v in
                  vae_from_diffusers(vae.state_dict(), VAEConfig.from_diffusers(dict(vae.config))).items()})
    towers = {t.config: t.prefix for t in TEXT_TOWERS["sdxl_refiner" if ref["kind"] == "refiner" else "sdxl"]}
    if ref["text_encoder"] is not None:  # CLIPTextModel as transformers 4 named it, position ids included
        clip_l = {TRANSFORMERS_PREFIX + k: v for k, v in ref["text_encoder"].state_dict().items()}
        clip_l[TRANSFORMERS_PREFIX + "embeddings.position_ids"] = torch.arange(77)[None]
        state.update({towers["text"] + k: v for k, v in clip_l.items()})
    g = ref["text_encoder_2"]
    g_config = TextEncoderConfig.from_transformers(g.config.to_dict(), 0, sdxl=True, projection=True)
    clip_g = {**text_from_transformers(g.state_dict(), g_config), "logit_scale": torch.tensor(4.6052)}
    state.update({towers["text_2"] + k: v for k, v in clip_g.items()})
    return state


def save_sdxl_single_file(ref: dict, path: str | Path, dtype: torch.dtype | None = None) -> Path:
    """The reference as one sgm-layout file (.safetensors or .ckpt); SDXL files need no yaml."""
    state = sdxl_original_state_dict(ref)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return write_weights(state, path)
