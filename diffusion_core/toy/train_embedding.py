"""Teach the bundled shapes model a new word for something it can already draw: textual inversion, on a CPU.

    python -m diffusion_core.toy.train_embedding --out outputs/sundisc   # or: diffusion-core train-embedding ...

Gal et al. 2022 ("An Image is Worth One Word", arXiv:2208.01618): a pseudo-word S* ("sundisc") gets n new rows
v* of the text encoder's token_embedding, initialised as a coarse descriptor's embedding ("circle", their §4),
and only v* is optimised, with the model's own diffusion loss, every weight frozen (their eq. 2):

    v* = argmin_v E_{z0, c, ε, t} ‖v - v_θ(z_t, t, c_θ("a S* on a {background} background"))‖²

on rendered images of the concept (a yellow circle) on some backgrounds. The other backgrounds are held out, to
ask whether the word composes like the words it stands for. The result is an A1111 .safetensors file
({"emb_params": v*}; A1111 names the word after the file's stem) that `DiffusionModel.load_textual_inversion` reads.
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.utils.parametrize as parametrize
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from ..adapters.textual_inversion import A1111_SAFETENSORS_KEY
from ..models.text_encoder import TextEncoder, bpe_ids
from ..pipeline import DiffusionModel
from ..schedulers import make_scheduler
from .dataset import PALETTE, SHAPES, Scene
from .train import TrainConfig, diffusion_loss, encode_pool, parse_recipe, pool_latents
from .train_lora import accuracy

HELD_OUT_BACKGROUNDS = ("green", "white")  # never shown with the new word in training
MEASURE_SEEDS = tuple(range(8))  # images per prompt when measuring


@dataclass(frozen=True)
class EmbeddingTrainConfig:
    """The recipe; `python -m diffusion_core.toy.train_embedding --help` exposes each field as a flag."""

    token: str = "sundisc"     # the new word S*; the file is <token>.safetensors, as A1111 names words by the stem
    colour: str = "yellow"     # the concept: a shape of this colour ...
    shape: str = "circle"      # ... of a kind the model draws (dataset.SHAPES)
    init_word: str = "circle"  # each of the n vectors starts as this one-token word's embedding
    n_vectors: int = 1         # n: the word reads as this many tokens
    steps: int = 400           # optimiser steps
    batch: int = 16            # latents per step
    lr: float = 2e-2           # peak AdamW learning rate, cosine-decayed to 10% (embedding rows have norm ~8)
    pool_size: int = 512       # images encoded once, a multiple of 64
    seed: int = 0              # seeds the images and the noise
    threads: int = 1           # torch CPU threads; 1 is faster when anything else shares the CPU (0: torch's default)


@dataclass(frozen=True)
class WordScene(Scene):
    """A scene of the concept whose caption names it by the new word: "a sundisc on a blue background"."""

    word: str = ""

    @property
    def caption(self) -> str:
        return f"a {self.word} on a {self.background} background"


def concept_scenes(c: EmbeddingTrainConfig, held_out: bool, word: str | None) -> list[Scene]:
    """The concept on every background but its own colour, the held-out ones or the others, captioned with `word`
    (None: with the plain words, "a yellow circle on a blue background")."""
    backgrounds = [b for b in PALETTE if b != c.colour and (b in HELD_OUT_BACKGROUNDS) == held_out]
    return [Scene(c.colour, c.shape, b) if word is None else WordScene(c.colour, c.shape, b, word) for b in backgrounds]


def check_config(c: EmbeddingTrainConfig) -> None:
    """A ValueError for the first field that cannot work (the token itself is checked by TextEncoder.add_token)."""
    if c.colour not in PALETTE or c.shape not in SHAPES:
        raise ValueError(f"the concept must be a palette colour {list(PALETTE)} and a shape the model draws "
                         f"{list(SHAPES)}, got colour {c.colour!r} and shape {c.shape!r}")
    if len(bpe_ids(c.init_word)) != 1:
        raise ValueError(f"init_word {c.init_word!r} is {len(bpe_ids(c.init_word))} CLIP tokens; it must be one, "
                         f"such as 'circle', whose embedding each new vector starts from")
    if Path(c.token).name != c.token:
        raise ValueError(f"token {c.token!r} cannot be a file's stem, which is where A1111 reads the word from")
    for name in ("n_vectors", "steps", "batch"):
        if getattr(c, name) < 1:
            raise ValueError(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.pool_size < 64 or c.pool_size % 64:
        raise ValueError(f"pool_size must be a positive multiple of 64 (images are encoded 64 at a time), "
                         f"got {c.pool_size}")
    if not c.lr > 0:
        raise ValueError(f"lr must be positive, got {c.lr}")


def initial_vectors(text_encoder: TextEncoder, c: EmbeddingTrainConfig) -> torch.Tensor:
    """n copies of init_word's embedding: (n, width)."""
    return text_encoder.token_embedding.weight[bpe_ids(c.init_word)].detach().repeat(c.n_vectors, 1)


class NewWord(nn.Module):
    """The parametrization E ↦ [E[:-n]; v*] of token_embedding.weight: the vocabulary as it was, then the new
    word's n trainable vectors v* (the frozen E's own last n rows are never read)."""

    def __init__(self, vectors: torch.Tensor):
        super().__init__()
        self.vectors = nn.Parameter(vectors.clone())

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.cat([weight[: -len(self.vectors)], self.vectors])


