"""Teach the bundled shapes model a shape it has never seen (a star) with a LoRA, on a CPU, in minutes.

    python -m diffusion_core.toy.train_lora --out outputs/star-lora      # or: diffusion-core train-lora --out ...

The model's weights stay frozen. Every linear and conv weight W of the UNet and of the text encoder's blocks
gets a trainable low-rank update, W + (α/r)·up·down (Hu et al. 2021): `down` starts random and `up` at zero, so
training starts from the unchanged model. The update is a torch parametrization of the weight, so the frozen
modules run as they are, open_clip's fused [q; k; v] attention weight included. Half of each batch shows stars
("a red star on a blue background"), half the shapes the model knows, so that the LoRA adds a word without
overwriting the others. The result is a kohya-format file that `DiffusionModel.load_lora` (and A1111) reads.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from itertools import product
from pathlib import Path

import numpy as np
import torch
import torch.nn.utils.parametrize as parametrize
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..adapters.lora import lora_delta
from ..adapters.lora_names import Target, model_targets, network
from ..pipeline import DiffusionModel
from ..schedulers import make_scheduler
from .dataset import NEW_SHAPES, PALETTE, SHAPES, Scene, render, seen_scenes
from .evaluate import detect, eval_scenes, sample_images
from .train import TrainConfig, diffusion_loss, parse_recipe, pool_latents

# Star scenes held out of LoRA training, to ask whether the new word composes with colours: green stars on any
# background, and a white star on black.
HELD_OUT_STARS = (("green", None), ("white", "black"))


@dataclass(frozen=True)
class LoraTrainConfig:
    """The recipe; `python -m diffusion_core.toy.train_lora --help` exposes each field as a flag."""

    shape: str = "star"        # the new shape (dataset.NEW_SHAPES)
    targets: str = "all"       # "all": every UNet and text-block weight; "attention": the UNet's transformers only
    rank: int = 8              # r: inner size of each up·down product
    alpha: float = 8.0         # α: the update is scaled by α/r
    steps: int = 800           # optimiser steps
    batch: int = 32            # latents per step, half of them the new shape
    lr: float = 2e-3           # peak AdamW learning rate, cosine-decayed to 10%
    pool_size: int = 4096      # images encoded once, half of them the new shape
    seed: int = 0              # seeds the data, the initial LoRA weights and the noise
    threads: int = 1           # torch CPU threads; 1 is faster when anything else shares the CPU (0: torch's default)


def new_shape_scenes(shape: str, held_out: bool) -> list[Scene]:
    """Every (colour, shape, background) of the new shape, the held-out ones or the others."""
    def is_held_out(scene: Scene) -> bool:
        return any(scene.colour == c and b in (None, scene.background) for c, b in HELD_OUT_STARS)
    scenes = [Scene(c, shape, b) for c, b in product(PALETTE, PALETTE) if c != b]
    return [s for s in scenes if is_held_out(s) == held_out]


class LoraUpdate(nn.Module):
    """A parametrization W ↦ W + (α/r)·up·down of one weight, or of one row block of the fused [q; k; v]."""

    def __init__(self, target: Target, shape: torch.Size, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        out, inp, *kernel = (shape[0] // target.parts, *shape[1:])
        self.target, self.scale = target, alpha / rank
        self.down = nn.Parameter(torch.randn(rank, inp, *kernel, generator=generator) / math.sqrt(inp * math.prod(kernel)))
        self.up = nn.Parameter(torch.zeros(out, rank, *[1] * len(kernel)))

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return self.target.plus(weight, lora_delta(self.up, self.down, self.scale))


def attach_lora(model: DiffusionModel, rank: int, alpha: float, seed: int, targets: str = "all") -> dict[str, LoraUpdate]:
    """A LoraUpdate on every UNet and text-block weight LoRA files can name (targets="attention": in the UNet,
    only its transformers'); {kohya name: update}."""
    if targets not in ("all", "attention"):
        raise ValueError(f"targets {targets!r} is not 'all' or 'attention'")
    generator = torch.Generator().manual_seed(seed)
    updates, seen = {}, set()
    for name, target in model_targets(model.unet.config, model.text_encoder).items():
        if not name.startswith("lora_") or target in seen or target.transposed:
            continue  # the first spelling of each target is kohya's (lora_names.py lists it first)
        if targets == "attention" and name.startswith("lora_unet_") and "_attentions_" not in name:
            continue
        seen.add(target)
        module_name, _, tensor_name = target.key.rpartition(".")
        module = network(model, target.component).get_submodule(module_name)
        update = LoraUpdate(target, getattr(module, tensor_name).shape, rank, alpha, generator)
        parametrize.register_parametrization(module, tensor_name, update)
        updates[name] = update
    return updates


def save_lora(updates: dict[str, LoraUpdate], alpha: float, path: Path, config: LoraTrainConfig) -> Path:
    """The updates as a kohya file: `<name>.lora_down.weight`, `.lora_up.weight`, `.alpha` per module."""
    state = {}
    for name, update in updates.items():
        state.update({f"{name}.lora_down.weight": update.down.detach().contiguous(),
                      f"{name}.lora_up.weight": update.up.detach().contiguous(), f"{name}.alpha": torch.tensor(alpha)})
    save_file(state, path, metadata={"diffusion_core_train_lora": str(asdict(config))})
    return path


def detach_lora(model: DiffusionModel) -> None:
    """Remove every parametrization, leaving the original weights."""
    for network in (model.unet, model.text_encoder):
        for module in list(network.modules()):
            for tensor_name in list(getattr(module, "parametrizations", {})):
                parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=False)


