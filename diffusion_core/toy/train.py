"""Train the bundled shapes model from scratch on a CPU: the VAE first, then the UNet and text encoder together.

    python -m diffusion_core.toy.train --out outputs/toy-train            # the full recipe
    python -m diffusion_core.toy.train --out outputs/toy-train --resume   # carry on after an interruption

Stage 1 fits a small KL autoencoder (Rombach et al. 2022, §3.1) to 64x64 shapes images, giving 16x16x4
latents. Stage 2 encodes a fixed pool of images once, then trains v_θ(z_t, t, c) with the DDPM loss
‖v - v_θ(z_t, t, c)‖², z_t = √ᾱ_t·z_0 + √(1-ᾱ_t)·ε, on the v target v = √ᾱ_t·ε - √(1-ᾱ_t)·z_0 (Ho et al.
2020, eq. 14; Salimans & Ho 2022; `--prediction-type epsilon` trains on ε instead), where c comes from a
small CLIP-style text encoder trained alongside; 10% of captions are replaced by "" so that the same network
also learns the unconditional prediction classifier-free guidance needs (Ho & Salimans 2022, §3.2).
"""
from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ..checkpoints.configs import ModelConfig, sd_scheduler_config
from ..checkpoints.loader import Components, save_single_file
from ..images import make_grid
from ..models.text_encoder import TextEncoder, TextEncoderConfig
from ..models.unet import UNetConfig, UNetModel
from ..models.vae import VAE, VAEConfig
from ..pipeline import DiffusionModel
from ..schedulers import make_scheduler
from .dataset import Scene, make_batch, parse_caption, seen_scenes
from .evaluate import sample_images

# The toy architecture: SD's family at a size a CPU trains in minutes. Widths are multiples of 32 because
# LDM's GroupNorm has 32 groups, and the text width is 64 so that heads = width / 64 = 1 as every CLIP states.
# The UNet is at least 64 wide everywhere: at 32 channels each GroupNorm group is one channel, which erases
# the per-channel timestep shift a ResBlock adds (notebook 03 shows it).
TOY_VAE = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1)  # 64x64x3 <-> 16x16x4
TOY_TEXT = TextEncoderConfig(width=64, layers=2, heads=1)  # SD1-style: QuickGELU, last layer, pads with EOS
TOY_UNET = UNetConfig(in_channels=4, out_channels=4, model_channels=64, channel_mult=(1, 1, 2), num_res_blocks=1,
                      attention_resolutions=(2, 4), context_dim=TOY_TEXT.width, num_heads=4)
PREVIEW_CAPTIONS = ("a red circle on a blue background", "a yellow square on a purple background",
                    "a white triangle on a green background", "a blue circle on a orange background",
                    "a green triangle on a red background", "a purple circle on a yellow background",
                    "a orange square on a white background", "a white square on a black background")