def learn_word(model: DiffusionModel, c: EmbeddingTrainConfig,
               minutes: float | None = None) -> tuple[torch.Tensor, int]:
    """Add c.token to the frozen model's text encoder and optimise its vectors alone on rendered images of the
    concept; returns v* (n, width), which the encoder keeps as the word's rows, and the steps taken."""
    check_config(c)
    start = time.time()
    torch.manual_seed(c.seed)
    model.unet.requires_grad_(False), model.text_encoder.requires_grad_(False), model.vae.requires_grad_(False)
    model.text_encoder.add_token(c.token, initial_vectors(model.text_encoder, c))
    word = NewWord(model.text_encoder.token_embedding.weight[-c.n_vectors:])
    parametrize.register_parametrization(model.text_encoder.token_embedding, "weight", word)
    recipe = replace(TrainConfig(seed=c.seed), pool_size=c.pool_size, caption_dropout=0.0)  # "" holds no word
    means, stds, captions = encode_pool(model.vae, recipe, concept_scenes(c, held_out=False, word=c.token))
    scheduler = make_scheduler("ddpm", **recipe.scheduler)
    opt = torch.optim.AdamW(word.parameters(), lr=c.lr, weight_decay=0.0)
    bar = tqdm(range(c.steps), desc=f"textual inversion ({c.token})")
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = c.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / c.steps)))
        generator = torch.Generator().manual_seed(c.seed * 1_000_003 + step)
        picks, z0 = pool_latents(means, stds, c.batch, model.vae.scaling_factor, generator)
        loss = diffusion_loss(model.unet, model.text_encoder, z0, [captions[i] for i in picks.tolist()], scheduler,
                              recipe, generator)
        opt.zero_grad()
        loss.backward()
        opt.step()
        bar.set_postfix(loss=f"{loss.item():.4f}")
        if minutes is not None and time.time() - start > 60 * minutes:
            print(f"stopped at step {step + 1} of {c.steps}: the {minutes} min budget ran out")
            break
    parametrize.remove_parametrizations(model.text_encoder.token_embedding, "weight", leave_parametrized=True)
    model.text_encoder.token_embedding.weight.requires_grad_(False)
    return word.vectors.detach().clone(), step + 1


def save_embedding(vectors: torch.Tensor, out: Path, c: EmbeddingTrainConfig, steps: int, command: str) -> Path:
    """v* as A1111's .safetensors, `out/<token>.safetensors` holding {"emb_params": (n, width)}, with the recipe."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{c.token}.safetensors"
    save_file({A1111_SAFETENSORS_KEY: vectors.contiguous()}, path, metadata={
        "diffusion_core_train_embedding": str(asdict(c)), "command": command, "init_word": c.init_word,
        "steps": str(steps)})
    return path


def train_embedding(c: EmbeddingTrainConfig, out: Path, minutes: float | None = None, command: str = "") -> Path:
    """Learn the word on the bundled model and write `out/<token>.safetensors`; `minutes` stops early, saving."""
    if c.threads:
        torch.set_num_threads(c.threads)
    start = time.time()
    vectors, steps = learn_word(DiffusionModel(), c, minutes)
    path = save_embedding(vectors, out, c, steps, command)
    print(f"trained in {(time.time() - start) / 60:.1f} min: {path}")
    return path


def measure(path: Path, c: EmbeddingTrainConfig) -> str:
    """A markdown table of the share of images the detector reads as the concept: "a S* on a ... background" with
    S* unknown (CLIP's pieces of it), initialised as init_word, and trained, and the plain words' prompts, on the
    training backgrounds and the held-out ones."""
    unknown, initialised, trained = DiffusionModel(), DiffusionModel(), DiffusionModel()
    initialised.text_encoder.add_token(c.token, initial_vectors(initialised.text_encoder, c))
    trained.load_textual_inversion(path)
    columns = {"word unknown": (unknown, c.token), f"initialised ({c.init_word!r})": (initialised, c.token),
               "trained": (trained, c.token), f"plain words ('a {c.colour} {c.shape}')": (unknown, None)}
    lines = [f"| backgrounds | {' | '.join(columns)} |", "|---" * (len(columns) + 1) + "|"]
    for held_out in (False, True):
        scenes = concept_scenes(c, held_out, None)
        cells = [f"{accuracy(model, concept_scenes(c, held_out, word), MEASURE_SEEDS):.0%}"
                 for model, word in columns.values()]
        name = f"{'held out' if held_out else 'seen'}: {', '.join(s.background for s in scenes)}"
        lines.append(f"| {name} ({len(scenes) * len(MEASURE_SEEDS)} images) | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description="Teach the bundled shapes model a new word with textual inversion.")
    parser.add_argument("--out", type=Path, default=Path("outputs/sundisc"))
    parser.add_argument("--minutes", type=float, default=10.0, help="wall-time budget (default: 10)")
    parser.add_argument("--no-measure", action="store_true", help="skip measuring accuracy before and after")
    args, config = parse_recipe(parser, EmbeddingTrainConfig, argv)
    if (args.out / f"{config.token}.safetensors").exists():
        parser.error(f"{args.out / f'{config.token}.safetensors'} exists and is never overwritten; pass another --out")
    command = shlex.join(["python", "-m", "diffusion_core.toy.train_embedding", *argv])
    path = train_embedding(config, args.out, args.minutes, command)
    if not args.no_measure:
        print(measure(path, config))


if __name__ == "__main__":
    main()
