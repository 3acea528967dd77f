"""A small SDXL-architecture shapes model that learns SDXL's crop conditioning, trained on a CPU.

    python -m diffusion_core.toy.xl train --out outputs/toy-xl      # the recipe behind the shipped weights
    python -m diffusion_core.toy.xl evaluate                         # the crop effect, read by the shapes detector

SDXL was trained on crops of larger images and learnt to draw objects cut off by the border; Podell et al.
2023 (arXiv:2307.01952, §2.2) fix this by telling the UNet where each training image was cropped
(`crops_coords_top_left`) and asking for (0, 0) when sampling. This model shows the effect for real. Half of
its training images are the bundled data (a whole shape inside a 64x64 image), told crop (0, 0); the other
half are 64x64 windows cut at (top, left) in {4, 8, ..., 32}² from the same kind of scene drawn on a 96x96
canvas, told that crop. Its architecture is SDXL's at toy size: two text towers (a QuickGELU CLIP read at its
penultimate layer, a GELU CLIP with a pooled projection), no attention at the first level, deeper
transformers below, 64-channel heads, and the pooled text plus six time ids added to the timestep embedding.
It reuses the bundled model's VAE.
"""
from __future__ import annotations

import argparse
import copy
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from tqdm import tqdm

from ..checkpoints.configs import ModelConfig, sd_scheduler_config
from ..checkpoints.loader import Components, load_components, save_single_file
from ..generation import GenerationConfig
from ..images import tensor_to_pil
from ..models.text_encoder import DualTextEncoder, TextEncoderConfig
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import VAE
from ..pipeline import DiffusionModel
from ..schedulers import make_scheduler
from . import DEFAULT_GUIDANCE, DEFAULT_SAMPLER, DEFAULT_STEPS, WEIGHTS, load_toy
from .dataset import IMAGE_SIZE, PALETTE, make_batch, parse_caption, render, seen_scenes
from .evaluate import detect, eval_scenes, snap_to_palette
from .train import noised_batch, optimise, plot_losses, pool_latents

XL_WEIGHTS = WEIGHTS.with_name("toy_shapes_xl.safetensors")  # sgm's layout; nothing beside it: SDXL needs no yaml
CANVAS = 96            # cropped images are windows of scenes drawn this large
CROP_STEP, MAX_CROP = 4, CANVAS - IMAGE_SIZE  # crop offsets: multiples of 4 (the latent grid) up to 32
CROPPED_SHARE = 0.5    # share of training images that are crops; the rest are whole, crop (0, 0)

TOY_XL_CLIP_L = TextEncoderConfig(width=64, layers=3, heads=1, layer_index=-2, final_norm=False)  # pads with EOS
TOY_XL_CLIP_G = TextEncoderConfig(width=64, layers=3, heads=1, activation="gelu", layer_index=-2, pad_token_id=0,
                                  final_norm=False, projection_dim=64)
TOY_XL_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1,
                         attention_resolutions=(2, 4), context_dim=TOY_XL_CLIP_L.width + TOY_XL_CLIP_G.width,
                         num_head_channels=64, use_linear_in_transformer=True, transformer_depth=(0, 1, 2),
                         adm_in_channels=TOY_XL_CLIP_G.projection_dim + 6 * 256)


@dataclass(frozen=True)
class XLTrainConfig:
    """The recipe; `python -m diffusion_core.toy.xl train --help` exposes each field as a flag."""

    seed: int = 0                  # seeds the data stream, the initial weights and the noise
    pool_size: int = 8192          # training images encoded once (half whole, half cropped)
    unet_steps: int = 5000         # UNet + text-encoder optimiser steps
    minutes: float = 60.0          # wall-time budget: stop (and export what was learnt) when it runs out
    unet_batch: int = 32           # latents per step
    unet_lr: float = 1e-3          # peak AdamW learning rate, after warmup, cosine-decayed to 10%
    warmup_steps: int = 100        # linear warmup
    caption_dropout: float = 0.1   # share of captions replaced by "" (the unconditional prompt of CFG)
    offset_noise: float = 0.5      # std of a per-channel constant added to ε (as the bundled model)
    ema_decay: float = 0.999       # the exported networks are exponential moving averages
    threads: int = 0               # torch CPU threads; 0 keeps torch's default


def toy_xl_config(vae: VAE) -> ModelConfig:
    return ModelConfig("toy-shapes-xl", TOY_XL_UNET, vae.config, TOY_XL_CLIP_L, "v_prediction", native_size=IMAGE_SIZE,
                       scheduler=sd_scheduler_config("v_prediction"), scheduler_name=DEFAULT_SAMPLER,
                       default_steps=DEFAULT_STEPS, default_guidance=DEFAULT_GUIDANCE, text_2=TOY_XL_CLIP_G)


