"""Every scheduler against its diffusers counterpart, step by step, over the configurations users meet."""
from __future__ import annotations

import inspect

import diffusers
import pytest
import torch

from diffusion_core.schedulers import SamplerType, make_scheduler, scheduler_class
from parity import assert_rel_close

MAX_REL = 1e-5

REFERENCE = {
    "ddpm": diffusers.DDPMScheduler,
    "ddim": diffusers.DDIMScheduler,
    "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler,
    "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler,
    "unipc": diffusers.UniPCMultistepScheduler,
}
MULTISTEP = ("pndm", "dpmpp_2m", "unipc")
LAMBDA_SPACING = {"dpmpp_2m": {"timestep_spacing": "trailing"}, "unipc": {"timestep_spacing": "trailing"}}
# Integrating ε̂ onto σ = 0 is a step of infinite λ: diffusers refuses it (DPM-Solver) or makes NaN (UniPC).
SIGMA_MIN = {"final_sigmas_type": "sigma_min"}

# The scheduler_config.json that SD 1.x model folders ship (PNDM, no timestep_spacing key).
SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000,
          steps_offset=1, set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
TRAINED = dict(trained_betas=torch.linspace(0.0002, 0.03, 1000).tolist())


def case(name, steps, step_kwargs=None, **config):
    """One parametrised trajectory: a readable id, the sampler, its config, step count and step() extras."""
    extras = "-".join(f"{k}={v}" for k, v in {**config, **(step_kwargs or {})}.items()
                      if k not in ("trained_betas",)) or "defaults"
    if "trained_betas" in config:
        extras += "-trained_betas"
    return pytest.param(name, steps, step_kwargs or {}, config, id=f"{name}-{steps}-{extras}")


def cases():
    out = []
    for name in REFERENCE:
        for steps in (1, 3, 7, 37, 50):
            # PNDM's default PRK warm-up needs 4 steps (diffusers fails below, we raise): warm up with PLMS there
            out.append(case(name, steps, **({"skip_prk_steps": True} if name == "pndm" and steps < 4 else {})))
        # with offset 1, "leading" would reach t=1000; DPM-Solver and UniPC's default "linspace" repeats
        # timesteps at 1000 steps (diffusers: NaN; we raise, see test_where_diffusers_makes_nan_we_raise)
        out.append(case(name, 1000, **dict(SD, steps_offset=0), **LAMBDA_SPACING.get(name, {})))
        out.append(case(name, 50, **SD))
        out.append(case(name, 20, **TRAINED))
        for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
            out.append(case(name, 10, beta_schedule=schedule))
        for spacing in ("leading", "trailing", "linspace"):
            for offset in (0, 1):
                for steps in (7, 50):
                    out.append(case(name, steps, timestep_spacing=spacing, steps_offset=offset, **_sd_betas()))
        prediction_types = {"pndm": ("v_prediction",), "euler_a": ("v_prediction",)}.get(
            name, ("v_prediction", "sample"))
        for prediction in prediction_types:
            out.append(case(name, 25, prediction_type=prediction, **_sd_betas()))
    out += [
        case("ddim", 50, clip_sample=True, set_alpha_to_one=True),
        case("ddim", 50, clip_sample=True, set_alpha_to_one=False, clip_sample_range=0.5),
        case("ddim", 20, {"eta": 0.7}, **SD),
        case("ddim", 20, {"eta": 1.0}, timestep_spacing="trailing", rescale_betas_zero_snr=True,
             prediction_type="v_prediction"),
        case("ddim", 20, thresholding=True, sample_max_value=1.5),
        case("ddpm", 20, clip_sample=True),
        case("ddpm", 20, thresholding=True, clip_sample=False),
        case("ddpm", 20, rescale_betas_zero_snr=True, timestep_spacing="trailing"),
        case("pndm", 50, skip_prk_steps=False),
        case("pndm", 7, skip_prk_steps=False, set_alpha_to_one=True, **_sd_betas()),
        case("pndm", 20, skip_prk_steps=False, prediction_type="v_prediction", **_sd_betas()),
        case("euler", 30, use_karras_sigmas=True, **_sd_betas()),
        case("euler", 30, interpolation_type="log_linear", **_sd_betas()),
        case("euler", 30, rescale_betas_zero_snr=True, timestep_spacing="trailing", **_sd_betas()),
        case("euler", 30, final_sigmas_type="sigma_min", **_sd_betas()),
        case("euler", 25, use_karras_sigmas=True, prediction_type="v_prediction", **_sd_betas()),
        case("euler_a", 30, rescale_betas_zero_snr=True, timestep_spacing="trailing", **_sd_betas()),
        case("dpmpp_2m", 25, use_karras_sigmas=True, **_sd_betas()),
        case("dpmpp_2m", 25, algorithm_type="dpmsolver", **SIGMA_MIN, **_sd_betas()),
        case("dpmpp_2m", 25, algorithm_type="dpmsolver", use_karras_sigmas=True, **SIGMA_MIN, **_sd_betas()),
        case("dpmpp_2m", 25, solver_type="heun", **_sd_betas()),
        case("dpmpp_2m", 25, lower_order_final=False, **_sd_betas()),
        case("dpmpp_2m", 25, final_sigmas_type="sigma_min", **_sd_betas()),
        case("dpmpp_2m", 20, thresholding=True, prediction_type="sample"),
        case("dpmpp_2m", 25, rescale_betas_zero_snr=True, timestep_spacing="trailing", **_sd_betas()),
        case("unipc", 25, use_karras_sigmas=True, **_sd_betas()),
        case("unipc", 25, solver_type="bh1", **SIGMA_MIN, **_sd_betas()),
        case("unipc", 25, predict_x0=False, **SIGMA_MIN, **_sd_betas()),
        case("unipc", 25, lower_order_final=False, **_sd_betas()),
        case("unipc", 25, disable_corrector=[0, 1], **_sd_betas()),
        case("unipc", 25, final_sigmas_type="sigma_min", **_sd_betas()),
    ]
    for order in (1, 2, 3):
        out.append(case("dpmpp_2m", 15, solver_order=order, **_sd_betas()))
        out.append(case("dpmpp_2m", 15, solver_order=order, algorithm_type="dpmsolver", **SIGMA_MIN, **_sd_betas()))
        out.append(case("unipc", 15, solver_order=order, **_sd_betas()))
        out.append(case("unipc", 15, solver_order=order, solver_type="bh1", **SIGMA_MIN, **_sd_betas()))
    # fixed_large_log is NaN in diffusers (it takes sqrt of log β_t): see test_ddpm_fixed_large_log
    for variance in ("fixed_small", "fixed_small_log", "fixed_large"):
        out.append(case("ddpm", 20, variance_type=variance))
        out.append(case("ddpm", 1000, variance_type=variance, **dict(SD, steps_offset=0)))
    return out


