"""LDM's yaml configs (v1-inference.yaml and kin) <-> ModelConfig.

An original checkpoint's architecture lives in the yaml it was trained with: `model.params.unet_config`
(openaimodel.UNetModel), `first_stage_config.params.ddconfig` (the autoencoder), `cond_stage_config`
(FrozenCLIPEmbedder for SD1, FrozenOpenCLIPEmbedder for SD2) and `parameterization` ("eps" or "v").
The text encoder's width and depth are not in the yaml; they come from the weights.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..models.unet import UNetConfig
from ..models.vae import VAEConfig
from .configs import ModelConfig, sd_scheduler_config, text_config_from_weights, text_layer_name

_MODELS = ("LatentDiffusion", "LatentInpaintDiffusion")
_EMBEDDERS = {"FrozenCLIPEmbedder": "sd1", "FrozenOpenCLIPEmbedder": "sd2"}
_PARAMETERIZATION = {"eps": "epsilon", "v": "v_prediction"}
# openaimodel.UNetModel options that change nothing SD's UNet computes (memory, speed, training, SD1's head rule)
_UNET_IGNORED = {"image_size", "use_checkpoint", "use_fp16", "use_bf16", "legacy", "num_heads_upsample",
                 "use_new_attention_order"}
# openaimodel.UNetModel options with no counterpart in UNetModel: only the value SD uses is accepted
_UNET_FIXED = {"use_spatial_transformer": True, "dims": 2, "conv_resample": True, "use_scale_shift_norm": False,
               "resblock_updown": False, "num_classes": None, "disable_self_attentions": None,
               "num_attention_blocks": None, "disable_middle_self_attn": False, "n_embed": None, "dropout": 0.0}
_UNET_USED = {"in_channels", "out_channels", "model_channels", "attention_resolutions", "num_res_blocks",
              "channel_mult", "num_heads", "num_head_channels", "context_dim", "use_linear_in_transformer",
              "transformer_depth"}
_DDCONFIG_FIXED = {"double_z": True, "attn_resolutions": [], "dropout": 0.0}


def _check_fixed(params: Mapping[str, Any], fixed: Mapping[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if params.get(key, value) != value:
            raise ValueError(f"{where}: {key}={params[key]!r} is not supported; only {value!r} is")


def unet_config_from_ldm(params: Mapping[str, Any]) -> UNetConfig:
    """`unet_config.params` -> UNetConfig; a head size (num_head_channels) wins over a head count, as in LDM."""
    _check_fixed(params, _UNET_FIXED, "unet_config")
    unknown = set(params) - _UNET_USED - _UNET_IGNORED - set(_UNET_FIXED)
    if unknown:
        raise ValueError(f"unet_config: unsupported options {sorted(unknown)}")
    depth, context_dim = params.get("transformer_depth", 1), params["context_dim"]
    if isinstance(depth, list) or isinstance(context_dim, list):
        raise ValueError("unet_config: per-level transformer_depth / context_dim (SDXL) is not supported")
    head_size, head_count = params.get("num_head_channels", -1), params.get("num_heads", -1)
    if head_size == head_count == -1:
        raise ValueError("unet_config: set num_heads (SD1: 8) or num_head_channels (SD2: 64)")
    heads = {"num_head_channels": head_size} if head_size != -1 else {"num_heads": head_count}
    return UNetConfig(in_channels=params["in_channels"], out_channels=params["out_channels"],
                      model_channels=params["model_channels"], channel_mult=params["channel_mult"],
                      num_res_blocks=params["num_res_blocks"], attention_resolutions=params["attention_resolutions"],
                      context_dim=context_dim, **heads,
                      use_linear_in_transformer=params.get("use_linear_in_transformer", False),
                      transformer_depth=depth)


def vae_config_from_ldm(params: Mapping[str, Any], scale_factor: float) -> VAEConfig:
    """`first_stage_config.params` (embed_dim, ddconfig) and the model's scale_factor -> VAEConfig."""
    dd = params["ddconfig"]
    _check_fixed(dd, _DDCONFIG_FIXED, "first_stage_config.params.ddconfig")
    return VAEConfig(ch=dd["ch"], ch_mult=dd["ch_mult"], num_res_blocks=dd["num_res_blocks"],
                     z_channels=dd["z_channels"], embed_dim=params["embed_dim"], in_channels=dd["in_channels"],
                     out_ch=dd["out_ch"], scaling_factor=scale_factor)


def _target(section: Mapping[str, Any], allowed: Mapping[str, Any] | tuple[str, ...], where: str) -> str:
    name = str(section.get("target", "")).rsplit(".", 1)[-1]
    if name not in allowed:
        raise ValueError(f"{where}.target {section.get('target')!r} is not supported; use one of {list(allowed)}")
    return name


