"""PNDM: Pseudo Numerical Methods for Diffusion Models on Manifolds (Liu, Ren, Lin & Zhao 2022, arXiv:2202.09778)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .. import schedules
from .base import NoiseScheduler, SchedulerConfig, StepOutput, predict_x0_and_eps

PNDM_PREDICTION_TYPES = ("epsilon", "v_prediction")
PRK_STEPS = 4  # model evaluations per Runge-Kutta step (and the order of the linear multistep that follows)


@dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    skip_prk_steps: bool = False    # start with a Heun-like warm-up instead of 3 pseudo Runge-Kutta steps (SD does)
    set_alpha_to_one: bool = False  # ᾱ after the last step: 1 (clean) or ᾱ_0


def pndm_transfer(x_t: torch.Tensor, eps: torch.Tensor, alpha_bar_t: torch.Tensor,
                  alpha_bar_prev: torch.Tensor) -> torch.Tensor:
    """PNDM eq. 9, the transfer φ: x_{t-δ} = sqrt(ᾱ_{t-δ}/ᾱ_t)·x_t - (ᾱ_{t-δ}-ᾱ_t)·ε / (ᾱ_t·sqrt(1-ᾱ_{t-δ}) + sqrt(ᾱ_t(1-ᾱ_t)ᾱ_{t-δ}))."""
    denom = alpha_bar_t * (1 - alpha_bar_prev) ** 0.5 + (alpha_bar_t * (1 - alpha_bar_t) * alpha_bar_prev) ** 0.5
    return (alpha_bar_prev / alpha_bar_t) ** 0.5 * x_t - (alpha_bar_prev - alpha_bar_t) * eps / denom


def plms_eps(history: list[torch.Tensor]) -> torch.Tensor:
    """PNDM's PLMS (4th-order Adams-Bashforth): ε' = (55ε_t - 59ε_{t-δ} + 37ε_{t-2δ} - 9ε_{t-3δ})/24; lower order while short."""
    e = history[::-1]  # e[0] is the newest
    if len(e) == 2:
        return (3 * e[0] - e[1]) / 2
    if len(e) == 3:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (1 / 24) * (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3])


class PNDMScheduler(NoiseScheduler):
    """Pseudo Runge-Kutta warm-up (PRK) then the pseudo linear multistep method (PLMS), in ᾱ-space."""

    Config = PNDMConfig

    def __init__(self, config: PNDMConfig | None = None, **overrides):
        super().__init__(config, **overrides)
        self.final_alpha_cumprod = torch.tensor(1.0) if self.config.set_alpha_to_one else self.alphas_cumprod[0]
        self._reset()

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.prediction_type not in PNDM_PREDICTION_TYPES:
            raise ValueError(f"PNDM supports prediction_type {PNDM_PREDICTION_TYPES}, got {c.prediction_type!r}")
        if c.rescale_betas_zero_snr:  # ᾱ_T = 0 would divide by zero in the transfer φ
            raise ValueError("PNDM does not support rescale_betas_zero_snr=True; use DDIM, Euler or DPM-Solver")

    def _reset(self) -> None:
        self.counter = 0           # steps taken since set_timesteps; picks the PRK stage / PLMS warm-up
        self.ets: list[torch.Tensor] = []  # ε history for the multistep formula (model outputs, as diffusers)
        self.cur_sample = None     # x_t at the start of a multi-evaluation step
        self.cur_eps = 0.0         # running Runge-Kutta sum (ε1 + 2ε2 + 2ε3 + ε4)/6
        self._next_indices: set[int] | None = None  # positions in self.timesteps the next step may be at

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        self._check_num_steps(num_inference_steps)
        c, n = self.config, num_inference_steps
        ascending = schedules.spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)[::-1]
        if c.skip_prk_steps:
            # PLMS warm-up: the second timestep is visited twice (a step there, then Heun's correction).
            self.prk_timesteps = np.array([], dtype=np.int64)
            plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1]
        else:
            # 3 RK steps from the top timesteps, each at t, t-δ/2, t-δ/2, t-δ, with δ/2 = (T // n) // 2.
            if n < PRK_STEPS:
                raise ValueError(f"PNDM's PRK warm-up needs num_inference_steps >= {PRK_STEPS}, got {n}; "
                                 "use more steps or skip_prk_steps=True (as Stable Diffusion does)")
            m, half = PRK_STEPS, c.num_train_timesteps // n // 2
            prk = ascending[-m:].repeat(2) + np.tile([0, half], m)
            self.prk_timesteps = prk[:-1].repeat(2)[1:-1][::-1]
            plms = ascending[:n - m + 1][::-1]
        timesteps = np.concatenate([self.prk_timesteps, plms]).astype(np.int64)
        self.timesteps = torch.from_numpy(timesteps).to(device)
        self._timestep_list = timesteps.tolist()  # for _advance, without a device round trip per step
        self.num_inference_steps = n
        self._reset()

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """One PRK stage or one PLMS step; `generator` is accepted for a uniform API (PNDM is deterministic)."""
        self._require_timesteps()
        t = int(timestep)
        self._advance(t)
        if self.counter < len(self.prk_timesteps):
            x, eps, t, prev_t = self._prk(model_output, t, sample)
        else:
            x, eps, t, prev_t = self._plms(model_output, t, sample)
        self.counter += 1
        # Python floats: the coefficient arithmetic then costs nothing next to the two tensor operations
        alpha_bar_t = float(self.alphas_cumprod[t])
        alpha_bar_prev = float(self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod)
        # diffusers combines raw model outputs, then converts v → ε with the x_t being moved: so do we.
        pred_x0, eps = predict_x0_and_eps(eps, x, alpha_bar_t, self.config.prediction_type)
        return StepOutput(pndm_transfer(x, eps, alpha_bar_t, alpha_bar_prev), pred_x0)

    def _advance(self, t: int) -> None:
        """Check t is the timestep that follows the previous step (timesteps repeat, so track all candidates)."""
        positions = {i for i, s in enumerate(self._timestep_list) if s == t}
        if self._next_indices is None:  # first step after set_timesteps: any position (image-to-image)
            if not positions:
                raise ValueError(f"timestep {t} is not in this scheduler's timesteps; "
                                 "pass one of scheduler.timesteps (after set_timesteps)")
            if not self.config.skip_prk_steps and 0 not in positions:
                raise ValueError(f"the PRK warm-up must start at timestep {int(self.timesteps[0])}, got {t}; "
                                 "use skip_prk_steps=True to start midway (image-to-image)")
        else:
            positions &= self._next_indices
            if not positions:
                expected = sorted({self._timestep_list[i] for i in self._next_indices if i < len(self._timestep_list)})
                raise ValueError(f"PNDM got timestep {t} but expected {expected or 'none (sampling is done)'}; "
                                 "it keeps a history of model outputs: call set_timesteps() to restart")
        self._next_indices = {i + 1 for i in positions}

    def _prk(self, model_output: torch.Tensor, t: int, sample: torch.Tensor):
        """PNDM's PRK: ε' = (ε1 + 2ε2 + 2ε3 + ε4)/6, each εk at the point φ reaches from x_t; stage k of 4 per step."""
        stage = self.counter % PRK_STEPS
        half = self.config.num_train_timesteps // self.num_inference_steps // 2
        # φ goes to t - δ/2, the next stage is fed t_next + δ/2: one apart when T // n is odd (diffusers' quirk).
        prev_t = t - (half if stage % 2 == 0 else 0)
        eps = model_output
        if stage == 0:
            self.cur_eps = 1 / 6 * model_output
            self.ets.append(model_output)
            self.cur_sample = sample
        elif stage in (1, 2):
            self.cur_eps = self.cur_eps + 1 / 3 * model_output
        else:
            eps = self.cur_eps + 1 / 6 * model_output
            self.cur_eps = 0.0
        return self.cur_sample, eps, int(self.prk_timesteps[self.counter // 4 * 4]), prev_t

    def _plms(self, model_output: torch.Tensor, t: int, sample: torch.Tensor):
        """PLMS step; with skip_prk_steps its warm-up is an Euler step then Heun's correction at the same timestep."""
        delta = self.config.num_train_timesteps // self.num_inference_steps  # diffusers' step, whatever the spacing
        if self.counter == 1 and self.config.skip_prk_steps:  # Heun correction of step 0: redo t+δ → t
            eps, x = (model_output + self.ets[-1]) / 2, self.cur_sample
            self.cur_sample = None
            return x, eps, t + delta, t
        self.ets = self.ets[-3:] + [model_output]
        if len(self.ets) == 1:  # first step: Euler; keep x_t for the correction
            self.cur_sample = sample
            return sample, model_output, t, t - delta
        return sample, plms_eps(self.ets), t, t - delta