def _sd_betas():
    return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def stand_in_model(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic, smooth function of (x, t) in place of a UNet."""
    t = float(t)
    return 0.6 * torch.sin(x + t / 250.0) + 0.2 * x * torch.cos(torch.tensor(t / 400.0))


def takes_generator(scheduler) -> bool:
    """diffusers' PNDM and UniPC step() take no generator (ours all do, for a uniform API)."""
    return "generator" in inspect.signature(scheduler.step).parameters


def run_pair(name, steps, step_kwargs, config, shape=(2, 4, 8, 8), ref_config=None, steps_to_compare=None):
    """Run ours and diffusers' side by side, asserting equality at every step (or the first steps_to_compare);
    returns both final samples. ref_config, if given, configures diffusers' scheduler instead of config."""
    ours = make_scheduler(name, **config)
    ref = REFERENCE[name].from_config(config if ref_config is None else ref_config)
    ours.set_timesteps(steps)
    ref.set_timesteps(steps)
    torch.testing.assert_close(ours.timesteps.double(), ref.timesteps.double(), rtol=0, atol=0,
                               msg="timesteps differ")
    assert float(ours.init_noise_sigma) == pytest.approx(float(ref.init_noise_sigma), rel=MAX_REL)

    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * float(ref.init_noise_sigma)
    x_ref = x.clone()
    gen, gen_ref = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    for i, t in enumerate(ref.timesteps[:steps_to_compare]):
        x_in_ref = ref.scale_model_input(x_ref, t)
        x_in = ours.scale_model_input(x, ours.timesteps[i])
        assert_rel_close(x_in, x_in_ref, MAX_REL, f"scale_model_input at step {i}, t={t}")
        ref_kwargs = dict(step_kwargs, generator=gen_ref) if takes_generator(ref) else step_kwargs
        out = ref.step(stand_in_model(x_in_ref, t), t, x_ref, **ref_kwargs)
        mine = ours.step(stand_in_model(x_in, t), ours.timesteps[i], x, generator=gen, **step_kwargs)
        assert_rel_close(mine.prev_sample, out.prev_sample, MAX_REL, f"prev_sample at step {i}, t={t}")
        ref_x0 = getattr(out, "pred_original_sample", None)
        if ref_x0 is not None:
            assert_rel_close(mine.pred_original_sample, ref_x0, MAX_REL, f"x0 at step {i}, t={t}")
        x, x_ref = mine.prev_sample, out.prev_sample
    return x, x_ref


@pytest.mark.parametrize("name, steps, step_kwargs, config", cases())
def test_trajectory_matches_diffusers(name, steps, step_kwargs, config):
    run_pair(name, steps, step_kwargs, config)


@pytest.mark.parametrize("steps, config", [(20, {}), (1000, dict(SD, steps_offset=0))])
def test_ddpm_fixed_large_log(steps, config):
    """σ_t = exp(½·log β_t) is fixed_large's sqrt(β_t); diffusers takes sqrt(log β_t) instead, which is NaN."""
    log_config = dict(config, variance_type="fixed_large_log")
    ref = REFERENCE["ddpm"].from_config(log_config)
    ref.set_timesteps(steps)
    x = torch.zeros(1, 4, 8, 8)
    t = ref.timesteps[0]
    assert ref.step(stand_in_model(x, t), t, x, generator=torch.Generator().manual_seed(0)).prev_sample.isnan().all()
    run_pair("ddpm", steps, {}, log_config, ref_config=dict(config, variance_type="fixed_large"))


@pytest.mark.parametrize("config", [dict(solver_type="bh1", **_sd_betas()),
                                    dict(solver_type="bh1", solver_order=3, **_sd_betas())])
def test_unipc_bh1_onto_sigma_zero(config):
    """bh1's B(h) = h is infinite on the last step onto σ = 0: diffusers adds ∞·0 = NaN; we take the
    first-order step there (x̂0 itself), and equal diffusers on every step before it."""
    run_pair("unipc", 25, {}, config, steps_to_compare=24)
    for scheduler in (make_scheduler("unipc", **config), REFERENCE["unipc"].from_config(config)):
        scheduler.set_timesteps(25)
        x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps:  # an ε-model: scale_model_input is the identity
            out = scheduler.step(stand_in_model(x, t), t, x)
            x = out.prev_sample
        if isinstance(scheduler, diffusers.UniPCMultistepScheduler):
            assert x.isnan().any()
        else:
            assert torch.isfinite(x).all()
            assert_rel_close(x, out.pred_original_sample, MAX_REL)


@pytest.mark.parametrize("name, steps, config", [
    ("dpmpp_2m", 1000, dict(SD, steps_offset=0)),                # linspace: 1000 of 999 repeats a timestep
    ("unipc", 1000, dict(SD, steps_offset=0)),
    ("unipc", 999, dict(timestep_spacing="leading", steps_offset=1, **_sd_betas())),  # leading reaches t=1000
    ("unipc", 25, dict(predict_x0=False, **_sd_betas())),         # ε̂ integrated onto σ = 0: λ = ∞
])
def test_where_diffusers_makes_nan_we_raise(name, steps, config):
    ref = REFERENCE[name].from_config(config)
    ref.set_timesteps(steps)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    for t in ref.timesteps:
        x = ref.step(stand_in_model(x, t), t, x).prev_sample
    assert x.isnan().any()
    with pytest.raises(ValueError, match="spacing|sigma_min"):
        make_scheduler(name, **config).set_timesteps(steps)


def test_dpm_solver_integrating_eps_needs_sigma_min_like_diffusers():
    config = dict(algorithm_type="dpmsolver", **_sd_betas())
    with pytest.raises(ValueError, match="sigma_min"):
        REFERENCE["dpmpp_2m"].from_config(config)
    with pytest.raises(ValueError, match="sigma_min"):
        make_scheduler("dpmpp_2m", **config)


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("config", [{}, SD, dict(timestep_spacing="trailing", **_sd_betas())],
                         ids=["defaults", "sd", "trailing"])
def test_add_noise_and_velocity_match_diffusers(name, config):
    ours, ref = make_scheduler(name, **config), REFERENCE[name].from_config(config)
    ours.set_timesteps(20)
    ref.set_timesteps(20)
    x0 = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    t = ref.timesteps[[0, 5, 19]]
    assert_rel_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t), MAX_REL)
    if name in ("ddpm", "ddim"):  # diffusers' Euler get_velocity indexes ᾱ by step index, not by timestep
        assert_rel_close(ours.get_velocity(x0, noise, t), ref.get_velocity(x0, noise, t), MAX_REL)


