"""Euler: Karras et al. 2022 (arXiv:2206.00364), Algorithm 2 without its second-order (Heun) correction.

σ-space: the sample is x = x0 + σ·ε (x_t/sqrt(ᾱ_t) in DDPM terms), and sampling integrates the
probability-flow ODE dx/dσ = (x - x̂0)/σ from σ_max down to 0 with one Euler step per timestep.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import schedules
from ..noise import randn
from .base import NoiseScheduler, SchedulerConfig, StepOutput

INTERPOLATION_TYPES = ("linear", "log_linear")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")


@dataclass(frozen=True)
class EulerConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # diffusers' Euler default: fractional timesteps from 0 to T-1
    interpolation_type: str = "linear"  # σ between training steps: "linear" in t, or "log_linear" in log σ
    use_karras_sigmas: bool = False     # replace the σs by Karras et al. eq. 5 (ρ = 7) between the same ends
    final_sigmas_type: str = "zero"     # σ after the last step: "zero" (clean) or "sigma_min" (σ at t = 0)


def euler_sigmas(alpha_bar: torch.Tensor, num_inference_steps: int, spacing: str, steps_offset: int,
                 interpolation_type: str = "linear", use_karras_sigmas: bool = False,
                 final_sigmas_type: str = "zero") -> tuple[np.ndarray, np.ndarray]:
    """The Euler family's timesteps and σs, as diffusers builds them: one σ per timestep, then the final σ."""
    n = num_inference_steps
    timesteps = schedules.spaced_timesteps(spacing, n, len(alpha_bar), steps_offset, round_linspace=False)
    train_sigmas = schedules.training_sigmas(alpha_bar)
    if interpolation_type == "linear":
        sigmas = schedules.interpolate_sigmas(timesteps, train_sigmas)
    else:  # diffusers' quirk: n+1 log-linear σs for n timesteps, so the last step ends at σ_min, not at 0
        sigmas = schedules.log_linear_sigmas(train_sigmas, n + 1)
    if use_karras_sigmas:
        sigmas = schedules.karras_sigmas(sigmas[-1].item(), sigmas[0].item(), n)
        timesteps = schedules.sigma_to_t(sigmas, np.log(train_sigmas))
    sigma_last = train_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(np.float32), np.concatenate([sigmas, [sigma_last]]).astype(np.float32)


def predict_x0(model_output: torch.Tensor, x: torch.Tensor, sigma: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """Karras et al. Table 1 denoiser D(x; σ): x̂0 = x - σ·ε, or c_skip·x + c_out·v = x/(σ²+1) - σ·v/sqrt(σ²+1)."""
    if prediction_type == "epsilon":
        return x - sigma * model_output
    if prediction_type == "v_prediction":
        return model_output * (-sigma / (sigma**2 + 1) ** 0.5) + (x / (sigma**2 + 1))
    return model_output  # "sample": the model predicts x0 itself


def euler_step(x: torch.Tensor, pred_x0: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """Karras et al. Alg. 2 lines 7-8: d = (x - x̂0)/σ, x_next = x + (σ_next - σ)·d."""
    d = (x - pred_x0) / sigma
    return x + d * (sigma_next - sigma)


class EulerScheduler(NoiseScheduler):
    """Euler's method on the probability-flow ODE in σ-space, with Karras' optional "churn" noise."""

    Config = EulerConfig

    def __init__(self, config: EulerConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # diffusers: ᾱ_T = 0 would make σ_T infinite; fp16's smallest subnormal
        T = self.config.num_train_timesteps
        train_sigmas = schedules.training_sigmas(self.alphas_cumprod)[::-1]  # before set_timesteps, as for training
        self._use_schedule(np.arange(T - 1, -1, -1, dtype=np.float32),
                           np.append(train_sigmas, 0.0).astype(np.float32))

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.interpolation_type not in INTERPOLATION_TYPES:
            raise ValueError(f"interpolation_type {c.interpolation_type!r} is not one of {INTERPOLATION_TYPES}")
        if c.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type {c.final_sigmas_type!r} is not one of {FINAL_SIGMAS_TYPES}")

    def _use_schedule(self, timesteps: np.ndarray, sigmas: np.ndarray,
                      device: torch.device | str | None = None) -> None:
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.sigmas = torch.from_numpy(sigmas)  # kept on the CPU like diffusers': reading one needs no device sync
        sigma_max = self.sigmas.max()
        # diffusers' quirk: x_T = σ_max·z (k-diffusion) except with "leading" spacing, which keeps sqrt(σ_max²+1)
        leading = self.config.timestep_spacing == "leading"
        self.init_noise_sigma = float((sigma_max**2 + 1) ** 0.5 if leading else sigma_max)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._check_num_steps(num_inference_steps)
        c = self.config
        timesteps, sigmas = euler_sigmas(self.alphas_cumprod, num_inference_steps, c.timestep_spacing, c.steps_offset,
                                         c.interpolation_type, c.use_karras_sigmas, c.final_sigmas_type)
        self._use_schedule(timesteps, sigmas, device)
        self.num_inference_steps = num_inference_steps

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """The network expects x_t = x/sqrt(σ²+1), the DDPM-scaled sample (Karras et al. Table 1, c_in)."""
        sigma = self.sigmas[self.index_for_timestep(timestep)]
        return sample / ((sigma**2 + 1) ** 0.5)

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
             generator: torch.Generator | None = None) -> StepOutput:
        self._require_timesteps()
        i = self.index_for_timestep(timestep)
        sigma, sigma_next = float(self.sigmas[i]), float(self.sigmas[i + 1])  # scalar maths in Python: cheaper
        x = sample.to(torch.float32)

        # Karras Alg. 2 lines 4-6: γ = min(S_churn/N, √2-1) if S_tmin ≤ σ ≤ S_tmax, σ̂ = (1+γ)σ, x̂ = x + sqrt(σ̂²-σ²)·ε
        in_range = s_churn != 0 and s_tmin <= sigma <= s_tmax
        gamma = min(s_churn / (len(self.sigmas) - 1), 2**0.5 - 1) if in_range else 0.0
        sigma_hat = sigma * (gamma + 1)
        if gamma > 0:
            noise = randn(model_output.shape, generator, model_output.device, model_output.dtype)
            x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5

        # diffusers' quirk: only ε-prediction uses σ̂; v-prediction keeps σ
        sigma_model = sigma_hat if self.config.prediction_type == "epsilon" else sigma
        pred_x0 = predict_x0(model_output, x, sigma_model, self.config.prediction_type)
        prev_sample = euler_step(x, pred_x0, sigma_hat, sigma_next)
        return StepOutput(prev_sample.to(model_output.dtype), pred_x0)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The σ-space forward process: x = x0 + σ_t·ε for each sample's timestep."""
        indices = [self.index_for_timestep(t) for t in timesteps]
        sigma = self.sigmas.to(original_samples.device, original_samples.dtype)[indices]
        return original_samples + noise * schedules.expand_to(sigma, original_samples)
