"""UniPC: a unified predictor-corrector framework (Zhao, Bai, Rao, Zhou & Lu 2023, arXiv:2302.04867).

Like DPM-Solver (dpm_solver.py, whose multistep machinery this reuses) it steps in λ = log(α_t/σ_t) and
solves the linear part exactly. The predictor UniP-p extrapolates the model's prediction from the
last p outputs; the corrector UniC-p then re-solves that step once the model output at its end is
known, which raises the order by one at no extra model evaluation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .base import StepOutput
from .dpm_solver import MultistepConfig, MultistepScheduler, NoiseLevel, exponential_integrator

VARIANTS = ("bh1", "bh2")


@dataclass(frozen=True)
class UniPCConfig(MultistepConfig):
    predict_x0: bool = True    # integrate the data prediction x̂0 (True) or the noise prediction ε̂
    solver_type: str = "bh2"   # B(h): "bh1" is h, "bh2" is e^h - 1 (the paper's B1 and B2)
    disable_corrector: list[int] = field(default_factory=list)  # steps whose result is not corrected

    def __post_init__(self):
        # diffusers reads a DPM-Solver or DEIS config as its default variant; so do we, so their JSON loads
        if self.solver_type in ("midpoint", "heun", "logrho"):
            object.__setattr__(self, "solver_type", "bh2")


def order_conditions(hh: torch.Tensor, h_phi_1: torch.Tensor, rks: torch.Tensor,
                     B_h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """UniPC's linear system R·ρ = b: row k of R is r^(k-1), b_k = k!·h·φ_{k+1}(h)/B(h), with h the step hh."""
    R, b = [], []
    h_phi_k, factorial = h_phi_1 / hh - 1, 1  # h·φ_2(h), from h·φ_1(h) = e^h - 1
    for k in range(1, len(rks) + 1):
        R.append(torch.pow(rks, k - 1))
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial  # h·φ_{k+2}(h) = φ_{k+1}(h) - 1/(k+1)!
    return torch.stack(R), torch.stack(b)


def unipc_terms(x_s: torch.Tensor, m: list[torch.Tensor], s: list[NoiseLevel], t: NoiseLevel, predict_x0: bool,
                variant: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """What UniP and UniC share: the first-order step x_t^(1), c·B(h), the differences D_k = (m_k - m0)/r_k
    with r_k = (λ_{s_k} - λ_{s_0})/h, stacked (B, K, ...), and the order conditions R, b."""
    m0, s0 = m[-1], s[-1]
    ratio, c, hh = exponential_integrator(s0, t, predict_x0)
    h = t.lam - s0.lam
    rks = [(s_k.lam - s0.lam) / h for s_k in s[-2::-1]]  # newest first
    D = [(m_k - m0) / r_k for m_k, r_k in zip(m[-2::-1], rks)]
    h_phi_1 = torch.expm1(hh)
    B_h = hh if variant == "bh1" else h_phi_1  # B1(h) = h, B2(h) = e^h - 1
    R, b = order_conditions(hh, h_phi_1, torch.stack(rks + [torch.ones(())]), B_h)
    x_first = ratio * x_s - c * h_phi_1 * m0  # DDIM / DPM-Solver-1
    return x_first, c * B_h, torch.stack(D, dim=1) if D else None, R, b


def uni_p(x_s: torch.Tensor, m: list[torch.Tensor], s: list[NoiseLevel], t: NoiseLevel, predict_x0: bool,
          variant: str) -> torch.Tensor:
    """UniP-p, the predictor (§3.2): x̃_t = x_t^(1) - c·B(h)·Σ_k ρ_k·D_k,
    ρ from the first p-1 order conditions (ρ = ½ at p = 2)."""
    x_first, scale, D, R, b = unipc_terms(x_s, m, s, t, predict_x0, variant)
    if D is None:  # p = 1 (diffusers still adds B(h)·0, which is NaN for bh1 on the last step, where h = ∞)
        return x_first
    rhos = torch.full((1,), 0.5) if len(m) == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
    return x_first - scale * torch.einsum("k,bkc...->bc...", rhos.to(D), D)


def uni_c(x_s: torch.Tensor, m_t: torch.Tensor, m: list[torch.Tensor], s: list[NoiseLevel], t: NoiseLevel,
          predict_x0: bool, variant: str) -> torch.Tensor:
    """UniC-p, the corrector (§3.1): redo s0 → t with the new output m_t as one more difference,
    x_t^c = x_t^(1) - c·B(h)·(Σ_k ρ_k·D_k + ρ_p·(m_t - m0)), ρ from all p conditions (½ at p = 1)."""
    x_first, scale, D, R, b = unipc_terms(x_s, m, s, t, predict_x0, variant)
    rhos = torch.full((1,), 0.5) if D is None else torch.linalg.solve(R, b).to(D)
    correction = rhos[-1] * (m_t - m[-1])
    if D is not None:
        correction = torch.einsum("k,bkc...->bc...", rhos[:-1], D) + correction
    return x_first - scale * correction


class UniPCScheduler(MultistepScheduler):
    """UniPC multistep: predictor UniP of order ≤ solver_order, corrected by UniC after each model evaluation."""

    Config = UniPCConfig

    @property
    def data_form(self) -> bool:
        return self.config.predict_x0

    def _validate_config(self) -> None:
        super()._validate_config()
        c = self.config
        if c.solver_type not in VARIANTS:
            raise ValueError(f"solver_type {c.solver_type!r} is not one of {VARIANTS}")
        if c.thresholding and not c.predict_x0:  # diffusers silently skips it there
            raise ValueError("thresholding needs predict_x0=True (it clips x̂0)")
        # onto σ = 0 the step h is infinite: bh1's B(h) = h is too, and order 3's system R·ρ = b is singular
        max_final_order = 2 if c.solver_type == "bh2" else 1
        if c.final_sigmas_type == "zero" and not c.lower_order_final and c.solver_order > max_final_order:
            raise ValueError(f"UniPC with solver_type={c.solver_type!r} cannot take an order-{c.solver_order} step "
                             "onto σ = 0: use lower_order_final=True or final_sigmas_type='sigma_min'")

    def _reset(self) -> None:
        super()._reset()
        self._last_sample: torch.Tensor | None = None  # the predictor's input at the previous step
        self._last_order = 0                           # the predictor's order at the previous step

    def step(self, model_output: torch.Tensor, timestep: int | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None) -> StepOutput:
        """Correct the sample the last step predicted, then predict the next (`generator`: uniform API, unused)."""
        c = self.config
        i = self._index(timestep)
        x0, eps = self._model_prediction(model_output, sample, self._level(i))
        m_t = x0 if self.data_form else eps
        if self._last_sample is not None and i - 1 not in c.disable_corrector:
            p = self._last_order
            s = [self._level(j) for j in range(i - p, i)]  # oldest first, s0 = the previous step last
            sample = uni_c(self._last_sample, m_t, self.history[-p:], s, self._level(i), self.data_form,
                           c.solver_type)
        history = self.history + [m_t]
        # order: warm up from 1; with lower_order_final, at most the number of steps left
        p = min(c.solver_order, len(self.timesteps) - i) if c.lower_order_final else c.solver_order
        p = min(p, len(history))
        s = [self._level(j) for j in range(i - p + 1, i + 1)]
        prev_sample = uni_p(sample, history[-p:], s, self._level(i + 1), self.data_form, c.solver_type)
        self._commit(i, history)
        self._last_sample, self._last_order = sample, p
        return StepOutput(prev_sample, x0)