@pytest.mark.parametrize("name", list(REFERENCE))
def test_set_timesteps_fully_resets_state(name):
    config = dict(SD, timestep_spacing="trailing")
    fresh, _ = run_pair(name, 10, {}, config)
    sched = make_scheduler(name, **config)
    sched.set_timesteps(4)
    x = torch.randn(2, 4, 8, 8)
    for t in sched.timesteps[:2]:
        x = sched.step(stand_in_model(sched.scale_model_input(x, t), t), t, x).prev_sample
    sched.set_timesteps(10)  # a second run on the same object must equal a fresh one
    x = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)) * float(sched.init_noise_sigma)
    for t in sched.timesteps:
        x = sched.step(stand_in_model(sched.scale_model_input(x, t), t), t, x,
                       generator=torch.Generator().manual_seed(7)).prev_sample
    # stochastic samplers draw from one generator per run in run_pair; compare deterministic ones only
    if name not in ("ddpm", "euler_a"):
        assert_rel_close(x, fresh, MAX_REL)


@pytest.mark.parametrize("name", list(REFERENCE))
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps", [1, 3, 999, 1000])
def test_no_timestep_reaches_num_train_timesteps(name, spacing, steps):
    sched = make_scheduler(name, timestep_spacing=spacing, steps_offset=1, skip_prk_steps=True, **_sd_betas())
    # leading + offset 1 reaches t=1000 at 1000 steps (999 for the λ-solvers, which place n+1 points),
    # and linspace repeats a timestep at 1000 for them: each a clear error instead of diffusers' NaN
    too_many = {"leading": 1000, "linspace": 1001, "trailing": 1001}[spacing]
    if name in LAMBDA_SPACING:
        too_many = {"leading": 999, "linspace": 1000, "trailing": 1001}[spacing]
    if steps >= too_many:
        with pytest.raises(ValueError, match="spacing"):
            sched.set_timesteps(steps)
        return
    sched.set_timesteps(steps)
    assert 0 <= float(sched.timesteps.min()) and float(sched.timesteps.max()) < 1000


