"""Memory options for large images: the UNet on slices of the batch, the VAE decoder on overlapping tiles.

Neither changes what is computed: a UNet slice is the same function on fewer samples, and a pointwise
decoder tiled gives the whole image exactly (tests/test_pipeline.py). SD's decoder has 3x3 convolutions and
one attention layer, so tiles differ slightly at their borders; the linear blend hides the seams.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

TILE_LATENT = 64  # VAE tiles of 64x64 latents (512 px for SD), overlapping by a quarter


class BatchSlicedUNet(nn.Module):
    """Runs a UNet on at most `slice_size` samples at a time: less activation memory, same predictions."""

    def __init__(self, unet: nn.Module, slice_size: int, config: Any):
        super().__init__()
        self.unet, self.slice_size, self.config = unet, slice_size, config

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                **added: torch.Tensor | list[torch.Tensor] | None) -> torch.Tensor:
        n = self.slice_size
        return torch.cat([self.unet(sample[i:i + n], timestep, context[i:i + n],
                                    **{k: _rows(v, i, n) for k, v in added.items()})
                          for i in range(0, len(sample), n)])


def _rows(value: torch.Tensor | list[torch.Tensor] | None, i: int, n: int) -> torch.Tensor | list[torch.Tensor] | None:
    """Rows i..i+n of a per-sample input: a tensor, or each tensor of a list (a ControlNet's residuals)."""
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [v[i:i + n] for v in value]
    return value[i:i + n]


def decode_tiled(vae: nn.Module, z: torch.Tensor, tile: int = TILE_LATENT) -> torch.Tensor:
    """Decode overlapping latent tiles and blend them with linear ramps: memory of one tile, any image size."""
    h, w = z.shape[-2:]
    if h <= tile and w <= tile:
        return vae.decode(z)
    f = 2 ** (len(vae.config.ch_mult) - 1)
    overlap = tile // 4
    out = torch.zeros(z.shape[0], vae.config.out_ch, h * f, w * f, device=z.device, dtype=torch.float32)
    weight = torch.zeros(1, 1, h * f, w * f, device=z.device, dtype=torch.float32)
    for top in _tile_starts(h, tile, tile - overlap):
        for left in _tile_starts(w, tile, tile - overlap):
            piece = vae.decode(z[..., top:top + tile, left:left + tile]).float()
            ramp = _ramp(piece.shape[-2], overlap * f, z.device)[:, None] * _ramp(piece.shape[-1], overlap * f,
                                                                                  z.device)[None, :]
            rows, cols = slice(top * f, top * f + piece.shape[-2]), slice(left * f, left * f + piece.shape[-1])
            out[..., rows, cols] += piece * ramp
            weight[..., rows, cols] += ramp
    return (out / weight).to(z.dtype)


def _tile_starts(length: int, tile: int, stride: int) -> list[int]:
    starts = list(range(0, max(length - tile, 0) + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


def _ramp(length: int, overlap: int, device: torch.device) -> torch.Tensor:
    """Weights rising linearly over `overlap` pixels at both ends (never 0, so lone borders keep their tile)."""
    x = torch.arange(length, device=device, dtype=torch.float32)
    return torch.minimum(torch.ones_like(x), torch.minimum(x + 1, length - x) / (overlap + 1))


def free_memory(device: torch.device) -> int | None:
    """Free bytes on the device: CUDA's own count, or MemAvailable of Linux's /proc/meminfo; None if unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type == "cpu" and meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None
