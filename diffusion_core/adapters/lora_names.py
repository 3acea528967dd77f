"""Where a LoRA file's module names point in our model, for every spelling that kohya, A1111, diffusers and PEFT use.

A LoRA names each module it changes in the layout its trainer saw. kohya's sd-scripts write diffusers' UNet names
(SD 1.x / 2.x) or LDM's (SDXL) with the dots turned into underscores, behind `lora_unet_`, and transformers' text
names behind `lora_te_` (SDXL: `lora_te1_` for CLIP ViT-L, `lora_te2_` for bigG). diffusers and PEFT keep the dots
behind `unet.`, `text_encoder.` and `text_encoder_2.` (a bare PEFT file behind `base_model.model.`). Our modules
carry LDM's and open_clip's names, so the table is derived from the key maps that load diffusers folders.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from ..checkpoints.keymaps import unet_key_pairs
from ..checkpoints.text_keys import PROJECTION_KEYS, TRANSFORMERS_PREFIX, text_key_map
from ..models.text_encoder import DualTextEncoder, TextEncoder, TextEncoderConfig, text_towers
from ..models.unet import UNetConfig, UNetModel

PEFT_PREFIX = "base_model.model."
# the matrices of a text block (open_clip names): attention's fused [q; k; v] and output, the MLP's two layers
TEXT_MATRICES = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


@dataclass(frozen=True)
class Target:
    """One weight that a LoRA module changes: a parameter of one of the model's networks, or a row block of it."""

    component: str  # the network, as an attribute path of DiffusionModel: "unet", "text_encoder.clip_l", ...
    key: str  # the parameter's name inside that network
    part: int = 0  # which of `parts` equal row blocks: nn.MultiheadAttention fuses [q; k; v] into one weight
    parts: int = 1
    transposed: bool = False  # open_clip applies text_projection as x @ P; a LoRA holds the Linear layout Pᵀ

    def describe(self) -> str:
        """The weight as our modules name it, e.g. "transformer.resblocks.0.attn.in_proj_weight[k]"."""
        return self.key + (f"[{'qkv'[self.part]}]" if self.parts == 3 else "")

    def parameter(self, model) -> nn.Parameter:
        """The whole weight this target is part of, in a DiffusionModel."""
        return network(model, self.component).get_parameter(self.key)

    def view(self, weight: torch.Tensor) -> torch.Tensor:
        """The part of the whole weight this target names, as a view: a row block of [q; k; v], or the transposed
        projection. Writing into it writes into the weight."""
        if self.parts > 1:
            rows = len(weight) // self.parts
            weight = weight.narrow(0, self.part * rows, rows)  # one view (chunk's several refuse autograd's in-place)
        return weight.T if self.transposed else weight

    def plus(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """weight with delta added to this target's part, out of place (so autograd can follow it)."""
        merged = weight.clone()
        part = self.view(merged)
        part.add_(delta.reshape(part.shape))
        return merged


def network(model, component: str) -> nn.Module:
    """The network a component path names in a DiffusionModel: "unet", "text_encoder", "text_encoder.clip_g"."""
    return functools.reduce(getattr, component.split("."), model)


def unet_targets(config: UNetConfig) -> dict[str, Target]:
    """Every name a LoRA file may give a UNet weight (diffusers' and LDM's, kohya's and dotted) -> its target."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in UNetModel(config).state_dict().items()}
    targets = {}
    for diffusers_key, ours in unet_key_pairs(config):
        if not ours.endswith(".weight") or len(shapes[ours]) < 2:  # norms and biases: no LoRA format trains them
            continue
        target = Target("unet", ours)
        for module in (diffusers_key.removesuffix(".weight"), ours.removesuffix(".weight")):
            targets["lora_unet_" + module.replace(".", "_")] = target
        module = diffusers_key.removesuffix(".weight")
        for prefix in ("unet.", PEFT_PREFIX, ""):  # "": diffusers' attention-processor files name no network
            targets[prefix + module] = target
    return targets


def text_targets(config: TextEncoderConfig, component: str, kohya_prefix: str,
                 dotted_prefixes: tuple[str, ...]) -> dict[str, Target]:
    """Every name a LoRA file may give a weight of one CLIP text tower (transformers' names) -> its target."""
    targets = {}
    for ours, theirs in text_key_map(config).items():
        if not ours.endswith(TEXT_MATRICES) and ours != PROJECTION_KEYS[0]:
            continue  # embeddings, norms and biases: no LoRA format trains them
        for part, their_key in enumerate(theirs):
            target = Target(component, ours, part, len(theirs), transposed=ours == PROJECTION_KEYS[0])
            module = their_key.removesuffix(".weight")
            in_text_model = [] if ours == PROJECTION_KEYS[0] else [TRANSFORMERS_PREFIX + module]
            for name in (*in_text_model, module):  # kohya writes `text_model.` (listed first), transformers 5 not
                targets[kohya_prefix + name.replace(".", "_")] = target
                targets.update((prefix + name, target) for prefix in dotted_prefixes)
    return targets


def model_targets(unet_config: UNetConfig, text_encoder: TextEncoder | DualTextEncoder) -> dict[str, Target]:
    """The whole table of a model: its UNet and each of its text towers."""
    names = {"text_encoder": ("lora_te_", ("text_encoder.", PEFT_PREFIX)),  # (kohya prefix, dotted prefixes)
             "text_encoder.clip_l": ("lora_te1_", ("text_encoder.",)),
             "text_encoder.clip_g": ("lora_te2_", ("text_encoder_2.",))}
    targets = unet_targets(unet_config)
    for component, tower in text_towers(text_encoder).items():
        targets.update(text_targets(tower.config, component, *names[component]))
    return targets
