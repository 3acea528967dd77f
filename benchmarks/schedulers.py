"""Per-step overhead of each scheduler against diffusers' at SD latent size, with a no-op model.

    python benchmarks/schedulers.py [--steps 50] [--repeats 5]

Prints, per sampler, microseconds per step for ours and diffusers' and the ratio ours/diffusers
(lower is better; <= 1.0 means no slower). Both run in the same process on the same inputs.
"""
from __future__ import annotations

import argparse
import inspect
import time

import diffusers
import torch

from diffusion_core.schedulers import SamplerType, make_scheduler

SD = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
          set_alpha_to_one=False, skip_prk_steps=True, clip_sample=False)
REFERENCE = {
    "ddpm": diffusers.DDPMScheduler, "ddim": diffusers.DDIMScheduler, "pndm": diffusers.PNDMScheduler,
    "euler": diffusers.EulerDiscreteScheduler, "euler_a": diffusers.EulerAncestralDiscreteScheduler,
    "dpmpp_2m": diffusers.DPMSolverMultistepScheduler, "unipc": diffusers.UniPCMultistepScheduler,
}


def seconds_per_step(scheduler, steps: int, repeats: int) -> float:
    """Best-of-repeats wall time of one sampling loop, per step; the 'model' returns its input."""
    latents = torch.randn(1, 4, 64, 64)
    best = float("inf")
    for _ in range(repeats):
        scheduler.set_timesteps(steps)
        x = latents * float(scheduler.init_noise_sigma)
        # diffusers' PNDM and UniPC take no generator; ours all do
        takes_generator = "generator" in inspect.signature(scheduler.step).parameters
        extra = {"generator": torch.Generator().manual_seed(0)} if takes_generator else {}
        start = time.perf_counter()
        for t in scheduler.timesteps:
            model_output = scheduler.scale_model_input(x, t)  # no-op model
            x = scheduler.step(model_output, t, x, **extra).prev_sample
        best = min(best, (time.perf_counter() - start) / len(scheduler.timesteps))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)  # per-step overhead, not BLAS throughput
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, 1x4x64x64, "
          f"{args.steps} steps, best of {args.repeats}, 1 thread")
    print(f"{'sampler':10} {'ours us/step':>13} {'diffusers us/step':>18} {'ratio':>7}")
    for sampler in SamplerType:
        ours = seconds_per_step(make_scheduler(sampler, **SD), args.steps, args.repeats)
        theirs = seconds_per_step(REFERENCE[sampler.value].from_config(SD), args.steps, args.repeats)
        print(f"{sampler.value:10} {ours * 1e6:13.1f} {theirs * 1e6:18.1f} {ours / theirs:7.2f}")


if __name__ == "__main__":
    main()