def load_toy_xl(device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                path: Path = XL_WEIGHTS) -> Components:
    """The shipped model's Components. Its SDXL file records the architecture; what no SDXL file can (the
    v-prediction, the bundled VAE's latent scale, the sampler defaults) comes from here."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: the SDXL shapes model is missing; run `python -m "
                                f"diffusion_core.toy.xl train` and copy its output there")
    components = load_components(path, device=device, dtype=dtype, prediction_type="v_prediction")
    scale = yaml.safe_load(WEIGHTS.with_suffix(".yaml").read_text())["model"]["params"]["scale_factor"]
    vae = VAE(replace(components.vae.config, scaling_factor=scale))
    vae.load_state_dict(components.vae.state_dict())
    config = toy_xl_config(vae)
    return replace(components, vae=vae.to(device, dtype).eval(), config=config,
                   scheduler=make_scheduler(config.scheduler_name, **config.scheduler))


# ---------------------------------------------------------------- data


def cropped_batch(seed: int, index: int, batch_size: int) -> tuple[torch.Tensor, list[str], list[tuple[int, int]]]:
    """Batch `index` of the stream: images (B, 3, 64, 64) in [-1, 1], captions and (top, left) crops."""
    images, captions = make_batch(seen_scenes(), seed, index, batch_size)
    rng = np.random.default_rng([seed, index, 1])
    crops = [(0, 0)] * batch_size
    for i in np.flatnonzero(rng.random(batch_size) < CROPPED_SHARE):
        top, left = (int(v) * CROP_STEP for v in rng.integers(1, MAX_CROP // CROP_STEP + 1, size=2))
        window = np.asarray(render(parse_caption(captions[i]), rng, CANVAS))[top:top + IMAGE_SIZE, left:left + IMAGE_SIZE]
        images[i] = torch.from_numpy(window.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)
        crops[i] = (top, left)
    return images, captions, crops


@torch.no_grad()
def encode_pool(vae: VAE, c: XLTrainConfig) -> tuple[torch.Tensor, torch.Tensor, list[str], torch.Tensor]:
    """Posterior mean and std of pool_size training images, their captions and their (top, left) crops."""
    means, stds, captions, crops = [], [], [], []
    for index in tqdm(range(c.pool_size // 64), desc="encoding the pool"):
        images, batch_captions, batch_crops = cropped_batch(c.seed + 1, index, 64)
        posterior = vae.encode(images)
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += batch_captions
        crops += batch_crops
    return torch.cat(means), torch.cat(stds), captions, torch.tensor(crops, dtype=torch.float32)


# ---------------------------------------------------------------- training


def diffusion_loss(unet: UNetModel, text_encoder: DualTextEncoder, z0: torch.Tensor, captions: list[str],
                   crops: torch.Tensor, scheduler, c: XLTrainConfig, generator: torch.Generator) -> torch.Tensor:
    """The bundled model's v-loss, with SDXL's conditioning: context and pooled text from both towers, and the
    time ids (original 64x64, the crop, target 64x64) that DiffusionModel feeds at sampling time."""
    captions, t, eps, z_t = noised_batch(z0, captions, scheduler, c, generator)
    context, pooled = text_encoder(captions)
    size = torch.full((len(z0), 2), float(IMAGE_SIZE))
    time_ids = torch.cat([size, crops, size], dim=1)  # (B, 6)
    prediction = unet(z_t, t, context, text_embeds=pooled, time_ids=time_ids)
    return F.mse_loss(prediction, scheduler.get_velocity(z0, eps, t))


def train(c: XLTrainConfig, out: Path) -> Path:
    """Train the UNet and both text towers on the bundled VAE's latents; write the SDXL file and a loss curve."""
    out.mkdir(parents=True, exist_ok=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    # Denormal floats (below 1.2e-38) are slow on x86 CPUs: a run without this slowed from 0.52 s to 1.05 s a step
    # over 1700 steps, the shipped run with it stayed under 0.8 s (docs/toy-model.md).
    torch.set_flush_denormal(True)
    start = time.time()
    torch.manual_seed(c.seed)
    vae = load_toy().vae.requires_grad_(False)
    unet, text_encoder = UNetModel(TOY_XL_UNET), DualTextEncoder(TOY_XL_CLIP_L, TOY_XL_CLIP_G)
    ema = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    opt = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=c.unet_lr, weight_decay=0.0)
    means, stds, captions, crops = encode_pool(vae, c)
    scheduler = make_scheduler("ddpm", **sd_scheduler_config("v_prediction"))
    log = []
    bar = tqdm(range(c.unet_steps), desc="UNet")
    for step in bar:
        if time.time() - start > 60 * c.minutes:
            print(f"stopped at step {step}: the {c.minutes}-minute budget ran out")
            break
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        picks, z0 = pool_latents(means, stds, c.unet_batch, vae.scaling_factor, generator)
        loss = diffusion_loss(unet, text_encoder, z0, [captions[i] for i in picks.tolist()], crops[picks], scheduler,
                              c, generator)
        loss = optimise(opt, loss, step, c, ((ema[0], unet), (ema[1], text_encoder)))
        log.append(("unet", step, loss, time.time() - start))
        bar.set_postfix(loss=f"{loss:.4f}")
    config = toy_xl_config(vae)
    components = Components(ema[0], vae, ema[1], make_scheduler(config.scheduler_name, **config.scheduler), config)
    exported = out / XL_WEIGHTS.name
    save_single_file(components, exported, dtype=torch.float16)
    plot_losses(log, out / "training_curve_xl.png")
    (out / "train_config.yaml").write_text(yaml.safe_dump(asdict(c)))
    print(f"trained in {(time.time() - start) / 60:.1f} min; wrote {exported}")
    return exported


