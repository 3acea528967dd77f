"""`diffusion-core batch`: a PNG for each line of a JSON-lines file of GenerationConfigs, resumable, locally or on Ray.

Line n of the file (1-based, blank lines counted but skipped) becomes `{n:05d}-{seed}.png`, so editing one line
renames no other. A line whose PNG exists is skipped, which makes an interrupted batch resumable; seeds must be
fixed for that. Every image draws from its own seeded generator, so where it is made does not change a pixel.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ..generation import GeneratedImage, GenerationConfig
from ..pipeline import DTYPES, DiffusionModel

FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))

EXAMPLES = """\
examples:
  # prompts.jsonl, one GenerationConfig per line (fields as in Python; a missing seed is 0):
  #   {"prompt": "a red circle on a blue background", "seed": 1, "num_inference_steps": 20}
  #   {"prompt": "a green square", "negative_prompt": "blurry", "seed": 2, "sampler": "euler_a"}
  diffusion-core batch prompts.jsonl --out renders

  # the same on Ray Data: 4 workers of 2 CPUs each (a cluster through RAY_ADDRESS, else a local Ray)
  diffusion-core batch prompts.jsonl --out renders --checkpoint sd15.safetensors --ray --workers 4 \\
      --cpus-per-worker 2

Line n of the file is written to <out>/<n:05d>-<seed>.png (blank lines count), with its parameters in the PNG.
Run it again after a crash or after adding lines: lines whose PNG exists are skipped, no file is overwritten.
With --ray on a cluster, --out must be a folder every node sees.
"""


@dataclass(frozen=True)
class BatchLine:
    """One line of a prompts file and the config it holds."""

    number: int               # 1-based line number in the file: names the output
    config: GenerationConfig

    @property
    def name(self) -> str:
        return f"{self.number:05d}-{self.config.seed}.png"


def read_prompts(path: str | Path) -> list[BatchLine]:
    """Every non-blank line of a JSON-lines file as a GenerationConfig; any bad line is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such file")
    lines = []
    with path.open(encoding="utf-8-sig") as file:  # -sig: a BOM some editors write is not part of line 1
        for number, text in enumerate(file, start=1):
            if text.strip():
                lines.append(BatchLine(number, _parse_line(text, f"{path}:{number}")))
    if not lines:
        raise ValueError(f"{path}: no prompts (one JSON object per line, e.g. {{\"prompt\": \"a red circle\"}})")
    return lines


def _parse_line(text: str, where: str) -> GenerationConfig:
    try:
        values = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: not valid JSON ({e.msg}, column {e.colno})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a JSON object of GenerationConfig fields, got {type(values).__name__}")
    unknown = [key for key in values if key not in FIELDS]
    if unknown:
        raise ValueError(f"{where}: unknown field {', '.join(map(repr, unknown))}; GenerationConfig's fields are "
                         f"{', '.join(FIELDS)}")
    if "prompt" not in values:
        raise ValueError(f"{where}: no \"prompt\"")
    if "seed" in values and values["seed"] is None:  # a random seed could not be redone when the batch resumes
        raise ValueError(f"{where}: seed null draws a random seed; a batch needs fixed seeds (leave it out for 0)")
    try:
        return GenerationConfig(**values)
    except (ValueError, TypeError) as e:  # TypeError: a comparison on a wrongly typed value, e.g. a string scale
        raise ValueError(f"{where}: {e}") from None


