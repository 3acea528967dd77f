"""The KL-regularised autoencoder that maps images to SD's latents and back (Rombach et al. 2022, §3.1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..noise import Generator, randn
from .layers import Upsample, attention


@dataclass(frozen=True)
class VAEConfig:
    """The autoencoder's architecture in the terms of LDM's yaml (`first_stage_config.params.ddconfig`)."""

    ch: int = 128                          # width of the first level; level i is ch * ch_mult[i]
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)  # width multiplier per level; each level after the first halves H and W
    num_res_blocks: int = 2                # ResnetBlocks per encoder level (the decoder has one more)
    z_channels: int = 4                    # channels of the encoder's mean (and logvar) and of the decoder's input
    embed_dim: int = 4                     # latent channels between quant_conv and post_quant_conv
    in_channels: int = 3                   # image channels in
    out_ch: int = 3                        # image channels out
    scaling_factor: float = 0.18215        # latents × this have about unit variance for the diffusion model
    norm_groups: int = 32                  # GroupNorm groups everywhere (LDM hard-codes 32)
    force_upcast: bool = False             # SDXL: its fp16 activations overflow, so it always runs in fp32

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))  # yaml gives a list

    @classmethod
    def from_diffusers(cls, config: dict) -> VAEConfig:
        """Read a diffusers `AutoencoderKL` config (vae/config.json); refuse options LDM lacks."""
        for key, value in _DIFFUSERS_FIXED.items():
            if config.get(key, value) != value:
                raise ValueError(f"VAE config: {key}={config[key]!r} is not supported; only {value!r} is")
        widths = list(config["block_out_channels"])
        if any(w % widths[0] for w in widths):
            raise ValueError(f"VAE config: block_out_channels {widths} must be multiples of the first")
        for key, block in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if list(config.get(key, [block] * len(widths))) != [block] * len(widths):
                raise ValueError(f"VAE config: {key} must be {len(widths)} times {block!r}, got {config[key]}")
        latent = config.get("latent_channels", 4)
        return cls(ch=widths[0], ch_mult=tuple(w // widths[0] for w in widths),
                   num_res_blocks=config.get("layers_per_block", 1), z_channels=latent, embed_dim=latent,
                   in_channels=config.get("in_channels", 3), out_ch=config.get("out_channels", 3),
                   scaling_factor=config.get("scaling_factor", 0.18215), norm_groups=config.get("norm_num_groups", 32))

    def to_diffusers(self) -> dict:
        """The `AutoencoderKL(**config)` arguments of the same architecture."""
        if self.z_channels != self.embed_dim:
            raise ValueError(f"VAEConfig: diffusers needs z_channels == embed_dim, got {self.z_channels} and "
                             f"{self.embed_dim}")
        n = len(self.ch_mult)
        return dict(in_channels=self.in_channels, out_channels=self.out_ch,
                    block_out_channels=[self.ch * m for m in self.ch_mult],
                    down_block_types=["DownEncoderBlock2D"] * n, up_block_types=["UpDecoderBlock2D"] * n,
                    layers_per_block=self.num_res_blocks, latent_channels=self.z_channels,
                    norm_num_groups=self.norm_groups, scaling_factor=self.scaling_factor)


# AutoencoderKL options with no LDM counterpart: only the value SD uses is accepted
_DIFFUSERS_FIXED = {"act_fn": "silu", "shift_factor": None, "use_quant_conv": True, "use_post_quant_conv": True,
                    "mid_block_add_attention": True}

SD_VAE = VAEConfig()  # the kl-f8 autoencoder shared by SD 1.x and 2.x
# SDXL's retrained kl-f8: the same architecture, latents of another scale (Podell et al. 2023, §2.4)
SDXL_VAE = VAEConfig(scaling_factor=0.13025, force_upcast=True)
TINY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2)  # small enough for CPU tests; downsamples 4x


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, exp(logvar)) per latent element (Kingma & Welling 2014)."""

    def __init__(self, moments: torch.Tensor):
        self.moments = moments  # (B, 2·C, h, w): mean and logvar stacked on channels
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)  # diffusers' and LDM's clamp keeps exp() finite
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator: Generator = None) -> torch.Tensor:
        """z = mean + std·ε, ε drawn like diffusers' DiagonalGaussianDistribution (same seed, same z).

        Args:
            generator: one torch.Generator, or one per batch item, or None for the global RNG.
        """
        eps = randn(self.mean.shape, generator, self.moments.device, self.moments.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean


class ResnetBlock(nn.Module):
    """GroupNorm-SiLU-conv twice plus a skip, without a timestep (LDM diffusionmodules/model.py)."""

    def __init__(self, in_channels: int, out_channels: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions, 1x1 convs as projections (LDM model.py)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(proj(h), "b c h w -> b (h w) c") for proj in (self.q, self.k, self.v))  # (B, H·W, C)
        out = rearrange(attention(q, k, v, heads=1), "b (h w) c -> b c h w", h=x.shape[-2])  # (B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Halve H and W: pad right and bottom by one, then a stride-2 3x3 conv (LDM model.py)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Mid(nn.Module):
    """ResnetBlock, self-attention, ResnetBlock at the lowest resolution."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, groups)
        self.attn_1 = AttnBlock(channels, groups)
        self.block_2 = ResnetBlock(channels, channels, groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nn.Module):
    """Image (B, 3, H, W) -> mean and logvar (B, 2·z_channels, H/f, W/f), f = 2^(levels-1) (LDM model.py)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(c.in_channels, c.ch, 3, padding=1)
        self.down, ch = nn.ModuleList(), c.ch
        for i, width in enumerate(widths):
            stage = nn.Module()  # a bare container, as in LDM: checkpoints say down.i.block.j, down.i.downsample
            stage.block = nn.ModuleList(ResnetBlock(ch if j == 0 else width, width, c.norm_groups)
                                        for j in range(c.num_res_blocks))
            stage.downsample = Downsample(width) if i != len(widths) - 1 else nn.Identity()
            self.down.append(stage)
            ch = width
        self.mid = Mid(ch, c.norm_groups)
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, 2 * c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for stage in self.down:
            for block in stage.block:
                h = block(h)
            h = stage.downsample(h)
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))


