"""Euler ancestral: an Euler step down to σ_down, then fresh noise up to σ_next (k-diffusion sample_euler_ancestral).

The ancestral split follows Song et al. 2021 / Karras et al. 2022 (arXiv:2206.00364): of the target
noise level σ_next, the part σ_up is new Gaussian noise and only σ_down is reached deterministically.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ..noise import randn
from .base import SchedulerConfig, StepOutput
from .euler import EulerScheduler, euler_step, predict_x0


@dataclass(frozen=True)
class EulerAncestralConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # diffusers' Euler-A default: fractional timesteps from 0 to T-1
    # diffusers' Euler-A has no σ-schedule options; class constants (not config keys) fix Euler's defaults,
    # so from_config ignores these keys, as diffusers does.
    interpolation_type: ClassVar[str] = "linear"
    use_karras_sigmas: ClassVar[bool] = False
    final_sigmas_type: ClassVar[str] = "zero"


def ancestral_sigmas(sigma: torch.Tensor, sigma_next: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion get_ancestral_step, η = 1: σ_up = sqrt(σ_next²(σ²-σ_next²)/σ²), σ_down = sqrt(σ_next²-σ_up²)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_up, sigma_down


def euler_ancestral_step(x: torch.Tensor, pred_x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                         noise: torch.Tensor) -> torch.Tensor:
    """x_next = x + (σ_down - σ)·(x - x̂0)/σ + σ_up·z: an Euler step down to σ_down, then noise up to σ_next."""
    sigma_up, sigma_down = ancestral_sigmas(sigma, sigma_next)
    return euler_step(x, pred_x0, sigma, sigma_down) + noise * sigma_up


class EulerAncestralScheduler(EulerScheduler):
    """Euler's method with ancestral noise in σ-space; timesteps, σs and add_noise are Euler's."""

    Config = EulerAncestralConfig

    def _validate_config(self) -> None:
        super()._validate_config()
        if self.config.prediction_type == "sample":  # diffusers raises NotImplementedError for it too
            raise ValueError("EulerAncestralScheduler supports prediction_type 'epsilon' and 'v_prediction', "
                             "not 'sample'")

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        self._require_timesteps()
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])  # scalar maths in Python: cheaper
        x = sample.to(torch.float32)
        pred_x0 = predict_x0(model_output, x, sigma, self.config.prediction_type)
        # drawn at every step, the last (σ_up = 0) included, so a seeded generator advances as diffusers' does
        noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = euler_ancestral_step(x, pred_x0, sigma, sigma_next, noise)
        return StepOutput(prev_sample.to(model_output.dtype), pred_x0)