@pytest.mark.parametrize("name", MULTISTEP)
def test_multistep_misuse_raises(name):
    sched = make_scheduler(name, **SD)
    sched.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    t0, t1 = sched.timesteps[0], sched.timesteps[1]
    x1 = sched.step(stand_in_model(x, t0), t0, x).prev_sample
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(stand_in_model(x, t0), t0, x)  # the same step twice would corrupt the history
    sched.set_timesteps(10)
    sched.step(stand_in_model(x, t0), t0, x)
    with pytest.raises(ValueError, match="set_timesteps"):
        sched.step(stand_in_model(x1, t1), sched.timesteps[3], x1)  # skipping ahead


@pytest.mark.parametrize("name", list(REFERENCE))
def test_step_before_set_timesteps_raises(name):
    with pytest.raises(ValueError, match="set_timesteps"):
        make_scheduler(name).step(torch.zeros(1, 4, 8, 8), 999, torch.zeros(1, 4, 8, 8))


@pytest.mark.parametrize("steps", [0, -1, 1001, 2.5])
def test_bad_step_count_raises(steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        make_scheduler("ddim").set_timesteps(steps)


def test_unknown_sampler_lists_valid_names():
    with pytest.raises(ValueError, match="euler_a"):
        make_scheduler("k_lms")


@pytest.mark.parametrize("name", list(REFERENCE))
def test_from_config_reads_a_diffusers_scheduler_json(name):
    """The keys of SD 1.5's scheduler_config.json, incl. ones this algorithm lacks, carry over like diffusers'."""
    raw = dict(SD, _class_name="PNDMScheduler", _diffusers_version="0.6.0", trained_betas=None)
    ours, ref = scheduler_class(name).from_config(raw), REFERENCE[name].from_config(raw)
    for key, value in ref.config.items():
        if hasattr(ours.config, key) and not key.startswith("_"):
            assert getattr(ours.config, key) == value, key


def test_bad_config_values_raise():
    with pytest.raises(ValueError, match="beta_schedule"):
        make_scheduler("ddim", beta_schedule="cubic")
    with pytest.raises(ValueError, match="prediction_type"):
        make_scheduler("euler", prediction_type="noise")
    with pytest.raises(ValueError, match="timestep_spacing"):
        make_scheduler("ddim", timestep_spacing="uniform")


@pytest.mark.parametrize("steps", [1, 3])
def test_pndm_prk_with_too_few_steps_raises_clearly(steps):
    with pytest.raises(ValueError, match="skip_prk_steps"):
        make_scheduler("pndm").set_timesteps(steps)


def test_learned_ddpm_variance_raises_clearly():
    with pytest.raises(ValueError, match="learned"):
        make_scheduler("ddpm", variance_type="learned_range")


def test_sampler_names():
    assert [s.value for s in SamplerType] == list(REFERENCE)