class Decoder(nn.Module):
    """Latent (B, z_channels, h, w) -> image (B, 3, h·f, w·f), the encoder's mirror (LDM model.py)."""

    def __init__(self, c: VAEConfig):
        super().__init__()
        widths = [c.ch * m for m in c.ch_mult]
        ch = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, ch, 3, padding=1)
        self.mid = Mid(ch, c.norm_groups)
        stages = []  # built deepest first, indexed like the encoder's: up.0 is the full-resolution level
        for i, width in reversed(list(enumerate(widths))):
            stage = nn.Module()
            stage.block = nn.ModuleList(ResnetBlock(ch if j == 0 else width, width, c.norm_groups)
                                        for j in range(c.num_res_blocks + 1))
            stage.upsample = Upsample(width) if i != 0 else nn.Identity()
            stages.insert(0, stage)
            ch = width
        self.up = nn.ModuleList(stages)
        self.norm_out = nn.GroupNorm(c.norm_groups, ch, eps=1e-6)
        self.conv_out = nn.Conv2d(ch, c.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for stage in reversed(self.up):
            for block in stage.block:
                h = block(h)
            h = stage.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VAE(nn.Module):
    """SD's autoencoder: encode images in [-1, 1] to a latent Gaussian, decode latents to images (LDM §3.1)."""

    def __init__(self, config: VAEConfig):
        super().__init__()
        self.config = config
        self.scaling_factor = config.scaling_factor
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quant_conv = nn.Conv2d(2 * config.z_channels, 2 * config.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def encode(self, image: torch.Tensor) -> DiagonalGaussian:
        """q(z|x) for images (B, in_channels, H, W) in [-1, 1]; multiply a sample by scaling_factor for the UNet."""
        return DiagonalGaussian(self.quant_conv(self.encoder(image)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images in about [-1, 1] from latents z (B, embed_dim, h, w) already divided by scaling_factor."""
        return self.decoder(self.post_quant_conv(z))
