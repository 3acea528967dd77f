"""Noise schedulers, one algorithm per file, each numerically equal to its diffusers counterpart."""
from __future__ import annotations

import dataclasses
import enum
import importlib
from typing import Any

from .base import NoiseScheduler, SchedulerConfig, StepOutput


class SamplerType(str, enum.Enum):
    """The sampler names accepted everywhere (GenerationConfig.sampler, the CLI, make_scheduler)."""

    DDPM = "ddpm"
    DDIM = "ddim"
    PNDM = "pndm"
    EULER = "euler"
    EULER_A = "euler_a"
    DPMPP_2M = "dpmpp_2m"
    UNIPC = "unipc"


# name -> (module, class); DPM-Solver++ 2M is the multistep solver at its default order 2.
_CLASSES = {
    SamplerType.DDPM: ("ddpm", "DDPMScheduler"),
    SamplerType.DDIM: ("ddim", "DDIMScheduler"),
    SamplerType.PNDM: ("pndm", "PNDMScheduler"),
    SamplerType.EULER: ("euler", "EulerScheduler"),
    SamplerType.EULER_A: ("euler_ancestral", "EulerAncestralScheduler"),
    SamplerType.DPMPP_2M: ("dpm_solver", "DPMSolverMultistepScheduler"),
    SamplerType.UNIPC: ("unipc", "UniPCScheduler"),
}


def scheduler_class(name: str | SamplerType) -> type[NoiseScheduler]:
    """The scheduler class for a sampler name; a ValueError lists the valid names."""
    try:
        module, cls = _CLASSES[SamplerType(name)]
    except ValueError:
        valid = ", ".join(s.value for s in SamplerType)
        raise ValueError(f"unknown sampler {name!r}; choose one of: {valid}") from None
    return getattr(importlib.import_module(f".{module}", __name__), cls)


def supports_karras_sigmas(name: str | SamplerType) -> bool:
    """Whether the sampler can replace its σs by Karras et al.'s (eq. 5): a `use_karras_sigmas` config key."""
    return "use_karras_sigmas" in {f.name for f in dataclasses.fields(scheduler_class(name).Config)}


def make_scheduler(name: str | SamplerType, **config: Any) -> NoiseScheduler:
    """make_scheduler("ddim", **diffusers_style_config): keys the algorithm lacks are ignored, like from_config."""
    return scheduler_class(name).from_config(config)


KARRAS_SAMPLERS = [s.value for s in SamplerType if supports_karras_sigmas(s)]

__all__ = ["NoiseScheduler", "SchedulerConfig", "StepOutput", "SamplerType", "make_scheduler", "scheduler_class",
           "supports_karras_sigmas", "KARRAS_SAMPLERS"]