@dataclass(frozen=True)
class TrainConfig:
    """The whole recipe; `python -m diffusion_core.toy.train --help` exposes each field as a flag."""

    seed: int = 0                  # seeds the data stream, the initial weights and the noise
    vae_steps: int = 1000          # autoencoder optimiser steps
    vae_batch: int = 16            # images per autoencoder step
    vae_crop: int = 32             # the autoencoder trains on random crops this big: 4x cheaper, same convolutions
    vae_lr: float = 1e-3           # AdamW learning rate of the autoencoder
    kl_weight: float = 1e-6        # weight of KL(q(z|x) ‖ N(0, I)): just enough to keep the latents bounded
    decoder_steps: int = 150       # then the decoder alone on whole images: sharper edges, truer colours
    decoder_batch: int = 8         # whole images per decoder step
    decoder_lr: float = 1e-3       # peak learning rate of the decoder stage, cosine-decayed to 0
    pool_size: int = 8192          # images encoded once for stage 2 (about 57 per seen scene)
    unet_steps: int = 9000         # UNet + text-encoder optimiser steps
    unet_batch: int = 32           # latents per UNet step
    unet_lr: float = 1e-3          # peak AdamW learning rate, after warmup, cosine-decayed to 10%
    warmup_steps: int = 100        # linear warmup of the UNet learning rate
    caption_dropout: float = 0.1   # share of captions replaced by "" (the unconditional prompt of CFG)
    offset_noise: float = 0.5      # std of a per-channel constant added to ε: lets the model change flat colours
    prediction_type: str = "v_prediction"  # the UNet's target: "v_prediction" (as SD 2-768-v) or "epsilon"
    ema_decay: float = 0.999       # the exported UNet and text encoder are exponential moving averages
    preview_every: int = 1000      # steps between sample grids
    checkpoint_every: int = 500    # steps between resumable checkpoints
    threads: int = 0               # torch CPU threads; 0 keeps torch's default (1 is faster on a shared CPU)

    @property
    def scheduler(self) -> dict:
        """SD's scaled_linear training schedule, with this recipe's prediction type."""
        return sd_scheduler_config(self.prediction_type)


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < c.warmup_steps:
        return c.unet_lr * (step + 1) / c.warmup_steps
    progress = (step - c.warmup_steps) / max(1, c.unet_steps - c.warmup_steps)
    return c.unet_lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def vae_loss(vae: VAE, images: torch.Tensor, kl_weight: float, generator: torch.Generator) -> torch.Tensor:
    """L1 + L2 reconstruction of images through a sampled latent, plus a tiny KL to N(0, I) (LDM §3.1)."""
    posterior = vae.encode(images)
    reconstruction = vae.decode(posterior.sample(generator))
    kl = 0.5 * (posterior.mean.square() + posterior.std.square() - 1 - posterior.logvar).sum(dim=(1, 2, 3)).mean()
    return F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images) + kl_weight * kl


