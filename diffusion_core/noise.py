"""Seeded Gaussian noise drawn exactly where and how diffusers draws it."""
from __future__ import annotations

import torch


def randn(shape: tuple[int, ...] | torch.Size, generator: torch.Generator | None = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise; drawn on the generator's device, then moved (diffusers' randn_tensor).

    A CPU generator therefore gives the same numbers whatever device the model runs on.
    """
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
