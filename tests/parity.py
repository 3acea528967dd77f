"""Shared helpers for parity tests against diffusers / transformers."""
from __future__ import annotations

import torch


def max_rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|: the error relative to the reference's scale."""
    actual, expected = actual.detach().double(), expected.detach().double()
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-12)).item()


def assert_rel_close(actual: torch.Tensor, expected: torch.Tensor, max_rel: float, msg: str = "") -> None:
    """assert_close with an absolute tolerance of `max_rel` times the reference's largest value."""
    scale = expected.detach().abs().max().clamp_min(1e-12).item()
    torch.testing.assert_close(actual.detach().to(expected.dtype), expected.detach(),
                               rtol=0.0, atol=max_rel * scale, msg=lambda m: f"{msg}\n{m}")


@torch.no_grad()
def perturb_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every parameter, so zero-initialised layers and unit norms hide no mapping bug."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module
