"""DDPM: Denoising Diffusion Probabilistic Models (Ho, Jain & Abbeel 2020, arXiv:2006.11239)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..noise import randn
from .base import NoiseScheduler, SchedulerConfig, StepOutput, dynamic_threshold, predict_x0_and_eps

VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclass(frozen=True)
class DDPMConfig(SchedulerConfig):
    variance_type: str = "fixed_small"       # σ_t² of each step: β̃_t ("small") or β_t ("large"); "_log" via log σ²
    clip_sample: bool = True                 # clamp x̂0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    thresholding: bool = False               # Imagen dynamic thresholding of x̂0 (pixel models)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


def ddpm_noise_std(alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor, variance_type: str) -> torch.Tensor:
    """DDPM §3.2: σ_t² = β̃_t = (1-ᾱ_{t-1})/(1-ᾱ_t)·β_t (the posterior's variance) or σ_t² = β_t."""
    beta_t = 1 - alpha_bar_t / alpha_bar_prev  # β between two inference steps, not between training steps
    if variance_type.startswith("fixed_large"):
        variance = beta_t
    else:
        variance = ((1 - alpha_bar_prev) / (1 - alpha_bar_t) * beta_t).clamp(min=1e-20)
    if variance_type.endswith("_log"):  # improved-DDPM parametrises log σ²; σ = exp(½·log σ²)
        return torch.exp(0.5 * torch.log(variance))
    return variance**0.5


def ddpm_step(x_t: torch.Tensor, pred_x0: torch.Tensor, alpha_bar_t: torch.Tensor, alpha_bar_prev: torch.Tensor,
              noise_std: torch.Tensor | float, noise: torch.Tensor | None) -> torch.Tensor:
    """DDPM eq. 7: x_{t-1} = sqrt(ᾱ_{t-1})·β_t/(1-ᾱ_t)·x̂0 + sqrt(α_t)·(1-ᾱ_{t-1})/(1-ᾱ_t)·x_t + σ_t·z."""
    alpha_t = alpha_bar_t / alpha_bar_prev
    beta_t = 1 - alpha_t
    x0_coeff = (alpha_bar_prev**0.5 * beta_t) / (1 - alpha_bar_t)
    x_t_coeff = alpha_t**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar_t)
    mean = x0_coeff * pred_x0 + x_t_coeff * x_t
    return mean + noise_std * noise if noise is not None else mean


class DDPMScheduler(NoiseScheduler):
    """Ancestral sampling of the DDPM reverse process in ᾱ-space, over any subset of the training timesteps."""

    Config = DDPMConfig

    def _validate_config(self) -> None:
        super()._validate_config()
        variance_type = self.config.variance_type
        if variance_type.startswith("learned"):
            raise ValueError(f"variance_type {variance_type!r}: learned variances are not supported; "
                             f"use one of {VARIANCE_TYPES}")
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(f"variance_type {variance_type!r} is not one of {VARIANCE_TYPES}")

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        self._require_timesteps()
        c = self.config
        t = int(timestep)
        # Stateless: the previous timestep is the next entry of self.timesteps, found from t itself.
        i = self.index_for_timestep(t)
        prev_t = int(self.timesteps[i + 1]) if i + 1 < len(self.timesteps) else -1
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else torch.tensor(1.0)

        pred_x0, _ = predict_x0_and_eps(model_output, sample, alpha_bar_t, c.prediction_type)
        if c.thresholding:
            pred_x0 = dynamic_threshold(pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range)

        noise, noise_std = None, 0.0
        if t > 0:  # the last step (t = 0) returns the mean: no noise is drawn
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            noise_std = ddpm_noise_std(alpha_bar_t, alpha_bar_prev, c.variance_type)
        prev_sample = ddpm_step(sample, pred_x0, alpha_bar_t, alpha_bar_prev, noise_std, noise)
        return StepOutput(prev_sample, pred_x0)