def random_crops(images: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """One crop per image at a multiple of 4 pixels, so crops align with the latent grid."""
    n = images.shape[-1]
    offsets = torch.randint(0, (n - size) // 4 + 1, (images.shape[0], 2), generator=generator) * 4
    return torch.stack([im[:, y: y + size, x: x + size] for im, (y, x) in zip(images, offsets.tolist())])


def noised_batch(z0: torch.Tensor, captions: list[str], scheduler, c: TrainConfig, generator: torch.Generator
                 ) -> tuple[list[str], torch.Tensor, torch.Tensor, torch.Tensor]:
    """One training batch: captions dropped to "" at rate c.caption_dropout, random timesteps t, the noise ε
    with its offset, and z_t = sqrt(ᾱ_t)·z0 + sqrt(1-ᾱ_t)·ε."""
    b = z0.shape[0]
    drop = torch.rand(b, generator=generator) < c.caption_dropout
    captions = ["" if d else caption for d, caption in zip(drop.tolist(), captions)]
    t = torch.randint(0, len(scheduler.alphas_cumprod), (b,), generator=generator)
    # offset noise (Guttenberg 2023): a shared shift per channel, the component flat backgrounds are made of
    eps = torch.randn(z0.shape, generator=generator) + c.offset_noise * torch.randn(b, z0.shape[1], 1, 1,
                                                                                      generator=generator)
    return captions, t, eps, scheduler.add_noise(z0, eps, t)


def diffusion_loss(unet: UNetModel, text_encoder: TextEncoder, z0: torch.Tensor, captions: list[str],
                   scheduler, c: TrainConfig, generator: torch.Generator,
                   control: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict] | None = None) -> torch.Tensor:
    """DDPM's simple loss (Ho et al. 2020, eq. 14) on ε, or on v = sqrt(ᾱ)·ε - sqrt(1-ᾱ)·z0 (Salimans & Ho 2022),
    which weights the high-noise steps, where colours and shape are decided, like a loss on z0 itself.
    `control(z_t, t, context)` gives what else the UNet adds (a ControlNet's residuals)."""
    captions, t, eps, z_t = noised_batch(z0, captions, scheduler, c, generator)
    target = eps if c.prediction_type == "epsilon" else scheduler.get_velocity(z0, eps, t)
    context = text_encoder(captions)
    extra = {} if control is None else control(z_t, t, context)
    return F.mse_loss(unet(z_t, t, context, **extra), target)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


@torch.no_grad()
def encode_pool(vae: VAE, c: TrainConfig, scenes: list[Scene] | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Posterior mean and std (N, 4, 16, 16) of pool_size fresh images of `scenes` (default: the seen scenes),
    and their captions."""
    means, stds, captions = [], [], []
    for index in range(c.pool_size // 64):
        images, batch_captions = make_batch(scenes or seen_scenes(), c.seed + 1, index, 64)
        posterior = vae.encode(images)
        means.append(posterior.mean)
        stds.append(posterior.std)
        captions += batch_captions
    return torch.cat(means), torch.cat(stds), captions


def build_components(unet: UNetModel, vae: VAE, text_encoder: TextEncoder, c: TrainConfig) -> Components:
    config = ModelConfig("toy-shapes", unet.config, vae.config, text_encoder.config, c.prediction_type,
                         native_size=64, scheduler=c.scheduler)
    return Components(unet, vae, text_encoder, make_scheduler(config.scheduler_name, **config.scheduler), config)


def save_preview(components: Components, path: Path) -> None:
    images = sample_images(DiffusionModel(components), [parse_caption(p) for p in PREVIEW_CAPTIONS], seeds=[0],
                           sampler="ddim", steps=20, guidance=4.0)
    make_grid(images, columns=len(PREVIEW_CAPTIONS)).save(path)


def plot_losses(log: list[tuple[str, int, float, float]], path: Path) -> None:
    """Loss of each stage against wall time, smoothed over 25 steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    for stage in ("vae", "decoder", "unet"):
        minutes = [t / 60 for name, _, _, t in log if name == stage]
        losses = torch.tensor([loss for name, _, loss, _ in log if name == stage])
        if len(losses) >= 25:
            smooth = losses.unfold(0, 25, 1).mean(dim=1)
            ax.semilogy(minutes[24:], smooth, label=stage)
    ax.set(xlabel="wall time (min)", ylabel="training loss (25-step mean)", title="toy shapes model")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def vae_step(vae: VAE, opt: torch.optim.Optimizer, c: TrainConfig, step: int) -> float:
    """Stage 1: the autoencoder on random crops of fresh images."""
    generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
    images, _ = make_batch(seen_scenes(), c.seed, step, c.vae_batch)
    loss = vae_loss(vae, random_crops(images, c.vae_crop, generator), c.kl_weight, generator)
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def decoder_step(vae: VAE, opt: torch.optim.Optimizer, c: TrainConfig, step: int) -> float:
    """Stage 1b: the decoder alone on whole 64x64 images (as SD's ft-MSE VAE was made); the encoder, hence
    the latents the UNet learns, stay as they are, and the decoder sees the image border crops never showed."""
    generator = torch.Generator().manual_seed(c.seed * 1_000_003 + 250_000 + step)
    images, _ = make_batch(seen_scenes(), c.seed + 2, step, c.decoder_batch)
    with torch.no_grad():
        z = vae.encode(images).sample(generator)
    reconstruction = vae.decode(z)
    loss = F.l1_loss(reconstruction, images) + F.mse_loss(reconstruction, images)
    for group in opt.param_groups:
        group["lr"] = c.decoder_lr * 0.5 * (1 + math.cos(math.pi * step / c.decoder_steps))
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.item()


def pool_latents(means: torch.Tensor, stds: torch.Tensor, batch: int, scaling_factor: float,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` random picks of the encoded pool and their latents z ~ q(z|x), scaled to unit variance."""
    picks = torch.randint(0, len(means), (batch,), generator=generator)
    z0 = (means[picks] + stds[picks] * torch.randn(means[picks].shape, generator=generator)) * scaling_factor
    return picks, z0


def optimise(opt: torch.optim.Optimizer, loss: torch.Tensor, step: int, c: TrainConfig,
             ema_pairs: tuple[tuple[torch.nn.Module, torch.nn.Module], ...]) -> float:
    """One AdamW step at the warmup-cosine learning rate, gradients clipped to norm 1, then each (EMA, model)."""
    for group in opt.param_groups:
        group["lr"] = lr_at(step, c)
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_([p for group in opt.param_groups for p in group["params"]], 1.0)
    opt.step()
    decay = min(c.ema_decay, (1 + step) / (10 + step))
    for ema, model in ema_pairs:
        ema_update(ema, model, decay)
    return loss.item()


def unet_step(unet: UNetModel, text_encoder: TextEncoder, ema: tuple[UNetModel, TextEncoder],
              opt: torch.optim.Optimizer, pool: tuple[torch.Tensor, torch.Tensor, list[str]], scaling_factor: float,
              scheduler, c: TrainConfig, step: int) -> float:
    """Stage 2: one diffusion-loss step on latents z ~ q(z|x) of the pool, scaled to unit variance, then EMA."""
    means, stds, captions = pool
    generator = torch.Generator().manual_seed(c.seed * 1_000_003 + 500_000 + step)
    picks, z0 = pool_latents(means, stds, c.unet_batch, scaling_factor, generator)
    loss = diffusion_loss(unet, text_encoder, z0, [captions[i] for i in picks.tolist()], scheduler, c, generator)
    return optimise(opt, loss, step, c, ((ema[0], unet), (ema[1], text_encoder)))


def train(c: TrainConfig, out: Path, resume: bool = False, minutes: float | None = None,
          pretrained_vae: VAE | None = None) -> Path:
    """Run both stages, writing checkpoints, previews and a loss log under `out`; returns the exported file
    (or the checkpoint, when `minutes` ran out first).

    Args:
        resume: continue from `out/checkpoint.pt` (same data, same noise as an uninterrupted run).
        minutes: stop (after checkpointing) when this much wall time has passed; run again with resume.
        pretrained_vae: an autoencoder trained already (e.g. the bundled model's): stage 1 is skipped.
    """
    out.mkdir(parents=True, exist_ok=True)
    if c.threads:
        torch.set_num_threads(c.threads)
    start = time.time()
    deadline = start + 60 * minutes if minutes else math.inf
    torch.manual_seed(c.seed)
    vae, unet, text_encoder = VAE(TOY_VAE), UNetModel(TOY_UNET), TextEncoder(TOY_TEXT)
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    vae_opt = torch.optim.AdamW(vae.parameters(), lr=c.vae_lr, weight_decay=0.0)
    unet_opt = torch.optim.AdamW([*unet.parameters(), *text_encoder.parameters()], lr=c.unet_lr, weight_decay=0.0)
    decoder_opt = torch.optim.AdamW([*vae.decoder.parameters(), *vae.post_quant_conv.parameters()], lr=c.decoder_lr,
                                    weight_decay=0.0)
    saved_modules = {"vae": vae, "unet": unet, "text": text_encoder, "ema_unet": ema_unet, "ema_text": ema_text,
                     "vae_opt": vae_opt, "decoder_opt": decoder_opt, "unet_opt": unet_opt}
    state = {"vae_step": 0, "decoder_step": 0, "unet_step": 0, "scaling_factor": None, "log": []}
    if pretrained_vae is not None:
        vae.load_state_dict(pretrained_vae.state_dict())
        state.update(vae_step=c.vae_steps, decoder_step=c.decoder_steps, scaling_factor=pretrained_vae.scaling_factor)
    checkpoint = out / "checkpoint.pt"
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=False)
        for key, module in saved_modules.items():
            module.load_state_dict(saved[key])
        state = saved["state"]
        start -= state.get("elapsed", 0.0)

    def save_checkpoint() -> None:
        state["elapsed"] = time.time() - start
        torch.save({**{key: module.state_dict() for key, module in saved_modules.items()}, "state": state,
                    "config": asdict(c)}, checkpoint)

    def run_stage(stage: str, label: str, total: int, one_step: Callable[[int], float],
                  after_step: Callable[[int], None] = lambda step: None) -> bool:
        """Steps state[stage_step] .. total with a progress bar, the loss log and checkpoints; False when the
        wall-time budget ran out (after checkpointing)."""
        key = f"{stage}_step"
        bar = tqdm(range(state[key], total), desc=label, initial=state[key], total=total)
        for step in bar:
            loss = one_step(step)
            state[key] = step + 1
            state["log"].append((stage, step, loss, time.time() - start))
            bar.set_postfix(loss=f"{loss:.4f}")
            after_step(step)
            if (step + 1) % c.checkpoint_every == 0 or time.time() > deadline:
                save_checkpoint()
            if time.time() > deadline:
                return False
        return True

    if not run_stage("vae", "VAE", c.vae_steps, lambda step: vae_step(vae, vae_opt, c, step)):
        return checkpoint
    vae.encoder.requires_grad_(False)
    vae.quant_conv.requires_grad_(False)
    if not run_stage("decoder", "decoder", c.decoder_steps, lambda step: decoder_step(vae, decoder_opt, c, step)):
        return checkpoint
    vae.requires_grad_(False).eval()

    # Stage 2: latents once; latents x scaling_factor have unit variance, as SD's 0.18215 does for SD's VAE.
    pool = encode_pool(vae, c) if state["unet_step"] < c.unet_steps else None
    if state["scaling_factor"] is None:
        state["scaling_factor"] = 1.0 / pool[0].std().item()
    trained_vae, vae = vae, VAE(replace(TOY_VAE, scaling_factor=state["scaling_factor"]))
    vae.load_state_dict(trained_vae.state_dict())
    vae.requires_grad_(False).eval()
    scheduler = make_scheduler("ddpm", **c.scheduler)

    def preview(step: int) -> None:
        if (step + 1) % c.preview_every == 0:
            save_preview(build_components(ema_unet, vae, ema_text, c), out / f"preview_{step + 1:05d}.png")

    if not run_stage("unet", "UNet", c.unet_steps, lambda step: unet_step(
            unet, text_encoder, (ema_unet, ema_text), unet_opt, pool, state["scaling_factor"], scheduler, c, step),
            after_step=preview):
        return checkpoint
    save_checkpoint()
    exported = out / "toy_shapes.safetensors"
    save_single_file(build_components(ema_unet, vae, ema_text, c), exported, dtype=torch.float16)
    plot_losses(state["log"], out / "training_curve.png")
    print(f"trained in {(time.time() - start) / 60:.1f} min; wrote {exported} and {exported.with_suffix('.yaml')}")
    return exported


def parse_recipe(parser: argparse.ArgumentParser, recipe: type,
                 argv: list[str] | None) -> tuple[argparse.Namespace, Any]:
    """Parse argv with one flag per field of a recipe dataclass (--pool-size for pool_size), defaulting to the
    field's default; (the arguments, the recipe they give). Every field is a number or a string."""
    defaults = asdict(recipe())
    for name, value in defaults.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    return args, recipe(**{name: getattr(args, name) for name in defaults})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/toy-train"), help="folder for all outputs")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    parser.add_argument("--minutes", type=float, default=None, help="stop and checkpoint after this wall time")
    args, config = parse_recipe(parser, TrainConfig, argv)
    train(config, args.out, resume=args.resume, minutes=args.minutes)


if __name__ == "__main__":
    main()
