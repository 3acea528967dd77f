"""Seeded Gaussian noise drawn exactly where and how diffusers draws it."""
from __future__ import annotations

import torch

Generator = torch.Generator | list[torch.Generator] | None


def randn(shape: tuple[int, ...] | torch.Size, generator: Generator = None,
          device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Standard normal noise, drawn on the generator's device and then moved (diffusers' randn_tensor).

    A CPU generator therefore gives the same numbers whatever device the model runs on. A list of
    generators draws one batch item from each, so image i of a batch equals image i made alone.
    """
    if isinstance(generator, (list, tuple)):
        if len(generator) != shape[0]:
            raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
        return torch.cat([randn((1, *shape[1:]), g, device, dtype) for g in generator])
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
