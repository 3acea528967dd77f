"""DDIM: Denoising Diffusion Implicit Models (Song, Meng & Ermon 2020, arXiv:2010.02502)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..noise import randn
from .base import NoiseScheduler, SchedulerConfig, StepOutput, dynamic_threshold, predict_x0_and_eps


@dataclass(frozen=True)
class DDIMConfig(SchedulerConfig):
    clip_sample: bool = True                 # clamp x̂0 to ±clip_sample_range
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True            # ᾱ after the last step: 1 (clean) or ᾱ_0
    thresholding: bool = False               # Imagen dynamic thresholding of x̂0 (pixel models)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0


def ddim_step(x_t: torch.Tensor, eps: torch.Tensor, pred_x0: torch.Tensor, alpha_bar_t: torch.Tensor,
              alpha_bar_prev: torch.Tensor, eta: float, noise: torch.Tensor | None) -> torch.Tensor:
    """DDIM eq. 12: x_{t-1} = sqrt(ᾱ_{t-1})·x̂0 + sqrt(1-ᾱ_{t-1}-σ²)·ε + σ·z, with σ from eq. 16 times η."""
    variance = (1 - alpha_bar_prev) / (1 - alpha_bar_t) * (1 - alpha_bar_t / alpha_bar_prev)
    sigma = eta * variance**0.5
    x_prev = alpha_bar_prev**0.5 * pred_x0 + (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
    return x_prev + sigma * noise if eta > 0 else x_prev


class DDIMScheduler(NoiseScheduler):
    """Deterministic (η = 0) or stochastic DDIM sampling in ᾱ-space."""

    Config = DDIMConfig

    def __init__(self, config: DDIMConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             eta: float = 0.0, generator: torch.Generator | None = None) -> StepOutput:
        self._require_timesteps()
        c = self.config
        t = int(timestep)
        # diffusers steps back by T // n whatever the spacing; we follow it to give the same trajectory.
        prev_t = t - c.num_train_timesteps // self.num_inference_steps
        alpha_bar_t = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        pred_x0, eps = predict_x0_and_eps(model_output, sample, alpha_bar_t, c.prediction_type)
        if c.thresholding:
            pred_x0 = dynamic_threshold(pred_x0, c.dynamic_thresholding_ratio, c.sample_max_value)
        elif c.clip_sample:
            pred_x0 = pred_x0.clamp(-c.clip_sample_range, c.clip_sample_range)

        noise = None
        if eta > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = ddim_step(sample, eps, pred_x0, alpha_bar_t, alpha_bar_prev, eta, noise)
        return StepOutput(prev_sample, pred_x0)
