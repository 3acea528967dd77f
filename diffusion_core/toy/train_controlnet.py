"""Teach the bundled shapes model to draw its shape where a rough blob says: a ControlNet, trained on a CPU.

    python -m diffusion_core.toy.train_controlnet --out outputs/blob-controlnet   # or: diffusion-core train-controlnet

The shapes model places its shape anywhere; the prompt says only what to draw. The control image here says
where: a white blob on black around the shape's centre, about its size, its outline wobbly and shifted by a
few pixels, so it says "here, this big", never which shape. ControlNet (Zhang et al. 2023, §3) trains a copy
of the frozen UNet's encoder, initialised from the UNet's own weights, that reads the noisy latent plus an
embedding of the blob; its outputs join the UNet through zero convolutions, so step 0 is the unchanged model.
As in the paper (§3.3) a share of the prompts is dropped to "", so the ControlNet learns to read the blob
without the prompt's help. The result is an original-layout file (cldm's names) with its yaml beside it.
"""
from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image, ImageDraw
from safetensors.torch import save_file
from tqdm import tqdm

from ..control import ControlInput
from ..generation import GenerationConfig
from ..models.controlnet import ControlNetModel, controlnet_config_for, copy_encoder
from ..pipeline import DiffusionModel
from ..schedulers import make_scheduler
from .dataset import IMAGE_SIZE, Scene, random_box, render, seen_scenes
from .evaluate import detect, eval_scenes
from .train import TrainConfig, diffusion_loss, parse_recipe, pool_latents

HINT_WIDTHS = (16, 32, 64)  # the blob's embedding: two stride-2 convolutions, 64 px -> the 16x16 latents
BLOB_CORNERS = 12
NEAR = 8.0  # pixels: a shape whose centre lies this close to the blob's is where the blob said


@dataclass(frozen=True)
class ControlNetTrainConfig:
    """The recipe; `python -m diffusion_core.toy.train_controlnet --help` exposes each field as a flag."""

    steps: int = 1500              # optimiser steps
    batch: int = 32                # latents per step
    lr: float = 5e-4               # peak AdamW learning rate, cosine-decayed to 10%
    pool_size: int = 4096          # images (and their blobs) encoded once
    caption_dropout: float = 0.3   # share of prompts replaced by "" (ControlNet §3.3 drops half)
    seed: int = 0                  # seeds the data, the noise and the hint embedding's initial weights
    threads: int = 1               # torch CPU threads; 1 is faster on a shared CPU (0: torch's default)


def blob(box: tuple[int, int, int], rng: np.random.Generator, size: int = IMAGE_SIZE) -> tuple[Image.Image, tuple]:
    """The rough control image of a shape's box (left, top, side), and the blob's centre (x, y) in pixels: a white
    12-cornered polygon on black, centred within ±3 px of the box's centre, its radius 0.8-1.1 half-sides, each
    corner's 0.8-1.2 of that."""
    x0, y0, side = box
    cx, cy = x0 + side / 2 + rng.uniform(-3, 3), y0 + side / 2 + rng.uniform(-3, 3)
    radius = side / 2 * rng.uniform(0.8, 1.1)
    angles = np.linspace(0, 2 * math.pi, BLOB_CORNERS, endpoint=False) + rng.uniform(0, 2 * math.pi / BLOB_CORNERS)
    radii = radius * rng.uniform(0.8, 1.2, BLOB_CORNERS)
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).polygon([(cx + r * math.cos(a), cy + r * math.sin(a)) for r, a in zip(radii, angles)],
                                  fill="white")
    return image, (cx, cy)


def scene_with_blob(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, Image.Image, tuple]:
    """An image of the scene, its blob and the blob's centre."""
    box = random_box(rng)
    image = render(scene, rng, box=box)
    control, centre = blob(box, rng)
    return image, control, centre


@torch.no_grad()
def encode_pool(model: DiffusionModel, c: ControlNetTrainConfig
                ) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Posterior mean and std of pool_size images of the seen scenes, their captions and their blobs (N, 1, 64, 64)."""
    rng = np.random.default_rng([c.seed, 2])
    scenes = seen_scenes()
    picks = [scenes[i] for i in rng.integers(0, len(scenes), c.pool_size)]
    means, stds, blobs = [], [], []
    for start in range(0, len(picks), 64):
        pairs = [scene_with_blob(s, rng)[:2] for s in picks[start:start + 64]]
        pixels = np.stack([np.asarray(image) for image, _ in pairs]).astype(np.float32)
        posterior = model.vae.encode(torch.from_numpy(pixels / 127.5 - 1.0).permute(0, 3, 1, 2))
        means.append(posterior.mean)
        stds.append(posterior.std)
        blobs.append(torch.from_numpy(np.stack([np.asarray(control)[None, :, :, 0] for _, control in pairs])))
    return torch.cat(means), torch.cat(stds), [s.caption for s in picks], torch.cat(blobs)


def new_controlnet(model: DiffusionModel, seed: int) -> ControlNetModel:
    """ControlNet §3.2: the encoder copied from the model's UNet, the hint embedding random, the zero convs 0."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel(controlnet_config_for(model.unet.config, embedding_channels=HINT_WIDTHS))
    return copy_encoder(controlnet, model.unet)


