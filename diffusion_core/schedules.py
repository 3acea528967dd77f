"""The one home of the noise-schedule math: β → ᾱ → σ, timestep spacing, and sigma schedules.

Two spaces, one bridge. DDPM/DDIM/PNDM think in ᾱ_t ("alpha_bar", how much signal is left);
Euler/Euler-A/DPM-Solver/UniPC think in σ_t (noise-to-signal ratio of x_t/sqrt(ᾱ_t)). The bridge is

    σ = sqrt((1 - ᾱ) / ᾱ)        and back        ᾱ = 1 / (1 + σ²)

Everything is computed in float32 where diffusers does, so the numbers match it exactly.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


def make_betas(num_train_timesteps: int, beta_start: float, beta_end: float,
               beta_schedule: str = "linear", trained_betas=None) -> torch.Tensor:
    """β_1..β_T for a named schedule (DDPM's linear, LDM's scaled_linear, the improved-DDPM cosine)."""
    if trained_betas is not None:
        return torch.tensor(trained_betas, dtype=torch.float32)
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float32)
    if beta_schedule == "scaled_linear":  # Stable Diffusion: linear in sqrt(β)
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float32) ** 2
    if beta_schedule == "squaredcos_cap_v2":
        return cosine_betas(num_train_timesteps)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; expected one of {BETA_SCHEDULES} "
                     "or trained_betas")


def cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> torch.Tensor:
    """Nichol & Dhariwal 2021 eq. 17: ᾱ(t) = cos²((t + s)/(1 + s)·π/2), β_t = 1 - ᾱ(t)/ᾱ(t-1), s = 0.008."""
    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    T = num_train_timesteps
    betas = [min(1 - alpha_bar((i + 1) / T) / alpha_bar(i / T), max_beta) for i in range(T)]
    return torch.tensor(betas, dtype=torch.float32)


def rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023, Algorithm 1: shift and scale sqrt(ᾱ) so that ᾱ_T = 0 (zero SNR at the last step)."""
    sqrt_alpha_bar = torch.cumprod(1.0 - betas, dim=0).sqrt()
    first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
    sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
    alpha_bar = sqrt_alpha_bar**2
    alphas = torch.cat([alpha_bar[0:1], alpha_bar[1:] / alpha_bar[:-1]])  # undo the cumprod
    return 1 - alphas


def alpha_bar_from_betas(betas: torch.Tensor) -> torch.Tensor:
    """ᾱ_t = Π_{s≤t} (1 - β_s)."""
    return torch.cumprod(1.0 - betas, dim=0)


def sigma_from_alpha_bar(alpha_bar: torch.Tensor) -> torch.Tensor:
    """σ = sqrt((1 - ᾱ) / ᾱ): the bridge from ᾱ-space to σ-space."""
    return ((1 - alpha_bar) / alpha_bar) ** 0.5


def alpha_sigma_from_sigma(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(α_t, σ_t) of x_t = α_t·x0 + σ_t·ε from the σ-space σ: α_t = sqrt(ᾱ) = 1/sqrt(1+σ²), σ_t = σ·α_t."""
    alpha_t = 1 / (sigma**2 + 1) ** 0.5
    return alpha_t, sigma * alpha_t


def training_sigmas(alpha_bar: torch.Tensor) -> np.ndarray:
    """σ at every training timestep, ascending with t, as the numpy array diffusers interpolates."""
    return np.array(sigma_from_alpha_bar(alpha_bar))


def spaced_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int,
                     steps_offset: int = 0, round_linspace: bool = True) -> np.ndarray:
    """Pick num_inference_steps of the T training timesteps, descending (Lin et al. 2023, Table 2).

    leading: 0, k, 2k, ... (+ steps_offset), k = T // n    trailing: T-1, T-1-k, ..., k = T / n
    linspace: evenly from 0 to T-1 (left fractional when round_linspace is False, as the Euler family does).
    """
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "linspace":
        timesteps = np.linspace(0, T - 1, n)
        return (timesteps.round() if round_linspace else timesteps.astype(np.float32))[::-1].copy()
    if spacing == "leading":
        if (n - 1) * (T // n) + steps_offset >= T:
            raise ValueError(f"leading spacing with steps_offset={steps_offset} would reach timestep {T} with "
                             f"{n} steps; use at most {T - steps_offset} steps, or 'trailing' spacing")
        return (np.arange(0, n) * (T // n)).round()[::-1] + steps_offset
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    raise ValueError(f"unknown timestep_spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}")


def interpolate_sigmas(timesteps: np.ndarray, sigmas: np.ndarray) -> np.ndarray:
    """σ at (possibly fractional) timesteps, linear in t between the training timesteps."""
    return np.interp(timesteps, np.arange(len(sigmas)), sigmas)


def log_linear_sigmas(sigmas: np.ndarray, num_points: int) -> np.ndarray:
    """num_points σ evenly spaced in log σ, from the largest training σ down to the smallest."""
    return torch.linspace(np.log(sigmas[-1]), np.log(sigmas[0]), num_points).exp().numpy()


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. 2022 eq. 5: σ_i = (σ_max^(1/ρ) + i/(n-1)·(σ_min^(1/ρ) - σ_max^(1/ρ)))^ρ."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigma: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """The fractional training timestep whose σ is `sigma`, interpolating linearly in log σ."""
    sigma = np.asarray(sigma)
    log_sigma = np.log(np.maximum(sigma, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    w = np.clip((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1]), 0, 1)
    return ((1 - w) * low + w * (low + 1)).reshape(sigma.shape)


def expand_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape per-sample values (B,) to broadcast against x (B, C, H, W)."""
    return values.flatten().reshape(-1, *([1] * (x.ndim - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """DDPM eq. 4, the forward process in closed form: x_t = sqrt(ᾱ_t)·x0 + sqrt(1 - ᾱ_t)·ε."""
    alpha_bar_t = expand_to(alpha_bar_t.to(x0.device, x0.dtype), x0)
    return alpha_bar_t**0.5 * x0 + (1 - alpha_bar_t) ** 0.5 * noise


def velocity(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor) -> torch.Tensor:
    """The v-prediction target (Salimans & Ho 2022, §4): v = sqrt(ᾱ_t)·ε - sqrt(1 - ᾱ_t)·x0."""
    alpha_bar_t = expand_to(alpha_bar_t.to(x0.device, x0.dtype), x0)
    return alpha_bar_t**0.5 * noise - (1 - alpha_bar_t) ** 0.5 * x0
