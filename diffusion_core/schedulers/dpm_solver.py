"""DPM-Solver++ multistep (Lu et al. 2022, arXiv:2211.01095) and the original DPM-Solver (Lu et al. 2022,
arXiv:2206.00927).

Both write x_t = α_t·x0 + σ_t·ε and step in λ_t = log(α_t/σ_t), half the log-SNR, where the linear
part of the probability-flow ODE is solved exactly and only the model's prediction is approximated:

    DPM-Solver   (noise form, eq. 3.4):  x_t = (α_t/α_s)·x_s − α_t ∫ e^{−λ} ε̂ dλ
    DPM-Solver++ (data form):            x_t = (σ_t/σ_s)·x_s + σ_t ∫ e^{λ} x̂0 dλ

The k-th order multistep solver expands the prediction in λ with finite differences of the k-1
previous model outputs, so every step costs one model evaluation. UniPC (unipc.py) builds on the
multistep machinery here: σ schedule, σ → (α_t, σ_t, λ_t), model-output conversion, checked history.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from .. import schedules
from .base import NoiseScheduler, SchedulerConfig, StepOutput, dynamic_threshold

FINAL_SIGMAS_TYPES = ("zero", "sigma_min")
ALGORITHM_TYPES = ("dpmsolver++", "dpmsolver")
SOLVER_TYPES = ("midpoint", "heun")


@dataclass(frozen=True)
class MultistepConfig(SchedulerConfig):
    timestep_spacing: str = "linspace"  # diffusers' multistep default: n+1 points from 0 to T-1, t=0 dropped
    solver_order: int = 2               # how many model outputs each step combines (1, 2 or 3)
    thresholding: bool = False          # Imagen dynamic thresholding of x̂0 (pixel models)
    dynamic_thresholding_ratio: float = 0.995
    sample_max_value: float = 1.0
    lower_order_final: bool = True      # drop to lower order at the last steps (stabler with few steps)
    use_karras_sigmas: bool = False     # replace the σs by Karras et al. eq. 5 (ρ = 7) between the same ends
    final_sigmas_type: str = "zero"     # σ after the last step: "zero" (clean) or "sigma_min" (σ at t = 0)


@dataclass(frozen=True)
class DPMSolverConfig(MultistepConfig):
    algorithm_type: str = "dpmsolver++"  # "dpmsolver++" integrates x̂0, "dpmsolver" integrates ε̂
    solver_type: str = "midpoint"        # second-order rule: "midpoint" (Algorithm 2) or "heun" (Taylor)
    euler_at_final: bool = False         # always take a first-order step last
    lambda_min_clipped: float = -float("inf")  # stop where λ_t falls below this (cosine schedules)
    variance_type: str | None = None     # learned variances are unsupported: named here so such configs fail clearly

    def __post_init__(self):
        # diffusers reads a DEIS or UniPC config as its DPM-Solver++ default; so do we, so their JSON loads
        if self.algorithm_type == "deis":
            object.__setattr__(self, "algorithm_type", "dpmsolver++")
        if self.solver_type in ("logrho", "bh1", "bh2"):
            object.__setattr__(self, "solver_type", "midpoint")


class NoiseLevel(NamedTuple):
    """One point of the schedule in the solvers' coordinates: x_t = α_t·x0 + σ_t·ε, λ_t = log(α_t/σ_t)."""

    alpha: torch.Tensor
    sigma: torch.Tensor
    lam: torch.Tensor


def noise_level(sigma: torch.Tensor) -> NoiseLevel:
    """(α_t, σ_t, λ_t) from the σ-space σ = σ_t/α_t; λ = +∞ at σ = 0, the clean end."""
    alpha_t, sigma_t = schedules.alpha_sigma_from_sigma(sigma)
    return NoiseLevel(alpha_t, sigma_t, torch.log(alpha_t) - torch.log(sigma_t))


