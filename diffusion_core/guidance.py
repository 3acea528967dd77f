"""Classifier-free guidance: push the conditional prediction away from the unconditional one.

One UNet pass sees the batch twice, [unconditional; conditional] (the negative prompt, or "", then the
prompt), and the two predictions are combined here. Works for any prediction type (ε or v), as
diffusers applies it to whatever the UNet returns.
"""
from __future__ import annotations

import torch


def is_guided(guidance_scale: float) -> bool:
    """Scales <= 1 skip the unconditional pass, as diffusers does: scale 1 is the conditional prediction itself."""
    return guidance_scale > 1.0


def classifier_free_guidance(eps_uncond: torch.Tensor, eps_cond: torch.Tensor, guidance_scale: float,
                             guidance_rescale: float = 0.0) -> torch.Tensor:
    """Ho & Salimans 2022 (arXiv:2207.12598), eq. 6: ε̃ = ε_u + s·(ε_c - ε_u); s = 1 gives ε_c, s = 0 gives ε_u.

    With guidance_rescale φ > 0, ε̃ is then rescaled towards ε_c's standard deviation (Lin et al. 2023,
    arXiv:2305.08891, §3.4), which counters the over-exposure large scales cause.

    Args:
        eps_uncond, eps_cond: the UNet's predictions without and with the prompt, (B, C, H, W).
        guidance_scale: s; 7.5 is SD's default.
        guidance_rescale: φ in [0, 1]; 0 leaves ε̃ as it is (diffusers' default), 0.7 is the paper's choice.
    """
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    if guidance_rescale > 0.0:
        guided = rescale_guidance(guided, eps_cond, guidance_rescale)
    return guided


def rescale_guidance(guided: torch.Tensor, eps_cond: torch.Tensor, guidance_rescale: float) -> torch.Tensor:
    """Lin et al. 2023, §3.4, eqs. 15-16: x_rescaled = x_cfg·σ_pos/σ_cfg, x_final = φ·x_rescaled + (1-φ)·x_cfg.

    σ is each sample's standard deviation over all of its channels and pixels.
    """
    dims = list(range(1, eps_cond.ndim))
    std_cond = eps_cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    rescaled = guided * (std_cond / std_guided)
    return guidance_rescale * rescaled + (1 - guidance_rescale) * guided
