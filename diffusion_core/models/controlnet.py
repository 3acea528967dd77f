"""ControlNet (Zhang, Rao & Agrawala 2023, arXiv:2302.05543): steering a frozen UNet with an image.

The idea in three lines (§3.1-3.2):
  1. make a trainable copy of the UNet's encoder half (the down path and the middle block);
  2. feed it the noisy latent plus a small convolutional embedding of the control image (edges, depth, pose...);
  3. join each of its outputs to the frozen UNet through a 1x1 convolution initialised to zero.

At initialisation every zero convolution outputs 0, so the UNet with a ControlNet is exactly the UNet without
one: training starts from the unchanged model and can only add what the control image teaches. The outputs
are residuals: one per skip connection, added to the UNet's skips after its down path, and one added to its
middle block's output (models/unet.py, `down_residuals` / `mid_residual`).

In the file the copy carries the UNet's LDM names (lllyasviel's cldm.py): `input_blocks`, `middle_block`,
`time_embed`, plus `input_hint_block` (the control-image embedding), `zero_convs.N.0` and `middle_block_out.0`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from .unet import UNetConfig, UNetEncoder

# the control-image embedding: widths of its 3x3 convolutions; each width after the first comes with stride 2
HINT_CHANNELS = (16, 32, 96, 256)


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet: the UNet encoder it copies, plus what only the ControlNet has."""

    unet: UNetConfig                      # the copied half's architecture (its up path is never built)
    hint_channels: int = 3                # channels of the control image
    embedding_channels: tuple[int, ...] = HINT_CHANNELS
    global_pool_conditions: bool = False  # shuffle models: each residual averaged over the image (diffusers' flag)

    @property
    def family(self) -> str:
        """The model family the ControlNet was trained for, read from its context width."""
        return family_of(self.unet)


def family_of(unet: UNetConfig) -> str:
    """"sd1", "sd2", "sdxl" (by context width and the added embedding), or a description of another UNet."""
    if unet.adm_in_channels is not None:
        return "sdxl" if unet.context_dim == 2048 else f"sdxl-like (context width {unet.context_dim})"
    return {768: "sd1", 1024: "sd2"}.get(unet.context_dim, f"custom (context width {unet.context_dim})")


def zero_conv(channels: int) -> nn.Conv2d:
    """A 1x1 convolution whose weights and bias start at zero: ControlNet's 'zero convolution' (§3.1)."""
    conv = nn.Conv2d(channels, channels, 1)
    nn.init.zeros_(conv.weight)
    nn.init.zeros_(conv.bias)
    return conv


def hint_embedding(in_channels: int, widths: tuple[int, ...], out_channels: int) -> nn.Sequential:
    """E(c): 3x3 convs with SiLU, each new width at stride 2 (512 px -> 64 latents), then a zero conv to the
    UNet's first width (diffusers' ControlNetConditioningEmbedding; cldm's input_hint_block, same indices)."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, widths[0], 3, padding=1), nn.SiLU()]
    for width, wider in zip(widths, widths[1:]):
        layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                   nn.Conv2d(width, wider, 3, padding=1, stride=2), nn.SiLU()]
    out = nn.Conv2d(widths[-1], out_channels, 3, padding=1)
    nn.init.zeros_(out.weight)
    nn.init.zeros_(out.bias)
    return nn.Sequential(*layers, out)


class ControlNetModel(UNetEncoder):
    """The UNet's first half, plus a control-image embedding and one zero convolution per output."""

    def __init__(self, config: ControlNetConfig):
        super().__init__(config.unet)
        self.controlnet_config = config
        c = config.unet
        self.input_hint_block = hint_embedding(config.hint_channels, config.embedding_channels, c.model_channels)
        self.zero_convs = nn.ModuleList([nn.Sequential(zero_conv(ch)) for ch in self.skip_channels])
        self.middle_block_out = nn.Sequential(zero_conv(c.model_channels * c.channel_mult[-1]))

    @classmethod
    def from_pretrained(cls, path, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> ControlNetModel:
        """Load lllyasviel's original files (.pth, .safetensors; `control_model.*` keys, also inside v1.0 files
        that bundle SD's weights), diffusers-keyed single files, or a diffusers ControlNetModel folder."""
        from ..checkpoints.controlnet import load_controlnet
        return load_controlnet(path, device=device, dtype=dtype)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor | float | int, context: torch.Tensor,
                cond_image: torch.Tensor, scale: float = 1.0, text_embeds: torch.Tensor | None = None,
                time_ids: torch.Tensor | None = None, guess_mode: bool = False
                ) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The residuals (one per UNet skip, one for the middle block), scaled: diffusers' ControlNetModel(...).

        Args:
            sample, timestep, context, text_embeds, time_ids: what the UNet sees at this step.
            cond_image: the control image (B, hint_channels, 8h, 8w) in [0, 1] (inpainting: -1 where masked).
            scale: the control's strength; every residual is multiplied by it.
            guess_mode: scale the residuals from 0.1 (the first, finest skip) to 1 (the middle block),
                log-spaced, as diffusers does when the ControlNet must guess the content without a prompt.
        """
        emb = self.embedding(sample, timestep, text_embeds, time_ids)
        hint = self.input_hint_block(cond_image.to(sample.dtype))
        h, outputs = sample, []
        for n, block in enumerate(self.input_blocks):
            h = block(h, emb, context)
            if n == 0:  # the control enters once, added to the first convolution's output
                h = h + hint
            outputs.append(h)
        h = self.middle_block(h, emb, context)
        down = [zero(out) for zero, out in zip(self.zero_convs, outputs)]
        mid = self.middle_block_out(h)
        pooled = self.controlnet_config.global_pool_conditions
        if guess_mode and not pooled:
            scales = torch.logspace(-1, 0, len(down) + 1, device=sample.device) * scale  # 0.1 ... 1.0
            down, mid = [d * s for d, s in zip(down, scales)], mid * scales[-1]
        else:
            down, mid = [d * scale for d in down], mid * scale
        if pooled:
            down, mid = [d.mean(dim=(2, 3), keepdim=True) for d in down], mid.mean(dim=(2, 3), keepdim=True)
        return down, mid


def controlnet_config_for(unet: UNetConfig, **fields) -> ControlNetConfig:
    """A ControlNet for a UNet of this architecture (what training one from a model starts from)."""
    latent = unet.out_channels  # an inpainting UNet's 9 inputs are the latent's 4 plus mask and masked image
    return ControlNetConfig(replace(unet, in_channels=latent, out_channels=latent), **fields)


@torch.no_grad()
def copy_encoder(controlnet: ControlNetModel, unet: nn.Module) -> ControlNetModel:
    """Initialise the trainable copy from the UNet's own encoder weights (ControlNet §3.2); zero convs stay 0."""
    own = controlnet.state_dict()
    shared = {k: v for k, v in unet.state_dict().items() if k in own and own[k].shape == v.shape}
    controlnet.load_state_dict(shared, strict=False)
    return controlnet