# ---------------------------------------------------------------- the measured effect


def cut_at_top_left(image: Image.Image, min_pixels: int = 3) -> bool:
    """Whether the drawn shape runs into the top or the left border (a crop cut it there)."""
    detection = detect(image)
    if detection.colour is None:
        return False
    shape = snap_to_palette(np.asarray(image.convert("RGB"))) == list(PALETTE).index(detection.colour)
    return bool(shape[0].sum() >= min_pixels or shape[:, 0].sum() >= min_pixels)


@dataclass(frozen=True)
class CropScore:
    crop: tuple[int, int]   # the (top, left) asked for
    cut: int                # images whose shape runs into the top or left border
    colours: int            # images with the prompt's background and shape colours
    correct: int            # images the detector reads as the prompt (both colours and the shape)
    total: int


def crop_effect(model: DiffusionModel, crops: tuple[tuple[int, int], ...] = ((0, 0), (MAX_CROP, MAX_CROP)),
                seeds: tuple[int, ...] = (0, 1), split: str = "seen", every: int = 1) -> list[CropScore]:
    """For each crop: generate every `every`-th prompt of `split` with every seed; count cut shapes and right images."""
    scenes = eval_scenes(split)[::every]
    scores = []
    for crop in crops:
        configs = [GenerationConfig(scene.caption, seed=seed, crops_coords_top_left=crop) for seed in seeds
                   for scene in scenes]
        images = [r.image for r in model.generate_batch(configs, progress=False)]
        detections = [detect(image) for image in images]
        asked = scenes * len(seeds)
        scores.append(CropScore(crop, sum(map(cut_at_top_left, images)),
                                sum((d.background, d.colour) == (s.background, s.colour) for d, s in zip(detections, asked)),
                                sum(d.matches(s) for d, s in zip(detections, asked)), len(images)))
    return scores


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train_parser = commands.add_parser("train", help="train from scratch (about an hour on 2 cores)")
    train_parser.add_argument("--out", type=Path, default=Path("outputs/toy-xl"))
    for name, value in asdict(XLTrainConfig()).items():
        train_parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    evaluate_parser = commands.add_parser("evaluate", help="measure the crop effect")
    evaluate_parser.add_argument("--weights", type=Path, default=None, help="default: the shipped model")
    args = parser.parse_args(argv)
    if args.command == "train":
        train(XLTrainConfig(**{k: getattr(args, k) for k in asdict(XLTrainConfig())}), args.out)
        return
    components = load_toy_xl() if args.weights is None else load_toy_xl(path=args.weights)
    for score in crop_effect(DiffusionModel(components)):
        print(f"crop {score.crop}: cut at the top/left {score.cut}/{score.total} = {score.cut / score.total:.0%}, "
              f"colours right {score.colours / score.total:.0%}, colours and shape right "
              f"{score.correct / score.total:.0%}")
    images, _, crops = cropped_batch(seed=99, index=0, batch_size=512)  # the training data, for comparison
    for cropped in (False, True):
        picked = [tensor_to_pil(im[None])[0] for im, c in zip(images, crops) if (c != (0, 0)) == cropped]
        print(f"training images {'cropped' if cropped else 'whole, crop (0, 0)'}: cut at the top/left "
              f"{sum(map(cut_at_top_left, picked))}/{len(picked)} = {sum(map(cut_at_top_left, picked)) / len(picked):.0%}")


if __name__ == "__main__":
    main()