def config_from_ldm_yaml(original: Mapping[str, Any], text_family: str,
                         text_shapes: Mapping[str, tuple[int, ...]], name: str) -> ModelConfig:
    """The ModelConfig an LDM yaml describes; the text encoder's size is read from the weights' shapes.

    Args:
        original: the parsed yaml (`yaml.safe_load`).
        text_family: "sd1" or "sd2", the layout of the text encoder found in the file.
        text_shapes: the text encoder's keys (file prefix removed) and shapes.
    """
    model = original["model"]
    _target(model, _MODELS, "model")
    p = model["params"]
    cond = p["cond_stage_config"]
    family = _EMBEDDERS[_target(cond, _EMBEDDERS, "model.params.cond_stage_config")]
    if family != text_family:
        raise ValueError(f"the yaml's {cond['target']} is {family}, but the weights hold a {text_family} text encoder")
    cond_params = cond.get("params") or {}
    text = text_config_from_weights(family, text_shapes, layer=cond_params.get("layer", "last"),
                                    tower=cond_params.get("arch"))
    parameterization = p.get("parameterization", "eps")
    if parameterization not in _PARAMETERIZATION:
        raise ValueError(f"parameterization {parameterization!r} is not one of {list(_PARAMETERIZATION)}")
    if p.get("beta_schedule", "linear") != "linear":
        raise ValueError(f"beta_schedule {p['beta_schedule']!r} is not supported; SD uses 'linear'")
    prediction_type = _PARAMETERIZATION[parameterization]
    unet = unet_config_from_ldm(p["unet_config"]["params"])
    vae = vae_config_from_ldm(p["first_stage_config"]["params"], p.get("scale_factor", 1.0))
    # LDM's "linear" schedule is linear in sqrt(β): diffusers' "scaled_linear"
    scheduler = sd_scheduler_config(prediction_type, p.get("linear_start", 1e-4), p.get("linear_end", 2e-2),
                                    p.get("timesteps", 1000))
    native_size = p["image_size"] * 2 ** (len(vae.ch_mult) - 1)  # model.params.image_size is the latent side
    return ModelConfig(name=name, unet=unet, vae=vae, text=text, prediction_type=prediction_type,
                       native_size=native_size, scheduler=scheduler,
                       scheduler_name="pndm" if family == "sd1" else "ddim")


def ldm_yaml_from_config(config: ModelConfig) -> dict[str, Any]:
    """The LDM yaml (a dict for `yaml.safe_dump`) that config_from_ldm_yaml reads back as `config`.

    A yaml has no upcast_attention: loading turns it on for v-prediction models, as SD2-768-v needs.
    """
    u, v, s = config.unet, config.vae, config.scheduler
    if s.get("beta_schedule") != "scaled_linear" or s.get("trained_betas") is not None:
        raise ValueError(f"an LDM yaml states only SD's scaled_linear betas, not {s.get('beta_schedule')!r}")
    depths = {d for d in u.transformer_depth if d} | {u.transformer_depth_middle}
    if len(depths) != 1 or u.adm_in_channels is not None:
        raise ValueError("an LDM yaml states one transformer depth for every level and no added embedding (SDXL's "
                         "files are read from their weights alone)")
    unet = dict(in_channels=u.in_channels, out_channels=u.out_channels, model_channels=u.model_channels,
                attention_resolutions=list(u.attention_resolutions), num_res_blocks=u.num_res_blocks,
                channel_mult=list(u.channel_mult), use_spatial_transformer=True,
                use_linear_in_transformer=u.use_linear_in_transformer, transformer_depth=depths.pop(),
                context_dim=u.context_dim, legacy=False)
    if u.num_head_channels != -1:
        unet["num_head_channels"] = u.num_head_channels
    else:
        unet["num_heads"] = u.num_heads
    if u.norm_groups != 32 or v.norm_groups != 32:
        raise ValueError("an LDM yaml cannot state GroupNorm groups other than 32")
    ddconfig = dict(double_z=True, z_channels=v.z_channels, resolution=256, in_channels=v.in_channels,
                    out_ch=v.out_ch, ch=v.ch, ch_mult=list(v.ch_mult), num_res_blocks=v.num_res_blocks,
                    attn_resolutions=[], dropout=0.0)
    layer, tower = text_layer_name(config.text)
    embedder = {"sd1": "FrozenCLIPEmbedder", "sd2": "FrozenOpenCLIPEmbedder"}[config.family]
    cond = {"target": f"ldm.modules.encoders.modules.{embedder}"}
    if config.family == "sd2":
        cond["params"] = {"freeze": True, "layer": layer, **({"arch": tower} if tower else {})}
    inpaint = u.in_channels == 9
    params = {"parameterization": "v" if config.prediction_type == "v_prediction" else "eps",
              "linear_start": s["beta_start"], "linear_end": s["beta_end"], "timesteps": s["num_train_timesteps"],
              "first_stage_key": "jpg", "cond_stage_key": "txt",
              "image_size": config.native_size // 2 ** (len(v.ch_mult) - 1), "channels": v.embed_dim,
              "cond_stage_trainable": False, "conditioning_key": "hybrid" if inpaint else "crossattn",
              "scale_factor": v.scaling_factor, "use_ema": False,
              "unet_config": {"target": "ldm.modules.diffusionmodules.openaimodel.UNetModel", "params": unet},
              "first_stage_config": {"target": "ldm.models.autoencoder.AutoencoderKL",
                                     "params": {"embed_dim": v.embed_dim, "ddconfig": ddconfig,
                                                "lossconfig": {"target": "torch.nn.Identity"}}},
              "cond_stage_config": cond}
    model = "LatentInpaintDiffusion" if inpaint else "LatentDiffusion"
    return {"model": {"target": f"ldm.models.diffusion.ddpm.{model}", "params": params}}
