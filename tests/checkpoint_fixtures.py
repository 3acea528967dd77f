"""Tiny random Stable Diffusion models built with diffusers/transformers, saved in both checkpoint layouts.

`tiny_reference(kind)` builds a seeded, perturbed diffusers UNet / AutoencoderKL, a transformers
CLIPTextModel and CLIPTokenizer (rebuilt offline from open_clip's BPE file) and the scheduler SD's
folders ship. `save_diffusers_folder` writes it as diffusers does; `save_single_file_from_reference`
writes the original LDM layout through our own key maps, with the LDM yaml beside it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import yaml
from diffusers import (AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionInpaintPipeline,
                       StableDiffusionPipeline, UNet2DConditionModel)
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers
from diffusion_core.checkpoints.text_keys import TRANSFORMERS_PREFIX, text_from_transformers, text_to_transformers
from diffusion_core.models.text_encoder import TextEncoderConfig
from diffusion_core.models.unet import UNetConfig
from diffusion_core.models.vae import VAEConfig
from diffusion_core.reference import clip_tokenizer as reference_tokenizer
from parity import perturb_

KINDS = ("sd1", "sd2", "sd2_v", "sd1_inpaint")
FAMILY = {"sd1": "sd1", "sd1_inpaint": "sd1", "sd2": "sd2", "sd2_v": "sd2"}

_CROSS, _DOWN, _UP, _CROSS_UP = "CrossAttnDownBlock2D", "DownBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"
TEXT_WIDTH = 128  # an LDM yaml implies heads = width / 64, here 2
# SD1-shaped: 8 heads, 1x1-conv proj; SD2-shaped: a fixed head size (16), Linear proj, 2 blocks per transformer.
TINY_UNET = {
    "sd1": dict(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[32, 64, 64], layers_per_block=2,
                down_block_types=[_CROSS, _CROSS, _DOWN], up_block_types=[_UP, _CROSS_UP, _CROSS_UP],
                cross_attention_dim=TEXT_WIDTH, attention_head_dim=8, norm_num_groups=32),
}
TINY_UNET["sd2"] = dict(TINY_UNET["sd1"], attention_head_dim=[2, 4, 4], use_linear_projection=True,
                        transformer_layers_per_block=2)
TINY_UNET["sd2_v"] = dict(TINY_UNET["sd2"], upcast_attention=True)
TINY_UNET["sd1_inpaint"] = dict(TINY_UNET["sd1"], in_channels=9)
TINY_VAE = dict(in_channels=3, out_channels=3, block_out_channels=[32, 64, 64], layers_per_block=2,
                down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                latent_channels=4, norm_num_groups=32, sample_size=64, scaling_factor=0.18215)
# (activation, blocks a single file holds, blocks used): SD2 reads the penultimate block, and its diffusers
# folder stores only the blocks used, as stabilityai/stable-diffusion-2-1 does (23 of ViT-H's 24).
TINY_TEXT = {"sd1": ("quick_gelu", 2, 2), "sd2": ("gelu", 3, 2)}
def sd_scheduler(kind: str):
    """The scheduler of SD's folders: PNDM for SD1, DDIM for SD2; v-prediction for the 768-v model."""
    config = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                  trained_betas=None, steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False,
                  prediction_type="v_prediction" if kind == "sd2_v" else "epsilon")
    return (PNDMScheduler if FAMILY[kind] == "sd1" else DDIMScheduler).from_config(config)


def clip_tokenizer(family: str) -> CLIPTokenizer:
    """transformers' CLIPTokenizer with the family's pad token: <|endoftext|> (SD1) or "!" (SD2)."""
    return reference_tokenizer(0 if family == "sd2" else 49407)


def text_config(family: str, layers: int) -> CLIPTextConfig:
    activation = TINY_TEXT[family][0]
    return CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH,
                          num_hidden_layers=layers, num_attention_heads=TEXT_WIDTH // 64, max_position_embeddings=77,
                          hidden_act=activation, layer_norm_eps=1e-5, bos_token_id=49406, eos_token_id=49407)


