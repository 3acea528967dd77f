"""UNet building blocks: timestep embedding, ResBlock, resampling, attention and the spatial transformer.

Module and attribute names follow LDM's `openaimodel.py` / `attention.py`, so the weights of an
original checkpoint load with plain `load_state_dict`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos(t·ω_i), sin(t·ω_i)], ω_i = max_period^(-i/half), in float32 (DDPM appendix B).

    The order of operations is diffusers' `get_timestep_embedding` (flip_sin_to_cos=True, shift 0).
    """
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    angles = t[:, None].float() * torch.exp(exponent)[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # (B, dim)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, upcast: bool = False) -> torch.Tensor:
    """softmax(QKᵀ/√d)·V for each head, through PyTorch's fused kernel (Vaswani et al. 2017, eq. 1).

    q: (B, T, heads·d), k and v: (B, S, heads·d). With `upcast`, fp16/bf16 inputs are attended in fp32,
    which keeps SD2-768-v's softmax from overflowing.
    """
    q, k, v = (rearrange(x, "b n (h d) -> b h n d", h=heads) for x in (q, k, v))  # (B, heads, n, d)
    if upcast and q.dtype in (torch.float16, torch.bfloat16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return rearrange(out, "b h n d -> b n (h d)")  # (B, T, heads·d)


class CrossAttention(nn.Module):
    """Multi-head attention of image tokens to `context` (cross-) or to themselves (self-) (LDM §3.3)."""

    def __init__(self, query_dim: int, heads: int, head_dim: int, context_dim: int | None = None,
                 upcast: bool = False):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.upcast = heads, upcast
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim or query_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim))  # a Sequential: checkpoints say `to_out.0`

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        return self.to_out(attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast))


class GEGLU(nn.Module):
    """GELU-gated linear unit: (xW + b) ⊙ GELU(xV + c) (Shazeer 2020, eq. 5)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, 2 * dim_out)  # both halves in one matmul, value first, gate second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        return value * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise MLP, with a GEGLU and a 4× wider hidden layer (LDM attention.py)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is LDM's dropout slot, kept so the output layer is `net.2` as in checkpoints
        self.net = nn.Sequential(GEGLU(dim, mult * dim), nn.Identity(), nn.Linear(mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, then feed-forward, each residual (LDM §3.3)."""

    def __init__(self, dim: int, heads: int, head_dim: int, context_dim: int, upcast: bool):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads, head_dim, upcast=upcast)
        self.ff = FeedForward(dim)
        self.attn2 = CrossAttention(dim, heads, head_dim, context_dim, upcast=upcast)
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim, eps=1e-5) for _ in range(3))

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer blocks -> feature map, plus the input (LDM §3.3, fig. 3).

    SD1 projects in and out with 1x1 convs on the map, SD2 with Linear layers on the tokens.
    """

    def __init__(self, channels: int, heads: int, head_dim: int, depth: int, context_dim: int,
                 use_linear: bool, groups: int, upcast: bool):
        super().__init__()
        inner = heads * head_dim
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, head_dim, context_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if self.use_linear:  # SD2: project the tokens
            tokens = self.proj_in(rearrange(self.norm(x), "b c h w -> b (h w) c"))  # (B, H·W, C)
        else:  # SD1: project the map
            tokens = rearrange(self.proj_in(self.norm(x)), "b c h w -> b (h w) c")  # (B, H·W, C)
        for block in self.transformer_blocks:
            tokens = block(tokens, context)
        if self.use_linear:
            return x + rearrange(self.proj_out(tokens), "b (h w) c -> b c h w", h=h, w=w)
        return x + self.proj_out(rearrange(tokens, "b (h w) c -> b c h w", h=h, w=w))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the timestep embedding added in between, plus a skip (DDPM appendix B)."""

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int, groups: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(groups, in_channels, eps=1e-5), nn.SiLU(),
                                       nn.Conv2d(in_channels, out_channels, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, out_channels))
        # index 2 is LDM's dropout slot, kept so the conv is `out_layers.3` as in checkpoints
        self.out_layers = nn.Sequential(nn.GroupNorm(groups, out_channels, eps=1e-5), nn.SiLU(), nn.Identity(),
                                        nn.Conv2d(out_channels, out_channels, 3, padding=1))
        # a 1x1 conv only where the channel count changes, as in checkpoints
        self.skip_connection = (nn.Identity() if in_channels == out_channels
                                else nn.Conv2d(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h = h + self.emb_layers(emb)[:, :, None, None]  # (B, C) broadcast over H, W
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 conv (LDM openaimodel.py)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling, then a 3x3 conv (LDM openaimodel.py; the VAE decoder's too)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int] | None = None) -> torch.Tensor:
        # `size` lets an odd-sized map come back to its skip's size, as diffusers allows
        size = size or (2 * x.shape[-2], 2 * x.shape[-1])
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
