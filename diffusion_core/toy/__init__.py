"""The bundled shapes model: a latent text-to-image model trained from scratch on synthetic shapes, on a CPU.

`load_toy()` gives its Components (the default behind `DiffusionModel()`); `dataset`, `train` and `evaluate`
hold the data, the training recipe and the measurement. See docs/toy-model.md.
"""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..checkpoints.loader import Components

WEIGHTS = Path(__file__).parent / "weights" / "toy_shapes.safetensors"  # toy_shapes.yaml lies beside it
STAR_LORA = WEIGHTS.parent / "star_lora.safetensors"  # a LoRA that teaches it stars (toy/train_lora.py)
SUNDISC_EMBEDDING = WEIGHTS.parent / "sundisc.safetensors"  # a word for a yellow circle (toy/train_embedding.py)
BLOB_CONTROLNET = WEIGHTS.parent / "toy_blob_controlnet.safetensors"  # puts the shape at a blob (toy/train_controlnet.py)
# The sampler, steps and guidance used when a GenerationConfig leaves them unset: the best measured by
# `python -m diffusion_core.toy.evaluate` within the 1 s-per-image budget (docs/toy-model.md).
DEFAULT_SAMPLER = "euler_a"
DEFAULT_STEPS = 30
DEFAULT_GUIDANCE = 2.0


def load_toy(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Components:
    """The bundled model's Components, with its measured default sampler, steps and guidance in its config."""
    from ..checkpoints.loader import load_components  # the loader imports the models; keep `toy` light to import
    from ..schedulers import make_scheduler

    if not WEIGHTS.is_file():
        raise FileNotFoundError(f"{WEIGHTS}: the bundled shapes model is missing; reinstall the package or run "
                                f"`python -m diffusion_core.toy.train` and copy its output there")
    components = load_components(WEIGHTS, device=device, dtype=dtype)
    config = replace(components.config, name="toy-shapes", scheduler_name=DEFAULT_SAMPLER,
                     default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE)
    return replace(components, config=config, scheduler=make_scheduler(DEFAULT_SAMPLER, **config.scheduler))
