"""Key map between transformers' CLIPTextModel layout (SD1 files, diffusers folders) and open_clip's (SD2 files).

One table; the only computations are nn.MultiheadAttention's fused in_proj = [q; k; v] (Vaswani et al. 2017,
§3.2.2) and the text projection, which open_clip applies as x @ P and transformers as a Linear with weight Pᵀ.
"""
from __future__ import annotations

import torch

from ..models.text_encoder import TextEncoderConfig

# open_clip name -> transformers name(s). Several transformers names are concatenated along dim 0.
GLOBAL_KEYS = {
    "token_embedding.weight": ("embeddings.token_embedding.weight",),
    "positional_embedding": ("embeddings.position_embedding.weight",),
    "ln_final.weight": ("final_layer_norm.weight",),
    "ln_final.bias": ("final_layer_norm.bias",),
}
# Per block: open_clip `transformer.resblocks.{i}.` + key <- transformers `encoder.layers.{i}.` + key(s);
# {p} is weight or bias.
LAYER_KEYS = {
    "ln_1.{p}": ("layer_norm1.{p}",),
    "attn.in_proj_{p}": ("self_attn.q_proj.{p}", "self_attn.k_proj.{p}", "self_attn.v_proj.{p}"),
    "attn.out_proj.{p}": ("self_attn.out_proj.{p}",),
    "ln_2.{p}": ("layer_norm2.{p}",),
    "mlp.c_fc.{p}": ("mlp.fc1.{p}",),
    "mlp.c_proj.{p}": ("mlp.fc2.{p}",),
}
# The one weightless module both sides name (open_clip's MLP Sequential, transformers' CLIPMLP): what `compare`
# needs to tell GELU from QuickGELU at the activation itself rather than at the next layer.
LAYER_ACTIVATION = ("mlp.gelu", "mlp.activation_fn")
# transformers <= 4 nests everything under `text_model.`; transformers 5 saves without it.
TRANSFORMERS_PREFIX = "text_model."
# Kept in checkpoints but never read: positions are always arange(77); the projection and temperature
# serve CLIP's image-text loss, not SD.
IGNORED_TRANSFORMERS_KEYS = ("embeddings.position_ids",)
IGNORED_OPEN_CLIP_KEYS = ("text_projection", "logit_scale")
# SDXL's bigG gives a pooled embedding through its projection (CLIPTextModelWithProjection keeps it outside
# `text_model.`); it is transposed on the way across.
PROJECTION_KEYS = ("text_projection", "text_projection.weight")


def text_key_map(config: TextEncoderConfig) -> dict[str, tuple[str, ...]]:
    """Every open_clip key of a text encoder with `config.layers` blocks -> its transformers key(s)."""
    key_map = dict(GLOBAL_KEYS)
    if config.projection_dim is not None:
        key_map[PROJECTION_KEYS[0]] = (PROJECTION_KEYS[1],)
    for i in range(config.layers):
        for ours, theirs in LAYER_KEYS.items():
            for p in ("weight", "bias"):
                key_map[f"transformer.resblocks.{i}.{ours.format(p=p)}"] = tuple(
                    f"encoder.layers.{i}.{t.format(p=p)}" for t in theirs)
    return key_map


def _check_consumed(remaining: dict, layout: str) -> None:
    if remaining:
        raise ValueError(f"unexpected keys in a {layout} CLIP text encoder state dict: {sorted(remaining)[:8]}")


def text_from_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig) -> dict[str, torch.Tensor]:
    """A CLIPTextModel state dict (with or without `text_model.`) in open_clip's layout, for `TextEncoder`."""
    sd = {k.removeprefix(TRANSFORMERS_PREFIX): v for k, v in state_dict.items()}
    for key in IGNORED_TRANSFORMERS_KEYS:
        sd.pop(key, None)
    missing = [t for theirs in text_key_map(config).values() for t in theirs if t not in sd]
    if missing:
        raise ValueError(f"CLIP text encoder with {config.layers} layers expects transformers keys "
                         f"missing here: {missing[:8]}")
    out = {}
    for ours, theirs in text_key_map(config).items():
        out[ours] = sd.pop(theirs[0]) if len(theirs) == 1 else torch.cat([sd.pop(t) for t in theirs])  # [q; k; v]
    if config.projection_dim is not None:
        out[PROJECTION_KEYS[0]] = out[PROJECTION_KEYS[0]].T  # Linear weight (proj, width) -> open_clip's (width, proj)
    _check_consumed(sd, "transformers")
    return out


def text_to_transformers(state_dict: dict[str, torch.Tensor], config: TextEncoderConfig,
                         prefix: str = "") -> dict[str, torch.Tensor]:
    """An open_clip-layout text encoder state dict in CLIPTextModel's layout.

    Args:
        prefix: "" for transformers 5, TRANSFORMERS_PREFIX for older files (SD1 single files, old folders).
    """
    kept = PROJECTION_KEYS[:1] if config.projection_dim is not None else ()
    sd = {k: v for k, v in state_dict.items() if k not in IGNORED_OPEN_CLIP_KEYS or k in kept}
    out = {}
    for ours, theirs in text_key_map(config).items():
        if ours not in sd:
            raise ValueError(f"CLIP text encoder with {config.layers} layers expects key {ours!r}, missing here")
        tensor = sd.pop(ours)
        if ours == PROJECTION_KEYS[0]:
            out[theirs[0]] = tensor.T.contiguous()  # outside `text_model.`, as CLIPTextModelWithProjection has it
            continue
        if len(theirs) == 1:
            out[prefix + theirs[0]] = tensor
        else:  # clones, not views of one storage, so that safetensors can save them
            out.update({prefix + t: part.clone() for t, part in zip(theirs, tensor.chunk(len(theirs)))})
    _check_consumed(sd, "open_clip")
    return out


def text_from_open_clip(state_dict: dict[str, torch.Tensor],
                        config: TextEncoderConfig | None = None) -> dict[str, torch.Tensor]:
    """An open_clip text tower's weights (SD2's `cond_stage_model.model.*`, SDXL's `conditioner.embedders.*.model.*`,
    prefix stripped) without the keys it never reads: the projection unless it gives a pooled output, the
    temperature always."""
    kept = PROJECTION_KEYS[:1] if config is not None and config.projection_dim is not None else ()
    return {k: v for k, v in state_dict.items() if k not in IGNORED_OPEN_CLIP_KEYS or k in kept}