def write_png(result: GeneratedImage, path: Path) -> Path:
    """Save to a temporary file beside `path`, then hard-link it to `path`: the link fails if `path` exists, and a
    crash leaves no half-written PNG under a final name."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")  # hidden, and no *.png
    try:
        result.save(temporary)
        os.link(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return path


def load_model(checkpoint: str | Path | None, device: str, dtype: torch.dtype) -> DiffusionModel:
    """The checkpoint, or the bundled shapes model when None."""
    if checkpoint is None:
        return DiffusionModel(device=device, dtype=dtype)
    return DiffusionModel.from_pretrained(checkpoint, device=device, dtype=dtype)


def generate_batch_file(prompts_path: str | Path, out_dir: str | Path, *, checkpoint: str | Path | None = None,
                        device: str = "cpu", dtype: torch.dtype = torch.float32, ray: bool = False,
                        workers: int = 1, cpus_per_worker: int = 1, progress: bool = True) -> list[Path]:
    """Generate the image of every line of `prompts_path` that has no PNG in `out_dir` yet; return those written.

    Args:
        checkpoint: a diffusers folder or SD file for DiffusionModel.from_pretrained; None: the bundled model.
        ray: on Ray Data, `workers` actors of `cpus_per_worker` CPUs (and torch threads) each, each loading the
            model once; Ray is started with its defaults unless already initialised (RAY_ADDRESS: a cluster).
        progress: a progress bar over the lines.
    """
    lines = read_prompts(prompts_path)  # every line checked before anything is generated
    if workers < 1 or cpus_per_worker < 1:
        raise ValueError(f"workers and cpus_per_worker must be at least 1, got {workers} and {cpus_per_worker}")
    if checkpoint is not None and not Path(checkpoint).exists():
        raise FileNotFoundError(f"checkpoint {checkpoint}: no such file or folder")
    out_dir = Path(out_dir).resolve()  # Ray workers need not share the driver's working directory
    out_dir.mkdir(parents=True, exist_ok=True)
    pending = [line for line in lines if not (out_dir / line.name).exists()]
    if len(pending) < len(lines):
        print(f"skipped {len(lines) - len(pending)} of {len(lines)} lines: their PNG is in {out_dir}",
              file=sys.stderr)
    if not pending:
        return []
    if ray:
        return _generate_on_ray(pending, str(prompts_path), out_dir, (checkpoint, device, dtype), workers,
                                cpus_per_worker, progress)
    model = load_model(checkpoint, device, dtype)
    return [make_image(model, line, out_dir, str(prompts_path))
            for line in tqdm(pending, disable=not progress, unit="image")]


def make_image(model: DiffusionModel, line: BatchLine, out_dir: Path, prompts: str) -> Path:
    """Generate one line's image and write it; what only the model refuses (an SDXL field on SD 1.x, too large a
    clip_skip) names the line too."""
    try:
        result = model.generate(line.config, progress=False)
    except ValueError as e:
        raise ValueError(f"{prompts}:{line.number}: {e}") from None
    return write_png(result, out_dir / line.name)


class _RayGenerator:
    """A Ray Data actor: loads the model once, then generates and writes the lines of each batch."""

    def __init__(self, prompts: str, out_dir: Path, model_args: tuple, threads: int):
        # Ray sets OMP_NUM_THREADS to num_cpus only where the driver's environment has none; set_num_threads
        # also pins MKL's thread count, which slows its small vector-math calls, so only when it changes anything
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        self.model = load_model(*model_args)
        self.prompts, self.out_dir = prompts, out_dir

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        paths, errors = [], []
        for number, config in zip(batch["line"], batch["config"]):
            line = BatchLine(int(number), GenerationConfig.from_dict(json.loads(config)))
            try:
                paths.append(str(make_image(self.model, line, self.out_dir, self.prompts)))
                errors.append("")
            except ValueError as e:  # Ray would turn it into a UserCodeException that keeps only a traceback
                paths.append("")
                errors.append(str(e))
        return {"path": np.array(paths), "error": np.array(errors)}


def _generate_on_ray(pending: list[BatchLine], prompts: str, out_dir: Path, model_args: tuple, workers: int,
                     cpus_per_worker: int, progress: bool) -> list[Path]:
    try:
        import ray
        import ray.data
    except ImportError:
        raise ImportError("--ray needs Ray Data: pip install 'diffusion-core[ray]'") from None
    if not ray.is_initialized():
        ray.init()
    # configs travel as JSON: Arrow would turn tuples into lists and refuse seeds past 2**63
    items = [{"line": line.number, "config": json.dumps(line.config.to_dict())} for line in pending]
    # a block per line, so that no line waits in a busy worker's block while another worker idles
    dataset = ray.data.from_items(items, override_num_blocks=len(items))
    dataset = dataset.map_batches(_RayGenerator, fn_constructor_args=(prompts, out_dir, model_args, cpus_per_worker),
                                  compute=ray.data.ActorPoolStrategy(size=workers), batch_size=1,
                                  num_cpus=cpus_per_worker)
    dataset.context.enable_progress_bars = False  # ours below counts the same lines
    written = []
    for row in tqdm(dataset.iter_rows(), total=len(items), disable=not progress, unit="image"):
        if row["error"]:
            raise ValueError(row["error"])  # stops the dataset; the images written so far stay, as locally
        written.append(Path(row["path"]))
    return sorted(written)  # in line order, as the zero-padded names sort


def add_batch_parser(commands: Any) -> argparse.ArgumentParser:
    """Add the `batch` command to an argparse subparsers object."""
    help_text = "one image per line of a JSON-lines file of generation settings, resumable, optionally on Ray"
    command = commands.add_parser("batch", help=help_text, description=help_text, epilog=EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("prompts", type=Path, metavar="PROMPTS.jsonl", help="one JSON object of GenerationConfig "
                         "fields per line (prompt, negative_prompt, width, height, num_inference_steps, "
                         "guidance_scale, seed, sampler, ...)")
    command.add_argument("--out", type=Path, required=True, help="output folder (created if missing)")
    model = command.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, help="a diffusers folder or an SD .safetensors / .ckpt file "
                       "(default: the bundled shapes model)")
    model.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), default="float32", help="default: float32")
    ray = command.add_argument_group("Ray")
    ray.add_argument("--ray", action="store_true", help="run on Ray Data (needs the [ray] extra)")
    ray.add_argument("--workers", type=int, default=1, help="with --ray: model copies generating at once "
                     "(default: 1)")
    ray.add_argument("--cpus-per-worker", type=int, default=1, help="with --ray: CPUs (and torch threads) per "
                     "worker (default: 1)")
    command.add_argument("--quiet", action="store_true", help="no progress bar")
    return command


def run_batch(args: argparse.Namespace) -> int:
    """The `batch` command on parsed arguments; bad input raises ValueError / FileNotFoundError / ImportError."""
    if not args.ray and (args.workers != 1 or args.cpus_per_worker != 1):
        raise ValueError("--workers and --cpus-per-worker apply to --ray")
    written = generate_batch_file(args.prompts, args.out, checkpoint=args.checkpoint, device=args.device,
                                  dtype=DTYPES[args.dtype], ray=args.ray, workers=args.workers,
                                  cpus_per_worker=args.cpus_per_worker, progress=not args.quiet)
    print(f"{len(written)} images written to {args.out}")
    return 0