def _seeded(build, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return perturb_(build(), seed).eval()


def tiny_reference(kind: str, seed: int = 0) -> dict:
    """A random, perturbed tiny SD model of one kind ("sd1", "sd2", "sd2_v", "sd1_inpaint") in diffusers' classes.

    Keys: kind, family, unet, vae, text_encoder, tokenizer, scheduler, prediction_type, and
    unused_text_layers: transformers-layout weights of the text blocks a single file holds but SD never
    reads (SD2's last block), which the diffusers folder leaves out.
    """
    if kind not in KINDS:
        raise ValueError(f"kind {kind!r} is not one of {KINDS}")
    family = FAMILY[kind]
    _, held, used = TINY_TEXT[family]
    full_text = _seeded(lambda: CLIPTextModel(text_config(family, held)), seed + 2)
    text_encoder = CLIPTextModel(text_config(family, used)).eval()
    text_state = full_text.state_dict()
    text_encoder.load_state_dict({k: v for k, v in text_state.items() if k in text_encoder.state_dict()})
    unused = {k: v for k, v in text_state.items() if k not in text_encoder.state_dict()}
    return dict(kind=kind, family=family, unet=_seeded(lambda: UNet2DConditionModel(**TINY_UNET[kind]), seed),
                vae=_seeded(lambda: AutoencoderKL(**TINY_VAE), seed + 1), text_encoder=text_encoder,
                tokenizer=clip_tokenizer(family), scheduler=sd_scheduler(kind),
                prediction_type="v_prediction" if kind == "sd2_v" else "epsilon", unused_text_layers=unused)


def diffusers_pipeline(ref: dict) -> StableDiffusionPipeline:
    """diffusers' own pipeline around the reference models (the inpainting one for 9 input channels)."""
    pipeline_class = StableDiffusionInpaintPipeline if ref["unet"].config.in_channels == 9 else StableDiffusionPipeline
    return pipeline_class(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                          unet=ref["unet"], scheduler=ref["scheduler"], safety_checker=None, feature_extractor=None,
                          requires_safety_checker=False)


def save_diffusers_folder(ref: dict, folder: str | Path) -> Path:
    """The reference as a diffusers model folder, written by diffusers' own save_pretrained (safetensors)."""
    diffusers_pipeline(ref).save_pretrained(folder, safe_serialization=True)
    return Path(folder)


def original_state_dict_from_reference(ref: dict, position_ids: str = "int") -> dict[str, torch.Tensor]:
    """The reference's weights under the original LDM names, converted by our key maps (no diffusers code).

    Args:
        position_ids: SD1 files hold the text encoder's position ids as "int" (int64), "float" or "missing".
    """
    unet = ref["unet"]
    state = {f"model.diffusion_model.{k}": v for k, v in
             unet_from_diffusers(unet.state_dict(), UNetConfig.from_diffusers(dict(unet.config))).items()}
    vae = ref["vae"]
    state.update({f"first_stage_model.{k}": v for k, v in
                  vae_from_diffusers(vae.state_dict(), VAEConfig.from_diffusers(dict(vae.config))).items()})
    family = ref["family"]
    activation, held, _ = TINY_TEXT[family]
    text = {**ref["text_encoder"].state_dict(), **ref["unused_text_layers"]}
    config = TextEncoderConfig(width=TEXT_WIDTH, layers=held, heads=TEXT_WIDTH // 64, activation=activation)
    open_clip_layout = text_from_transformers(text, config)
    if family == "sd1":
        layout = text_to_transformers(open_clip_layout, config, prefix=TRANSFORMERS_PREFIX)
        ids = torch.arange(77)[None]
        if position_ids != "missing":
            layout[TRANSFORMERS_PREFIX + "embeddings.position_ids"] = ids.float() if position_ids == "float" else ids
        state.update({f"cond_stage_model.transformer.{k}": v for k, v in layout.items()})
    else:  # FrozenOpenCLIPEmbedder keeps open_clip's projection and temperature, which SD never reads
        gen = torch.Generator().manual_seed(7)
        open_clip_layout.update(text_projection=torch.randn(TEXT_WIDTH, TEXT_WIDTH, generator=gen),
                                logit_scale=torch.tensor(4.6052))
        state.update({f"cond_stage_model.model.{k}": v for k, v in open_clip_layout.items()})
    return state


def ema_state_dict(unet_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """LDM's LitEma buffers for UNet weights: model_ema.diffusion_model<key without dots>, decay, num_updates."""
    ema = {"model_ema.diffusion_model" + k.replace(".", ""): v.clone() for k, v in unet_state.items()}
    return {**ema, "model_ema.decay": torch.tensor(0.9999),
            "model_ema.num_updates": torch.tensor(1000, dtype=torch.int)}


def ldm_yaml(ref: dict) -> dict:
    """The LDM yaml of the reference (v1-inference.yaml's shape), written from the diffusers configs."""
    u, v = ref["unet"].config, ref["vae"].config
    width = u.block_out_channels[0]
    unet = dict(image_size=32, in_channels=u.in_channels, out_channels=u.out_channels, model_channels=width,
                attention_resolutions=[2 ** i for i, t in enumerate(u.down_block_types) if t == _CROSS],
                num_res_blocks=u.layers_per_block, channel_mult=[c // width for c in u.block_out_channels],
                use_spatial_transformer=True, transformer_depth=u.transformer_layers_per_block,
                context_dim=u.cross_attention_dim, use_checkpoint=True, legacy=False)
    if ref["family"] == "sd1":
        unet["num_heads"] = u.attention_head_dim
        cond = {"target": "ldm.modules.encoders.modules.FrozenCLIPEmbedder"}
    else:
        unet.update(num_head_channels=width // u.attention_head_dim[0], use_linear_in_transformer=True, use_fp16=True)
        cond = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                "params": {"freeze": True, "layer": "penultimate"}}
    ddconfig = dict(double_z=True, z_channels=v.latent_channels, resolution=256, in_channels=3, out_ch=3,
                    ch=v.block_out_channels[0], ch_mult=[c // v.block_out_channels[0] for c in v.block_out_channels],
                    num_res_blocks=v.layers_per_block, attn_resolutions=[], dropout=0.0)
    params = dict(linear_start=0.00085, linear_end=0.012, num_timesteps_cond=1, log_every_t=200, timesteps=1000,
                  first_stage_key="jpg", cond_stage_key="txt", image_size=u.sample_size, channels=4,
                  cond_stage_trainable=False, conditioning_key="hybrid" if u.in_channels == 9 else "crossattn",
                  monitor="val/loss_simple_ema", scale_factor=v.scaling_factor, use_ema=False,
                  unet_config={"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
                  first_stage_config={"target": "ldm.models.autoencoder.AutoencoderKL",
                                      "params": {"embed_dim": v.latent_channels, "monitor": "val/rec_loss",
                                                 "ddconfig": ddconfig, "lossconfig": {"target": "torch.nn.Identity"}}},
                  cond_stage_config=cond)
    if ref["prediction_type"] == "v_prediction":
        params = {"parameterization": "v", **params}
    model = "LatentInpaintDiffusion" if u.in_channels == 9 else "LatentDiffusion"
    return {"model": {"base_learning_rate": 1.0e-4, "target": f"ldm.models.diffusion.ddpm.{model}", "params": params}}


def write_weights(state: dict[str, torch.Tensor], path: str | Path, global_step: int | None = None) -> Path:
    """A .safetensors file, or a Lightning-style .ckpt ({"state_dict": ..., "global_step": ...})."""
    path = Path(path)
    state = {k: v.contiguous() for k, v in state.items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({"state_dict": state, "global_step": global_step, "epoch": 3}, path)
    return path


def save_single_file_from_reference(ref: dict, path: str | Path, dtype: torch.dtype | None = None,
                                    position_ids: str = "int", ema: bool = False, write_yaml: bool = True,
                                    global_step: int | None = None) -> Path:
    """The reference as one original-layout file (.safetensors or .ckpt), with `<stem>.yaml` beside it.

    Args:
        dtype: cast floating-point tensors, e.g. torch.float16 as most published files are.
        ema: store the reference UNet as LDM's EMA copy, and other (perturbed) weights as the raw UNet.
    """
    state = original_state_dict_from_reference(ref, position_ids)
    if ema:
        prefix = "model.diffusion_model."
        raw = {k: v for k, v in state.items() if k.startswith(prefix)}
        state.update(ema_state_dict({k[len(prefix):]: v for k, v in raw.items()}))
        gen = torch.Generator().manual_seed(11)
        state.update({k: v + 0.1 * torch.randn(v.shape, generator=gen) for k, v in raw.items()})
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    path = write_weights(state, path, global_step)
    if write_yaml:
        path.with_suffix(".yaml").write_text(yaml.safe_dump(ldm_yaml(ref), sort_keys=False))
    return path