def save_controlnet(controlnet: ControlNetModel, path: Path, config: ControlNetTrainConfig) -> Path:
    """cldm's layout: the weights under their original names, and a yaml beside them with what weights cannot
    show (the heads), as lllyasviel ships control_v11p_sd15_*.pth with its .yaml."""
    save_file({k: v.contiguous() for k, v in controlnet.state_dict().items()}, path,
              metadata={"diffusion_core_train_controlnet": str(asdict(config))})
    u = controlnet.controlnet_config.unet
    params = dict(in_channels=u.in_channels, hint_channels=controlnet.controlnet_config.hint_channels,
                  model_channels=u.model_channels, attention_resolutions=list(u.attention_resolutions),
                  num_res_blocks=u.num_res_blocks, channel_mult=list(u.channel_mult), num_heads=u.num_heads,
                  num_head_channels=u.num_head_channels, upcast_attention=u.upcast_attention,
                  use_spatial_transformer=True,
                  transformer_depth=max(u.transformer_depth), context_dim=u.context_dim, legacy=False,
                  global_average_pooling=False)
    stage = {"target": "cldm.cldm.ControlNet", "params": params}
    path.with_suffix(".yaml").write_text(yaml.safe_dump({"model": {"params": {"control_stage_config": stage}}}))
    return path


def train_controlnet(c: ControlNetTrainConfig, out: Path, minutes: float | None = None) -> Path:
    """Train on the bundled model and write `out/toy_blob_controlnet.safetensors` (+ .yaml); `minutes` stops
    early, saving."""
    out.mkdir(parents=True, exist_ok=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    start = time.time()
    model = DiffusionModel()
    for network in (model.unet, model.text_encoder, model.vae):
        network.requires_grad_(False)
    means, stds, captions, blobs = encode_pool(model, c)
    controlnet = new_controlnet(model, c.seed).train()
    opt = torch.optim.AdamW(controlnet.parameters(), lr=c.lr, weight_decay=0.0)
    recipe = TrainConfig(seed=c.seed, caption_dropout=c.caption_dropout)  # the base model's noise and v target
    scheduler = make_scheduler("ddpm", **recipe.scheduler)
    bar = tqdm(range(c.steps), desc="ControlNet (blobs)")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / c.steps)))
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        picks, z0 = pool_latents(means, stds, c.batch, model.vae.scaling_factor, generator)
        hint = blobs[picks].expand(-1, 3, -1, -1).float() / 255  # (B, 3, 64, 64) in [0, 1]

        def residuals(z_t: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> dict:
            down, mid = controlnet(z_t, t, context, hint)
            return {"down_residuals": down, "mid_residual": mid}

        loss = diffusion_loss(model.unet, model.text_encoder, z0, [captions[i] for i in picks.tolist()], scheduler,
                              recipe, generator, control=residuals)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if minutes is not None and time.time() - start > 60 * minutes:
            print(f"stopped at step {step + 1} of {c.steps}: the {minutes} min budget ran out")
            break
    path = save_controlnet(controlnet.eval(), out / "toy_blob_controlnet.safetensors", c)
    print(f"trained in {(time.time() - start) / 60:.1f} min: {path}")
    return path


@dataclass(frozen=True)
class Placement:
    """Where the shapes of one set of images landed, against the blobs asked for."""

    near: int         # images whose shape's centre lies within NEAR px of its blob's
    right: int        # images the detector reads as the prompt (colours and shape)
    distance: float   # median distance from the shape's centre to the blob's, px (no shape: the image diagonal)
    total: int


def placement(images: list[Image.Image], scenes: list[Scene], centres: list[tuple]) -> Placement:
    found = [detect(image) for image in images]
    diagonal = IMAGE_SIZE * math.sqrt(2)
    distances = [diagonal if d.centre is None else math.dist(d.centre, c) for d, c in zip(found, centres)]
    return Placement(sum(d <= NEAR for d in distances), sum(d.matches(s) for d, s in zip(found, scenes)),
                     float(np.median(distances)), len(images))


def measure(path: Path, seeds: tuple[int, ...] = (0, 1)) -> str:
    """A markdown table: with each of the evaluation prompts (evaluate.eval_scenes("seen")) and a random blob,
    how often the shape's centre lands within NEAR px of the blob's, without the ControlNet and with it."""
    model, controlnet = DiffusionModel(), ControlNetModel.from_pretrained(path)
    rng = np.random.default_rng(12345)
    cases = [(seed, scene, *scene_with_blob(scene, rng)[1:]) for seed in seeds for scene in eval_scenes("seen")]
    configs = [GenerationConfig(scene.caption, seed=seed) for seed, scene, _, _ in cases]
    plain = [r.image for r in model.generate_batch(configs, progress=False)]
    steered = [model.generate(config, control=[ControlInput(controlnet, control)], progress=False).image
               for config, (_, _, control, _) in zip(configs, cases)]
    scenes, centres = [scene for _, scene, _, _ in cases], [centre for *_, centre in cases]
    rows = []
    for name, images in (("without ControlNet", plain), ("with ControlNet (scale 1)", steered)):
        p = placement(images, scenes, centres)
        rows.append(f"| {name} | {p.near / p.total:.0%} ({p.near}/{p.total}) | {p.distance:.1f} px | "
                    f"{p.right / p.total:.0%} |")
    return "\n".join([f"| {len(cases)} images | shape centre within {NEAR:.0f} px of the blob's | median distance | "
                      f"prompt accuracy |", "| --- | --- | --- | --- |", *rows])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Teach the bundled shapes model to put its shape where a blob says.")
    parser.add_argument("--out", type=Path, default=Path("outputs/blob-controlnet"))
    parser.add_argument("--minutes", type=float, default=25.0, help="wall-time budget (default: 25)")
    parser.add_argument("--no-measure", action="store_true", help="skip measuring placement without and with it")
    args, config = parse_recipe(parser, ControlNetTrainConfig, argv)
    target = args.out / "toy_blob_controlnet.safetensors"
    if target.exists():
        parser.error(f"{target} exists and is never overwritten; pass another --out")
    path = train_controlnet(config, args.out, args.minutes)
    if not args.no_measure:
        print(measure(path))


if __name__ == "__main__":
    main()