def data_and_noise(model_output: torch.Tensor, x_t: torch.Tensor, level: NoiseLevel,
                   prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ε̂ from the model's prediction, by x_t = α_t·x0 + σ_t·ε and v = α_t·ε − σ_t·x0."""
    a, s = level.alpha, level.sigma
    if prediction_type == "epsilon":
        return (x_t - s * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x_t - a * model_output) / s
    return a * x_t - s * model_output, a * model_output + s * x_t  # v_prediction


def multistep_timesteps(spacing: str, num_inference_steps: int, num_train_timesteps: int, steps_offset: int,
                        last_timestep: int) -> np.ndarray:
    """diffusers' multistep spacing: linspace/leading take n+1 points up to last_timestep and drop t = 0;
    trailing counts down from last_timestep in strides of T/n."""
    n, T = num_inference_steps, num_train_timesteps
    if spacing == "trailing":  # spaced_timesteps' trailing, but starting at the λ-clipped last timestep
        return np.round(np.arange(last_timestep, 0, -T / n)) - 1
    stride = last_timestep // (n + 1)
    if spacing == "leading" and (stride == 0 or n * stride + steps_offset >= last_timestep):
        raise ValueError(f"leading spacing takes {n}+1 points {stride} apart and drops t=0: with "
                         f"steps_offset={steps_offset} the timesteps would repeat or reach {last_timestep}; "
                         "use fewer steps, or 'linspace' or 'trailing' spacing")
    if spacing == "linspace" and n >= last_timestep:  # repeated timesteps: a zero step in λ, then 0/0 (diffusers: NaN)
        raise ValueError(f"linspace spacing takes {n}+1 points from 0 to {last_timestep - 1} and drops t=0, so at "
                         f"most {last_timestep - 1} steps; got {n}: use 'trailing' spacing for more")
    return schedules.spaced_timesteps(spacing, n + 1, last_timestep, steps_offset)[:-1]


def multistep_sigmas(alpha_bar: torch.Tensor, timesteps: np.ndarray, num_inference_steps: int,
                     use_karras_sigmas: bool, final_sigmas_type: str,
                     round_karras_timesteps: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The timesteps and σs the multistep solvers visit: one σ per timestep, then the final σ."""
    train_sigmas = schedules.training_sigmas(alpha_bar)
    if use_karras_sigmas:
        sigmas = schedules.karras_sigmas(float(train_sigmas[0]), float(train_sigmas[-1]), num_inference_steps)
        timesteps = schedules.sigma_to_t(sigmas, np.log(train_sigmas))
        timesteps = timesteps.round() if round_karras_timesteps else timesteps  # unrounded ones get truncated
    else:
        sigmas = schedules.interpolate_sigmas(timesteps, train_sigmas)
    sigma_last = train_sigmas[0] if final_sigmas_type == "sigma_min" else 0.0
    return timesteps.astype(np.int64), np.append(sigmas, sigma_last).astype(np.float32)


def exponential_integrator(s: NoiseLevel, t: NoiseLevel,
                           data_form: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From s to t: the exact linear factor, the scale c of the integral and the step hh in λ (h = λ_t − λ_s).

    Data form: x_t = (σ_t/σ_s)·x_s − α_t·(...) with hh = −h; noise form: x_t = (α_t/α_s)·x_s − σ_t·(...) with hh = h.
    """
    h = t.lam - s.lam
    if data_form:
        return t.sigma / s.sigma, t.alpha, -h
    return t.alpha / s.alpha, t.sigma, h


def dpm_solver_first_order(x_s: torch.Tensor, D0: torch.Tensor, s: NoiseLevel, t: NoiseLevel,
                           data_form: bool) -> torch.Tensor:
    """DPM-Solver-1 (eq. 3.7) / DPM-Solver++(1), both DDIM: x_t = (σ_t/σ_s)·x_s − α_t(e^{−h} − 1)·x̂0 (data form)."""
    ratio, c, hh = exponential_integrator(s, t, data_form)
    return ratio * x_s - (c * (torch.exp(hh) - 1.0)) * D0


def dpm_solver_second_order(x_s: torch.Tensor, m: list[torch.Tensor], s: list[NoiseLevel], t: NoiseLevel,
                            data_form: bool, solver_type: str) -> torch.Tensor:
    """DPM-Solver++(2M), Algorithm 2: D1 = (m0 − m1)/r0, r0 = h_0/h, is the slope in λ from the previous output;
    midpoint: x_t = ratio·x_s − c(e^{hh} − 1)·(D0 + D1/2); heun weights D1 by its Taylor term c((e^{hh} − 1)/hh − 1)."""
    (m1, m0), (s1, s0) = m, s
    ratio, c, hh = exponential_integrator(s0, t, data_form)
    r0 = (s0.lam - s1.lam) / (t.lam - s0.lam)
    D0, D1 = m0, (1.0 / r0) * (m0 - m1)
    phi_1 = torch.exp(hh) - 1.0
    x_t = ratio * x_s - (c * phi_1) * D0
    if solver_type == "midpoint":
        return x_t - 0.5 * (c * phi_1) * D1
    return x_t - (c * (phi_1 / hh - 1.0)) * D1


def dpm_solver_third_order(x_s: torch.Tensor, m: list[torch.Tensor], s: list[NoiseLevel], t: NoiseLevel,
                           data_form: bool) -> torch.Tensor:
    """DPM-Solver++(3M) (the authors' code): first and second divided differences D1, D2 of the last three outputs
    in λ, each weighted by its Taylor term: x_t = ratio·x_s − c·(φ1·D0 + φ2·D1 + φ3·D2)."""
    (m2, m1, m0), (s2, s1, s0) = m, s
    ratio, c, hh = exponential_integrator(s0, t, data_form)
    h = t.lam - s0.lam
    r0, r1 = (s0.lam - s1.lam) / h, (s1.lam - s2.lam) / h
    D1_0, D1_1 = (1.0 / r0) * (m0 - m1), (1.0 / r1) * (m1 - m2)
    D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
    D2 = (1.0 / (r0 + r1)) * (D1_0 - D1_1)
    phi_1 = torch.exp(hh) - 1.0
    phi_2, phi_3 = phi_1 / hh - 1.0, (phi_1 - hh) / hh**2 - 0.5
    return ratio * x_s - (c * phi_1) * m0 - (c * phi_2) * D1 - (c * phi_3) * D2


class MultistepScheduler(NoiseScheduler):
    """What the multistep solvers share: the σ schedule, model-output conversion and a checked output history."""

    Config = MultistepConfig

    def __init__(self, config: MultistepConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        if self.config.rescale_betas_zero_snr:
            self.alphas_cumprod[-1] = 2**-24  # diffusers: ᾱ_T = 0 would make σ_T and λ_T infinite
        train_sigmas = schedules.training_sigmas(self.alphas_cumprod)[::-1]  # before set_timesteps: every step
        self.sigmas = torch.from_numpy(np.append(train_sigmas, 0.0).astype(np.float32))
        self._reset()

    @property
    def data_form(self) -> bool:
        """True when the solver integrates x̂0 (DPM-Solver++, UniPC's predict_x0), False for ε̂."""
        raise NotImplementedError

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.solver_order not in (1, 2, 3):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {c.solver_order!r}")
        if c.final_sigmas_type not in FINAL_SIGMAS_TYPES:
            raise ValueError(f"final_sigmas_type {c.final_sigmas_type!r} is not one of {FINAL_SIGMAS_TYPES}")
        # the noise form x_t = (α_t/α_s)·x_s − σ_t(e^h − 1)·ε̂ is 0·∞ at σ_t = 0 (diffusers refuses, or gives NaN)
        if not self.data_form and c.final_sigmas_type == "zero":
            raise ValueError(f"{type(self).__name__} integrating ε̂ (algorithm_type='dpmsolver' or predict_x0=False) "
                             "needs final_sigmas_type='sigma_min': σ = 0 has λ = ∞")

    def _reset(self) -> None:
        self.history: list[torch.Tensor] = []  # converted model outputs (x̂0 or ε̂) of the last steps, newest last
        self._next_index: int | None = None    # position in self.timesteps the next step must be at

    def _last_timestep(self) -> int:
        return self.config.num_train_timesteps

    def _round_karras_timesteps(self) -> bool:
        return True

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._check_num_steps(num_inference_steps)
        c = self.config
        timesteps = multistep_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps,
                                        c.steps_offset, self._last_timestep())
        timesteps, sigmas = multistep_sigmas(self.alphas_cumprod, timesteps, num_inference_steps,
                                             c.use_karras_sigmas, c.final_sigmas_type,
                                             self._round_karras_timesteps())
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self.sigmas = torch.from_numpy(sigmas)  # kept on the CPU like diffusers': reading one needs no device sync
        self.num_inference_steps = len(timesteps)
        self._reset()

    def _index(self, timestep: float | torch.Tensor) -> int:
        """Position of this step; after the first step it must be the one right after the previous step."""
        self._require_timesteps()
        if self._next_index is None:  # first step after set_timesteps: anywhere (image-to-image starts midway)
            return self.index_for_timestep(timestep)
        i = self._next_index
        if i < len(self.timesteps) and float(self.timesteps[i]) == float(timestep):
            return i
        expected = int(self.timesteps[i]) if i < len(self.timesteps) else "none (sampling is done)"
        raise ValueError(f"{type(self).__name__} got timestep {float(timestep):g} but expected {expected}; it keeps "
                         "a history of model outputs: call set_timesteps() to restart")

    def _commit(self, i: int, history: list[torch.Tensor]) -> None:
        """Record a finished step (only once it succeeded, so a failed call leaves the state as it was)."""
        self.history = history[-self.config.solver_order:]
        self._next_index = i + 1

    def _level(self, i: int) -> NoiseLevel:
        return noise_level(self.sigmas[i])

    def _model_prediction(self, model_output: torch.Tensor, sample: torch.Tensor,
                          level: NoiseLevel) -> tuple[torch.Tensor, torch.Tensor]:
        """x̂0 and ε̂ at this step; with thresholding, ε̂ is re-derived from the thresholded x̂0."""
        c = self.config
        x0, eps = data_and_noise(model_output, sample, level, c.prediction_type)
        if c.thresholding:
            x0 = dynamic_threshold(x0, c.dynamic_thresholding_ratio, c.sample_max_value)
            eps = (sample - level.alpha * x0) / level.sigma
        return x0, eps

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = α_t·x0 + σ_t·ε at each sample's timestep, with the σ this schedule gives it (Karras σs included)."""
        indices = [self.index_for_timestep(t) for t in timesteps]
        sigma = self.sigmas.to(original_samples.device, original_samples.dtype)[indices]
        alpha_t, sigma_t = schedules.alpha_sigma_from_sigma(schedules.expand_to(sigma, original_samples))
        return alpha_t * original_samples + sigma_t * noise


class DPMSolverMultistepScheduler(MultistepScheduler):
    """DPM-Solver++ (default) or DPM-Solver, multistep, of order 1 to 3; deterministic."""

    Config = DPMSolverConfig

    @property
    def data_form(self) -> bool:
        return self.config.algorithm_type == "dpmsolver++"

    def _validate_config(self) -> None:
        c = self.config
        if c.algorithm_type not in ALGORITHM_TYPES:
            raise ValueError(f"algorithm_type {c.algorithm_type!r} is not supported; choose one of {ALGORITHM_TYPES} "
                             "(the SDE variants are not implemented)")
        if c.solver_type not in SOLVER_TYPES:
            raise ValueError(f"solver_type {c.solver_type!r} is not one of {SOLVER_TYPES}")
        if c.variance_type is not None:
            raise ValueError(f"variance_type {c.variance_type!r} (learned variances) is not supported; use None")
        super()._validate_config()  # after the algorithm checks: it reads self.data_form

    def _last_timestep(self) -> int:
        """T, or fewer where λ_t < lambda_min_clipped would come first."""
        alpha_bar = self.alphas_cumprod
        lambdas = torch.log(alpha_bar.sqrt()) - torch.log((1 - alpha_bar).sqrt())
        clipped = torch.searchsorted(torch.flip(lambdas, [0]), self.config.lambda_min_clipped)
        return self.config.num_train_timesteps - int(clipped)

    def _round_karras_timesteps(self) -> bool:
        return self.config.beta_schedule != "squaredcos_cap_v2"  # diffusers' quirk: cosine keeps them fractional

    def _order(self, i: int, history_length: int) -> int:
        """The order of step i: warm-up from 1, and lower at the end (always first order onto σ = 0)."""
        c, n = self.config, len(self.timesteps)
        short = c.lower_order_final and n < 15  # diffusers lowers the last orders only for short schedules
        if i == n - 1 and (c.euler_at_final or short or c.final_sigmas_type == "zero"):
            return 1
        if i == n - 2 and short:
            return min(2, history_length)
        return min(c.solver_order, history_length)

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """One solver step from timestep to the next; `generator` is accepted for a uniform API (ODE, no noise)."""
        i = self._index(timestep)
        s0, t = self._level(i), self._level(i + 1)
        x0, eps = self._model_prediction(model_output, sample, s0)
        history = self.history + [x0 if self.data_form else eps]
        order = self._order(i, len(history))
        m, s = history[-order:], [self._level(j) for j in range(i - order + 1, i + 1)]  # oldest first, s0 last
        x = sample.to(torch.float32)
        if order == 1:
            prev_sample = dpm_solver_first_order(x, m[-1], s0, t, self.data_form)
        elif order == 2:
            prev_sample = dpm_solver_second_order(x, m, s, t, self.data_form, self.config.solver_type)
        else:
            prev_sample = dpm_solver_third_order(x, m, s, t, self.data_form)
        self._commit(i, history)
        return StepOutput(prev_sample.to(model_output.dtype), x0)
