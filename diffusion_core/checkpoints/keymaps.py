"""Rename tables between diffusers' UNet/VAE parameter names and the original LDM checkpoint names.

Our modules carry the original names, so an original file loads as it is and a diffusers folder
loads through one table per model: (diffusers name, original name) pairs of modules, generated
from the config's block structure. A parameter's name is its module's name plus the same suffix
on both sides (`.weight`, `.bias`, and whatever lies inside a transformer, where both agree).
"""
from __future__ import annotations

import re

import torch

from ..models.controlnet import ControlNetConfig, ControlNetModel
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import VAE, VAEConfig

# inside one ResBlock: diffusers ResnetBlock2D name -> LDM name
_UNET_RESBLOCK = [("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("time_emb_proj", "emb_layers.1"),
                  ("norm2", "out_layers.0"), ("conv2", "out_layers.3"), ("conv_shortcut", "skip_connection")]
# diffusers' AutoencoderKL used these names for the mid-block attention before v0.14
_OLD_VAE_ATTENTION = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def unet_module_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers module, original module) for every UNet module holding weights (LDM openaimodel.py order)."""
    pairs = [("time_embedding.linear_1", "time_embed.0"), ("time_embedding.linear_2", "time_embed.2"),
             ("conv_in", "input_blocks.0.0"), ("conv_norm_out", "out.0"), ("conv_out", "out.2")]
    if config.adm_in_channels is not None:  # SDXL's MLP of [pooled text; time ids]
        pairs += [("add_embedding.linear_1", "label_emb.0.0"), ("add_embedding.linear_2", "label_emb.0.2")]

    def resblock(d: str, o: str) -> None:
        pairs.extend((f"{d}.{dn}", f"{o}.{on}") for dn, on in _UNET_RESBLOCK)

    n_levels, per_level = len(config.channel_mult), config.num_res_blocks
    for i in range(n_levels):
        has_attn = config.has_attention(i)
        for j in range(per_level):
            n = 1 + i * (per_level + 1) + j  # input_blocks.0 is conv_in; each level adds its blocks + a Downsample
            resblock(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{n}.0")
            if has_attn:
                pairs.append((f"down_blocks.{i}.attentions.{j}", f"input_blocks.{n}.1"))
        if i != n_levels - 1:
            pairs.append((f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{n + 1}.0.op"))
    resblock("mid_block.resnets.0", "middle_block.0")
    pairs.append(("mid_block.attentions.0", "middle_block.1"))
    resblock("mid_block.resnets.1", "middle_block.2")
    for k in range(n_levels):  # up_blocks.0 is the lowest resolution
        has_attn = config.has_attention(n_levels - 1 - k)
        for j in range(per_level + 1):
            n = k * (per_level + 1) + j
            resblock(f"up_blocks.{k}.resnets.{j}", f"output_blocks.{n}.0")
            if has_attn:
                pairs.append((f"up_blocks.{k}.attentions.{j}", f"output_blocks.{n}.1"))
        if k != n_levels - 1:
            pairs.append((f"up_blocks.{k}.upsamplers.0.conv", f"output_blocks.{n}.{2 if has_attn else 1}.conv"))
    return pairs


def vae_module_pairs(config: VAEConfig) -> list[tuple[str, str]]:
    """(diffusers module, original module) for every VAE module holding weights (LDM model.py order)."""
    pairs = [("quant_conv", "quant_conv"), ("post_quant_conv", "post_quant_conv")]

    def resnet(d: str, o: str) -> None:
        pairs.extend([(d, o), (f"{d}.conv_shortcut", f"{o}.nin_shortcut")])

    n_levels = len(config.ch_mult)
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in", f"{part}.conv_in"), (f"{part}.conv_norm_out", f"{part}.norm_out"),
                  (f"{part}.conv_out", f"{part}.conv_out")]
        resnet(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1")
        resnet(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2")
        pairs += [(f"{part}.mid_block.attentions.0.{d}", f"{part}.mid.attn_1.{o}")
                  for d, o in [("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"),
                               ("to_out.0", "proj_out")]]
    for i in range(n_levels):
        for j in range(config.num_res_blocks):
            resnet(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}")
        if i != n_levels - 1:
            pairs.append((f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
    for k in range(n_levels):  # decoder.up_blocks.0 is the lowest resolution, LDM's up.{n_levels - 1}
        level = n_levels - 1 - k
        for j in range(config.num_res_blocks + 1):
            resnet(f"decoder.up_blocks.{k}.resnets.{j}", f"decoder.up.{level}.block.{j}")
        if level != 0:
            pairs.append((f"decoder.up_blocks.{k}.upsamplers.0.conv", f"decoder.up.{level}.upsample.conv"))
    return pairs


def _key_pairs(original_keys: list[str], module_pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Expand module pairs to parameter pairs: each original key takes its longest matching module's rename."""
    by_original = dict((o, d) for d, o in module_pairs)
    pairs = []
    for key in original_keys:
        prefix = key
        while prefix not in by_original:
            if "." not in prefix:
                raise KeyError(f"no diffusers name for parameter {key!r}")
            prefix = prefix.rsplit(".", 1)[0]
        pairs.append((by_original[prefix] + key[len(prefix):], key))
    return pairs