def encode_pool(model: DiffusionModel, c: LoraTrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std of pool_size rendered images (half the new shape, half the known ones), captions."""
    rng = np.random.default_rng([c.seed, 1])
    new, known = new_shape_scenes(c.shape, held_out=False), seen_scenes()
    scenes = [new[i] for i in rng.integers(0, len(new), c.pool_size // 2)] + [
        known[i] for i in rng.integers(0, len(known), c.pool_size - c.pool_size // 2)]
    means, stds = [], []
    with torch.no_grad():
        for start in range(0, len(scenes), 64):
            pixels = np.stack([np.asarray(render(s, rng)) for s in scenes[start:start + 64]]).astype(np.float32)
            posterior = model.vae.encode(torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2))
            means.append(posterior.mean)
            stds.append(posterior.std)
    return torch.cat(means), torch.cat(stds), [s.caption for s in scenes]


def train_lora(c: LoraTrainConfig, out: Path, minutes: float | None = None) -> Path:
    """Train on the bundled model and write `out/<shape>_lora.safetensors`; `minutes` stops early, saving."""
    if c.shape not in NEW_SHAPES:
        raise ValueError(f"shape {c.shape!r} is not one of the new shapes {NEW_SHAPES}")
    out.mkdir(parents=True, exist_ok=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    start = time.time()
    torch.manual_seed(c.seed)
    model = DiffusionModel()
    model.unet.requires_grad_(False), model.text_encoder.requires_grad_(False), model.vae.requires_grad_(False)
    pool = encode_pool(model, c)
    updates = attach_lora(model, c.rank, c.alpha, c.seed, c.targets)
    params = [p for update in updates.values() for p in update.parameters()]
    opt = torch.optim.AdamW(params, lr=c.lr, weight_decay=0.0)
    recipe = TrainConfig(seed=c.seed)  # the base model's noise, caption dropout and v target
    scheduler = make_scheduler("ddpm", **recipe.scheduler)
    bar = tqdm(range(c.steps), desc=f"LoRA ({c.shape})")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / c.steps)))
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        picks, z0 = pool_latents(pool[0], pool[1], c.batch, model.vae.scaling_factor, generator)
        loss = diffusion_loss(model.unet, model.text_encoder, z0, [pool[2][i] for i in picks.tolist()], scheduler,
                              recipe, generator)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if minutes is not None and time.time() - start > 60 * minutes:
            print(f"stopped at step {step + 1} of {c.steps}: the {minutes} min budget ran out")
            break
    path = save_lora(updates, c.alpha, out / f"{c.shape}_lora.safetensors", c)
    detach_lora(model)
    print(f"trained in {(time.time() - start) / 60:.1f} min: {path}")
    return path


def accuracy(model: DiffusionModel, scenes: list[Scene], seeds: tuple[int, ...] = (0, 1)) -> float:
    """The share of images, one per (seed, scene), in which the detector (knowing every shape, the new ones
    too) reads the prompt right, at the bundled model's default sampler, steps and guidance."""
    images = sample_images(model, scenes, list(seeds), None, model.config.default_steps, model.config.default_guidance)
    return float(np.mean([detect(image, SHAPES + NEW_SHAPES).matches(scene)
                          for image, scene in zip(images, scenes * len(seeds))]))


def measure(path: Path, shape: str) -> str:
    """A markdown table of prompt accuracy without and with the LoRA: the new shape's seen and held-out prompts,
    and the known shapes' evaluation prompts (evaluate.eval_scenes), which the LoRA should leave as they were."""
    prompt_sets = {f"{shape}, seen colours": new_shape_scenes(shape, held_out=False),
                   f"{shape}, held-out colours": new_shape_scenes(shape, held_out=True),
                   "known shapes, seen": eval_scenes("seen"), "known shapes, held out": eval_scenes("held_out")}
    model = DiffusionModel()
    before = {name: accuracy(model, scenes) for name, scenes in prompt_sets.items()}
    model.load_lora(path)
    after = {name: accuracy(model, scenes) for name, scenes in prompt_sets.items()}
    rows = [f"| {name} ({2 * len(scenes)} images) | {before[name]:.0%} | {after[name]:.0%} |"
            for name, scenes in prompt_sets.items()]
    return "\n".join(["| prompts | without LoRA | with LoRA |", "| --- | --- | --- |", *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Teach the bundled shapes model a new shape with a LoRA.")
    parser.add_argument("--out", type=Path, default=Path("outputs/star-lora"))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget (default: 10)")
    parser.add_argument("--no-measure", action="store_true", help="skip measuring accuracy without and with it")
    args, config = parse_recipe(parser, LoraTrainConfig, argv)
    if (args.out / f"{config.shape}_lora.safetensors").exists():
        parser.error(f"{args.out / f'{config.shape}_lora.safetensors'} exists and is never overwritten; "
                     f"pass another --out")
    path = train_lora(config, args.out, args.minutes)
    if not args.no_measure:
        print(measure(path, config.shape))


if __name__ == "__main__":
    main()
