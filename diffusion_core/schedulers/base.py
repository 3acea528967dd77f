"""What every noise scheduler shares: its config, the ᾱ schedule, timestep lookup and the step output."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from .. import schedules

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


@dataclass(frozen=True)
class SchedulerConfig:
    """Keys and defaults shared by every algorithm; names are diffusers' own, so its JSON loads unchanged."""

    num_train_timesteps: int = 1000   # T, the number of training noise levels
    beta_start: float = 0.0001        # β_1
    beta_end: float = 0.02            # β_T
    beta_schedule: str = "linear"     # "linear", "scaled_linear" (SD) or "squaredcos_cap_v2"
    trained_betas: Any = None         # explicit β_1..β_T; overrides the three above
    prediction_type: str = "epsilon"  # what the model predicts: "epsilon", "v_prediction" or "sample"
    timestep_spacing: str = "leading"  # how inference steps are picked: "leading", "trailing", "linspace"
    steps_offset: int = 0             # added to "leading" timesteps (SD uses 1)
    rescale_betas_zero_snr: bool = False  # force ᾱ_T = 0 (Lin et al. 2023)


@dataclass
class StepOutput:
    prev_sample: torch.Tensor           # x_{t-1}: the sample at the next (less noisy) timestep
    pred_original_sample: torch.Tensor  # x̂0: the model's current guess of the clean sample


class NoiseScheduler:
    """Base class: holds the config and the training schedule (β, ᾱ); subclasses add the sampling rule."""

    Config: ClassVar[type[SchedulerConfig]] = SchedulerConfig
    order: ClassVar[int] = 1  # model evaluations per step (for progress bars)

    def __init__(self, config: SchedulerConfig | None = None, **overrides: Any):
        config = config or self.Config()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self._validate_config()
        c = self.config
        betas = schedules.make_betas(c.num_train_timesteps, c.beta_start, c.beta_end, c.beta_schedule,
                                     c.trained_betas)
        if getattr(c, "rescale_betas_zero_snr", False):
            betas = schedules.rescale_zero_terminal_snr(betas)
        self.betas = betas
        self.alphas_cumprod = schedules.alpha_bar_from_betas(betas)  # ᾱ_t, t = 0..T-1
        self.timesteps = torch.arange(c.num_train_timesteps - 1, -1, -1)
        self.num_inference_steps: int | None = None
        self.init_noise_sigma = 1.0

    @classmethod
    def from_config(cls, config: dict[str, Any] | SchedulerConfig) -> "NoiseScheduler":
        """Build from a diffusers-style dict (e.g. a scheduler_config.json); keys this algorithm lacks are ignored."""
        if isinstance(config, SchedulerConfig):
            config = dataclasses.asdict(config)
        known = {f.name for f in dataclasses.fields(cls.Config)}
        return cls(cls.Config(**{k: v for k, v in config.items() if k in known}))

    def _validate_config(self) -> None:
        c = self.config
        if c.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {c.prediction_type!r} is not one of {PREDICTION_TYPES}")
        if c.timestep_spacing not in schedules.TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing {c.timestep_spacing!r} is not one of {schedules.TIMESTEP_SPACINGS}")

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Pick the integer timesteps to visit, by `timestep_spacing` (DDPM and DDIM; the others override this)."""
        self._check_num_steps(num_inference_steps)
        c = self.config
        timesteps = schedules.spaced_timesteps(c.timestep_spacing, num_inference_steps, c.num_train_timesteps,
                                               c.steps_offset)
        self.timesteps = torch.from_numpy(timesteps.astype(np.int64)).to(device)
        self.num_inference_steps = num_inference_steps

    def _check_num_steps(self, num_inference_steps: int) -> None:
        T = self.config.num_train_timesteps
        if not isinstance(num_inference_steps, int) or not 1 <= num_inference_steps <= T:
            raise ValueError(f"num_inference_steps must be an integer from 1 to num_train_timesteps={T}, "
                             f"got {num_inference_steps!r}")

    def _require_timesteps(self) -> None:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps(num_inference_steps) before step()")

    def index_for_timestep(self, t: float | torch.Tensor) -> int:
        """Position of t in self.timesteps (its first occurrence)."""
        matches = (self.timesteps == torch.as_tensor(t).to(self.timesteps)).nonzero()
        if len(matches) == 0:
            raise ValueError(f"timestep {float(t)} is not in this scheduler's timesteps; "
                             "pass one of scheduler.timesteps (after set_timesteps)")
        return int(matches[0])

    def scale_model_input(self, sample: torch.Tensor, timestep: float | torch.Tensor) -> torch.Tensor:
        """The model sees x_t unscaled in ᾱ-space; σ-space schedulers override this."""
        return sample

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε for each sample's timestep."""
        return schedules.add_noise(original_samples, noise, self._alpha_bar_at(timesteps, original_samples.device))

    def get_velocity(self, original_samples: torch.Tensor, noise: torch.Tensor,
                     timesteps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x0 for each sample's (integer training) timestep: the target a
        v-prediction model is trained on."""
        return schedules.velocity(original_samples, noise, self._alpha_bar_at(timesteps, original_samples.device))

    def _alpha_bar_at(self, timesteps: torch.Tensor, device: torch.device) -> torch.Tensor:
        """ᾱ_t for each (integer training) timestep, on `device`."""
        return self.alphas_cumprod.to(device)[timesteps.to(device)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config})"


def predict_x0_and_eps(model_output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                       prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """x̂0 and ε̂ from what the model predicts, using x_t = sqrt(ᾱ)·x0 + sqrt(1-ᾱ)·ε and v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·x0."""
    a, b = alpha_bar_t**0.5, (1 - alpha_bar_t) ** 0.5
    if prediction_type == "epsilon":
        return (x_t - b * model_output) / a, model_output
    if prediction_type == "sample":
        return model_output, (x_t - a * model_output) / b
    if prediction_type == "v_prediction":
        return a * x_t - b * model_output, a * model_output + b * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not one of {PREDICTION_TYPES}")


def dynamic_threshold(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022, §2.3): clamp x̂0 to its ratio-quantile s, divide by s."""
    dtype, shape = x0.dtype, x0.shape
    flat = x0.float().reshape(shape[0], -1)  # quantile needs fp32
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value).unsqueeze(1)
    return (torch.clamp(flat, -s, s) / s).reshape(shape).to(dtype)