def unet_key_pairs(config: UNetConfig) -> list[tuple[str, str]]:
    """(diffusers key, original key) for every parameter of a UNet with this config."""
    with torch.device("meta"):
        original_keys = list(UNetModel(config).state_dict())
    return _key_pairs(original_keys, unet_module_pairs(config))


def vae_key_pairs(config: VAEConfig) -> list[tuple[str, str]]:
    """(diffusers key, original key) for every parameter of a VAE with this config."""
    with torch.device("meta"):
        original_keys = list(VAE(config).state_dict())
    return _key_pairs(original_keys, vae_module_pairs(config))


def _rename(state_dict: dict[str, torch.Tensor], pairs: list[tuple[str, str]], what: str) -> dict[str, torch.Tensor]:
    """{new: state_dict[old]} for each (old, new); a clear error listing the first missing and unexpected keys."""
    missing = [old for old, _ in pairs if old not in state_dict]
    unexpected = sorted(set(state_dict) - {old for old, _ in pairs})
    if missing or unexpected:
        raise ValueError(f"{what}: {len(missing)} missing keys {missing[:5]}, "
                         f"{len(unexpected)} unexpected keys {unexpected[:5]}")
    return {new: state_dict[old] for old, new in pairs}


def unet_from_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers UNet state dict in the original layout (tensors shared, not copied)."""
    return _rename(state_dict, unet_key_pairs(config), "diffusers UNet weights")


def unet_to_diffusers(state_dict: dict[str, torch.Tensor], config: UNetConfig) -> dict[str, torch.Tensor]:
    """An original-layout UNet state dict in diffusers' layout (tensors shared, not copied)."""
    return _rename(state_dict, [(o, d) for d, o in unet_key_pairs(config)], "original UNet weights")


def controlnet_module_pairs(config: ControlNetConfig) -> list[tuple[str, str]]:
    """(diffusers module, original module): the copied encoder's as the UNet's, then the hint embedding (conv_in,
    blocks, conv_out = input_hint_block.0, 2, ..., a SiLU between each) and one zero conv per output."""
    n_hint = 2 * (len(config.embedding_channels) - 1)  # blocks of the hint embedding between conv_in and conv_out
    hint = ["conv_in", *(f"blocks.{k}" for k in range(n_hint)), "conv_out"]
    skips = 1 + len(config.unet.channel_mult) * (config.unet.num_res_blocks + 1) - 1
    return (unet_module_pairs(config.unet)
            + [(f"controlnet_cond_embedding.{name}", f"input_hint_block.{2 * k}") for k, name in enumerate(hint)]
            + [(f"controlnet_down_blocks.{i}", f"zero_convs.{i}.0") for i in range(skips)]
            + [("controlnet_mid_block", "middle_block_out.0")])


def controlnet_key_pairs(config: ControlNetConfig) -> list[tuple[str, str]]:
    """(diffusers key, original key) for every parameter of a ControlNet with this config."""
    with torch.device("meta"):
        original_keys = list(ControlNetModel(config).state_dict())
    return _key_pairs(original_keys, controlnet_module_pairs(config))


def controlnet_from_diffusers(state_dict: dict[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """A diffusers ControlNetModel state dict in cldm's layout (tensors shared, not copied)."""
    return _rename(state_dict, controlnet_key_pairs(config), "diffusers ControlNet weights")


def controlnet_to_diffusers(state_dict: dict[str, torch.Tensor], config: ControlNetConfig) -> dict[str, torch.Tensor]:
    """A cldm-layout ControlNet state dict in diffusers' layout (tensors shared, not copied)."""
    return _rename(state_dict, [(o, d) for d, o in controlnet_key_pairs(config)], "original ControlNet weights")


def _is_vae_attention_weight(original_key: str) -> bool:
    return re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", original_key) is not None


def vae_from_diffusers(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """A diffusers VAE state dict in the original layout; the attention's Linear (C, C) become 1x1 convs."""
    state_dict = {re.sub(r"\.attentions\.0\.(query|key|value|proj_attn)\.",
                         lambda m: f".attentions.0.{_OLD_VAE_ATTENTION[m.group(1)]}.", k): v
                  for k, v in state_dict.items()}
    renamed = _rename(state_dict, vae_key_pairs(config), "diffusers VAE weights")
    return {k: v[:, :, None, None] if _is_vae_attention_weight(k) and v.ndim == 2 else v
            for k, v in renamed.items()}  # (C, C) -> (C, C, 1, 1)


def vae_to_diffusers(state_dict: dict[str, torch.Tensor], config: VAEConfig) -> dict[str, torch.Tensor]:
    """An original-layout VAE state dict in diffusers' layout; the attention's 1x1 convs become Linear (C, C)."""
    squeezed = {k: v[:, :, 0, 0] if _is_vae_attention_weight(k) and v.ndim == 4 else v for k, v in state_dict.items()}
    return _rename(squeezed, [(o, d) for d, o in vae_key_pairs(config)], "original VAE weights")
