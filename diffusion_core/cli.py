"""The `diffusion-core` command: generate, img2img and inpaint from the shell, each PNG carrying its parameters."""
from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from . import preprocess
from .adapters.lora import file_sha256, path_sha256
from .control import ControlInput
from .generation import GeneratedImage, GenerationConfig, read_png_parameters
from .pipeline import DTYPES, QUALITY_PRESETS, DiffusionModel, device_and_dtype
from .schedulers import SamplerType
from .serve.batch import add_batch_parser, run_batch
from .serve.command import add_serve_parser, run_serve

EXAMPLES = """\
examples:
  # the bundled shapes model, no checkpoint needed (CPU, a few seconds)
  diffusion-core generate "a red circle on a blue background"

  # an SD 1.5 file, 4 images with seeds 7, 8, 9, 10, Euler ancestral, 30 steps, two at a time
  diffusion-core generate "a lighthouse at dusk, oil painting" --checkpoint v1-5-pruned-emaonly.safetensors \\
      --negative "blurry" --sampler euler_a --steps 30 --cfg 7 --seed 7 --n 4 --batch-size 2 --out renders

  # SD 2.1 768-v on a GPU in fp16 (the file cannot tell v from ε: say so)
  diffusion-core generate "a fox in the snow" --checkpoint v2-1_768-ema-pruned.safetensors \\
      --prediction-type v_prediction --width 768 --height 768 --device cuda --dtype float16

  # redo an earlier image exactly (its PNG carries every parameter), here with 10 more steps
  diffusion-core generate --from renders/00002-9.png --checkpoint v1-5-pruned-emaonly.safetensors --steps 40

  # image-to-image: keep the composition, change the style (strength 0 = keep, 1 = ignore the image)
  diffusion-core img2img "a watercolour of a cat" --image cat.png --strength 0.6 --checkpoint sd15.safetensors

  # inpainting: repaint where the mask is white
  diffusion-core inpaint "a vase of tulips" --image room.png --mask mask.png --checkpoint sd15-inpainting.ckpt

  # SDXL with its refiner taking over for the last 20% of the steps, a second prompt for OpenCLIP bigG,
  # and the micro-conditioning of an "original" 2048x1536 image, uncropped
  diffusion-core generate "a lighthouse at dusk" --prompt-2 "oil painting, thick brush strokes" \
      --checkpoint sd_xl_base_1.0.safetensors --refiner sd_xl_refiner_1.0.safetensors --refiner-switch-at 0.8 \
      --original-size 2048 1536 --crop 0 0 --device cuda

  # two LoRAs, a style at 0.8 and a detail LoRA subtracted at -0.5 (kohya, diffusers, PEFT, LyCORIS files)
  diffusion-core generate "a lighthouse at dusk" --checkpoint sd15.safetensors \\
      --lora watercolor_style.safetensors:0.8 --lora detail_tweaker.safetensors:-0.5

  # ControlNet: Canny edges of a photo steer the composition (at 0.8, for the first 80% of the steps);
  # several --control stack; a T2I-Adapter file works the same way
  diffusion-core generate "a lighthouse at dusk" --checkpoint sd15.safetensors \
      --control canny=control_v11p_sd15_canny.pth:photo.jpg:0.8:0:0.8

  # SDXL-Turbo (or SD-Turbo): Euler ancestral on trailing timesteps, 1 step, no guidance, 512x512
  diffusion-core generate "a cinematic photo of a fox" --checkpoint sd_xl_turbo_1.0_fp16.safetensors --turbo

Images are never overwritten: each goes to the first free name <out>/<number>-<seed>.png, and its PNG text
chunk "diffusion-core" holds the parameters as JSON (GenerationConfig.from_png reads it back).
"""

PREPROCESSORS = ("canny", "shuffle", "inpaint")  # preprocess.py's weight-free ones; canny at cv2's usual 100, 200
# the bundled shapes model's own tools: python -m diffusion_core.toy.train / .evaluate
TOY_COMMANDS = {"train": "train the bundled shapes model from scratch (python -m diffusion_core.toy.train)",
                "evaluate": "measure its prompt accuracy (python -m diffusion_core.toy.evaluate)",
                "train-lora": "teach it a new shape with a LoRA (python -m diffusion_core.toy.train_lora)",
                "train-embedding": "teach it a new word for something it can draw "
                                   "(python -m diffusion_core.toy.train_embedding)",
                "train-controlnet": "teach it to put its shape where a blob says, with a ControlNet "
                                    "(python -m diffusion_core.toy.train_controlnet)"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusion-core", description="Stable Diffusion from first principles: "
                                     "text-to-image, image-to-image and inpainting, equal to diffusers pixel "
                                     "for pixel.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("generate", "text to image"), ("img2img", "image to image (SDEdit)"),
                            ("inpaint", "repaint the white part of a mask")):
        command = commands.add_parser(name, help=help_text, description=help_text, epilog=EXAMPLES,
                                      formatter_class=argparse.RawDescriptionHelpFormatter)
        _add_common(command, name)
        if name != "generate":
            command.add_argument("--image", type=Path, required=True, help="the input image")
            command.add_argument("--strength", type=float, help="how far to noise the image, in (0, 1] (default: "
                                 "diffusers' for the model: img2img 0.75, SDXL 0.3; inpaint 1.0, SDXL 0.9999)")
        if name == "inpaint":
            command.add_argument("--mask", type=Path, required=True, help="white = repaint, black = keep")
    _add_compare(commands)
    add_serve_parser(commands)
    add_batch_parser(commands)
    for name, help_text in TOY_COMMANDS.items():  # their own flags: `diffusion-core train --help`
        command = commands.add_parser(name, help=help_text, add_help=False)
        command.add_argument("toy_args", nargs=argparse.REMAINDER)
    return parser


COMPARE_EXAMPLES = """\
examples:
  # prove parity on your own file: every module of the text encoder(s), the VAE and the UNet, in fp32
  diffusion-core compare v1-5-pruned-emaonly.safetensors --out sd15_parity.csv

  # float64 shows faults too small for fp32's bar (a GroupNorm eps of 1e-5 for 1e-6 moves outputs by ~1e-5)
  diffusion-core compare my_unet_folder --dtype float64

  # fp16 on a GPU (the tolerance follows the dtype), and whole images for a seed and sampler
  diffusion-core compare sd_xl_base_1.0.safetensors --device cuda --dtype float16 --pipeline --sampler euler_a

Exit status: 0 when every module agrees within the tolerance; 1 when a module parts (named in the verdict) or,
with --pipeline in fp32, an image pixel differs by more than 1/255; 2 for bad input.
"""


def _add_compare(commands: Any) -> None:
    help_text = "compare a checkpoint module by module with diffusers (needs the [compare] extra)"
    command = commands.add_parser("compare", help=help_text, description=help_text, epilog=COMPARE_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    command.add_argument("checkpoint", type=Path, help="a diffusers folder or an SD .safetensors / .ckpt file")
    command.add_argument("--config", type=Path, help="the LDM yaml of a single-file checkpoint (optional)")
    command.add_argument("--prompt", default="a photograph of an astronaut riding a horse",
                         help="what the text encoders read (default: %(default)r)")
    command.add_argument("--timestep", type=float, default=500.0, help="the UNet's t (default: %(default)s)")
    command.add_argument("--seed", type=int, default=0, help="seed of the random image, latents and context")
    command.add_argument("--size", type=int, default=512, help="image side in pixels, a multiple of 8 (default: 512)")
    command.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps (default: cpu)")
    command.add_argument("--dtype", choices=[*DTYPES, "float64"], default="float32", help="default: float32")
    command.add_argument("--tolerance", type=float, help="max relative error per module (default: by dtype, "
                         "fp64 1e-9, fp32 1e-4, fp16 1e-2, bf16 5e-2)")
    command.add_argument("--worst", type=int, default=10, help="rows shown per network besides the first parted "
                         "one (default: 10)")
    command.add_argument("--out", type=Path, help="write every row of every network to this CSV file")
    command.add_argument("--stored-gb", type=float, default=2.0, help="reference activations held at once; past "
                         "this the comparison runs in windows, both networks once per window (default: 2)")
    command.add_argument("--pipeline", action="store_true", help="also compare whole images for --seed")
    command.add_argument("--sampler", choices=[s.value for s in SamplerType], help="for --pipeline (default: the "
                         "checkpoint's scheduler)")
    command.add_argument("--steps", type=int, default=20, help="for --pipeline (default: 20)")


def _compare(args: argparse.Namespace) -> int:
    from .compare import compare_checkpoint, compare_images
    from .reference import require_diffusers

    require_diffusers()
    if args.size < 8 or args.size % 8:
        raise ValueError(f"--size must be a positive multiple of 8, got {args.size}")
    dtype = torch.float64 if args.dtype == "float64" else DTYPES[args.dtype]
    common = dict(original_config=args.config, prompt=args.prompt, seed=args.seed, size=args.size,
                  device=args.device, dtype=dtype)
    if args.stored_gb <= 0:
        raise ValueError(f"--stored-gb must be positive, got {args.stored_gb}")
    results = compare_checkpoint(args.checkpoint, timestep=args.timestep, tolerance=args.tolerance,
                                 stored_bytes=int(args.stored_gb * 2 ** 30), **common)
    for name, comparison in results.items():
        print(f"\n== {name} ==\n{comparison.table(args.worst)}")
    if args.out is not None:
        _write_comparisons(results, args.out)
        print(f"\nevery row: {args.out}")
    passed = all(c.passed for c in results.values())
    if args.pipeline:
        difference = compare_images(args.checkpoint, sampler=args.sampler, steps=args.steps, **common)
        exact = dtype in (torch.float32, torch.float64)  # half precision has no pixel bar: its figure is reported
        print(f"\n== image ==\nlargest pixel difference {difference:.0f}/255" + (" (bar 1/255)" if exact else ""))
        passed = passed and (difference <= 1 or not exact)
    print("\nverdict: " + ("EQUAL" if passed else "PARTS"))
    return 0 if passed else 1


def _write_comparisons(results: dict[str, Any], path: Path) -> None:
    """One CSV for all networks: each network's rows, its name in the first column."""
    import csv
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        for n, (name, comparison) in enumerate(results.items()):
            header, *rows = comparison.csv_rows()
            writer.writerows([["network", *header]] * (n == 0) + [[name, *row] for row in rows])


def _add_common(command: argparse.ArgumentParser, name: str) -> None:
    """Flags shared by the three commands; generation flags default to None = the model's (or --from's) value."""
    command.add_argument("prompt", nargs="?", help="what the image should show")
    model = command.add_argument_group("model")
    model.add_argument("--checkpoint", type=Path, help="a diffusers folder or an SD .safetensors / .ckpt file "
                       "(default: the bundled shapes model)")
    model.add_argument("--config", type=Path, help="the LDM yaml of a single-file checkpoint (optional)")
    model.add_argument("--prediction-type", choices=["epsilon", "v_prediction"],
                       help="override what the UNet predicts (SD 2.x files cannot always tell)")
    model.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    model.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on cuda, float32 elsewhere")
    model.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                       help="merge a LoRA / LyCORIS file at a strength (default 1); repeat to stack several")
    model.add_argument("--embedding", action="append", default=[], metavar="FILE",
                       help="load a textual-inversion embedding; prompts use it by the file's stem (A1111) or its "
                       "key (diffusers); repeat for several")
    model.add_argument("--control", action="append", default=[], metavar="[PRE=]FILE:IMAGE[:SCALE[:START:END]]",
                       help="steer with a ControlNet or T2I-Adapter FILE reading IMAGE, optionally preprocessed "
                       f"first (PRE: {', '.join(PREPROCESSORS)}; inpaint takes --mask too), at SCALE (default: "
                       "diffusers' for the command) over the share START..END of the steps; repeat to stack")
    model.add_argument("--guess-mode", action=argparse.BooleanOptionalAction, default=None,
                       help="ControlNets see the conditional half of the guided batch only (default: off, or as "
                       "the --from image)")
    model.add_argument("--turbo", action="store_true", help="an SD-Turbo / SDXL-Turbo checkpoint: Euler ancestral, "
                       "trailing timesteps, 1 step, guidance 0, 512 px")
    sdxl = command.add_argument_group("SDXL")
    sdxl.add_argument("--prompt-2", help="the prompt for the second text encoder, OpenCLIP bigG (default: the prompt)")
    sdxl.add_argument("--negative-2", help="the negative prompt for bigG (default: the negative prompt)")
    sdxl.add_argument("--original-size", type=int, nargs=2, metavar=("W", "H"),
                      help="micro-conditioning: the size of the 'original' image (default: the output size)")
    sdxl.add_argument("--crop", type=int, nargs=2, metavar=("X", "Y"),
                      help="micro-conditioning: the crop's left and top (default: 0 0, uncropped)")
    sdxl.add_argument("--target-size", type=int, nargs=2, metavar=("W", "H"), help="micro-conditioning: the size "
                      "the image is meant for (default: the output size)")
    sdxl.add_argument("--aesthetic-score", type=float, help="the refiner's aesthetic score (default: 6.0)")
    if name == "generate":  # the ensemble of experts starts from noise
        sdxl.add_argument("--refiner", type=Path, help="an SDXL refiner that takes over the last steps")
        sdxl.add_argument("--refiner-switch-at", type=float, help="the share of the schedule the base denoises "
                          "(default: 0.8)")
    sampling = command.add_argument_group("sampling")
    sampling.add_argument("--from", dest="from_png", type=Path, metavar="PNG",
                          help="start from the parameters stored in a PNG this tool wrote")
    sampling.add_argument("--negative", help="negative prompt")
    sampling.add_argument("--steps", type=int, help="denoising steps (default: the model's, SD: 50)")
    sampling.add_argument("--cfg", type=float, help="classifier-free guidance scale (default: the model's, SD: 7.5)")
    sampling.add_argument("--rescale", type=float, help="guidance rescale φ in [0, 1] (default: 0)")
    sampling.add_argument("--seed", type=int, help="seed of the first image; image i uses seed + i (default: 0)")
    sampling.add_argument("--sampler", choices=[s.value for s in SamplerType],
                          help="default: the checkpoint's own scheduler")
    sampling.add_argument("--clip-skip", type=int, metavar="K", help="read the text encoder K blocks before its "
                          "usual one (diffusers' meaning; A1111's 'Clip skip 2' is --clip-skip 1)")
    sampling.add_argument("--prompt-weighting", action=argparse.BooleanOptionalAction, default=None,
                          help="read prompts in A1111's syntax: (word:1.3), [word], BREAK, [from:to:when], [a|b], "
                          "no 77-token limit (default: literal text, as diffusers; or as the --from image)")
    sampling.add_argument("--quality", choices=list(QUALITY_PRESETS),
                          help="sampler and steps for a speed/quality trade-off (explicit flags win)")
    sampling.add_argument("--width", type=int, help="pixels (default: the model's native size)")
    sampling.add_argument("--height", type=int, help="pixels (default: the model's native size)")
    output = command.add_argument_group("output")
    output.add_argument("--n", type=int, default=1, help="number of images (default: 1)")
    output.add_argument("--batch-size", type=int, default=1, help="images per batch for generate (default: 1)")
    output.add_argument("--out", type=Path, default=Path("outputs"), help="output folder (default: outputs)")
    output.add_argument("--quiet", action="store_true", help="no progress bars")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command in TOY_COMMANDS:  # every flag is theirs
        module = args.command.replace("-", "_")
        importlib.import_module(f".toy.{module}", __package__).main(unknown + args.toy_args)
        return 0
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    try:
        if args.command in ("serve", "batch"):
            return run_serve(args) if args.command == "serve" else run_batch(args)
        return _compare(args) if args.command == "compare" else _run(args)
    except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
        parser.exit(2, f"diffusion-core {args.command}: error: {e}\n")


def _run(args: argparse.Namespace) -> int:
    if args.n < 1 or args.batch_size < 1:
        raise ValueError(f"--n and --batch-size must be at least 1, got {args.n} and {args.batch_size}")
    images = _open_images(args)  # before loading the model: a wrong path fails fast
    refined = _refiner_settings(args)  # from the flags, or the PNG of --from
    model = _load_model(args)
    _load_loras(model, args)
    _load_embeddings(model, args)
    refiner = _load_model(args, refined[0]) if refined else None
    controls, sources = _load_controls(model, args, images)
    base = _base_config(args, model)
    configs = [GenerationConfig.from_dict({**base.to_dict(), "seed": base.seed + i}) for i in range(args.n)]
    args.out.mkdir(parents=True, exist_ok=True)
    for result in _generate(model, args, configs, images, refiner, refined[1] if refined else None, controls):
        result.controls = [{**record, **source} for record, source in zip(result.controls, sources)]
        path = save_without_overwriting(result, args.out)
        print(f"{path}  (seed {result.seed}, {result.generation_time:.1f} s)")
    return 0


def _open_images(args: argparse.Namespace) -> dict[str, Image.Image]:
    images = {}
    for name in ("image", "mask"):
        path = getattr(args, name, None)
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"--{name} {path}: no such file")
            images[name] = Image.open(path)
    return images


def _load_model(args: argparse.Namespace, checkpoint: Path | None = None) -> DiffusionModel:
    """--checkpoint (or the bundled model), or, given `checkpoint`, the refiner, on the same device and dtype."""
    device, dtype = device_and_dtype(args.device, args.dtype)
    if checkpoint is not None:
        return DiffusionModel.from_pretrained(checkpoint, device=device, dtype=dtype)
    if args.checkpoint is None:
        if args.config is not None or args.prediction_type is not None or args.turbo:
            raise ValueError("--config, --prediction-type and --turbo apply to --checkpoint")
        return DiffusionModel(device=device, dtype=dtype)
    return DiffusionModel.from_pretrained(args.checkpoint, original_config=args.config, device=device, dtype=dtype,
                                          prediction_type=args.prediction_type, turbo=args.turbo)


def lora_argument(value: str) -> tuple[Path, float]:
    """FILE[:SCALE] -> (file, scale); the scale is whatever follows the last ":" when it is a number."""
    path, _, scale = value.rpartition(":")
    try:
        return (Path(path), float(scale)) if path else (Path(value), 1.0)
    except ValueError:
        return Path(value), 1.0  # a ":" in the path itself (C:\...), no scale


def _load_loras(model: DiffusionModel, args: argparse.Namespace) -> None:
    """Each --lora merged into the model; with --from, every LoRA its PNG records must be given again."""
    for value in args.lora:
        path, scale = lora_argument(value)
        report = model.load_lora(path, scale)
        if not args.quiet:
            print(report, file=sys.stderr)
    recorded = read_png_parameters(args.from_png).get("loras", []) if args.from_png else []
    given = {(r.sha256, r.scale) for r in model.loras.reports}
    missing = [lora for lora in recorded if (lora["sha256"], lora["scale"]) not in given]
    if missing:
        wanted = ", ".join(f"{m['file']} (sha256 {m['sha256'][:12]}) at scale {m['scale']:g}" for m in missing)
        raise ValueError(f"{args.from_png} was made with LoRA {wanted}: pass --lora FILE:SCALE for each to redo it")


def _load_embeddings(model: DiffusionModel, args: argparse.Namespace) -> None:
    """Each --embedding added to the model; with --from, every embedding its PNG records must be given again."""
    for path in args.embedding:
        token = model.load_textual_inversion(path)
        if not args.quiet:
            print(f"embedding {path}: prompts use it as {token!r}", file=sys.stderr)
    recorded = read_png_parameters(args.from_png).get("embeddings", []) if args.from_png else []
    given = {(e["token"], e["sha256"]) for e in model.embeddings.values()}
    missing = [e for e in recorded if (e["token"], e["sha256"]) not in given]
    if missing:
        wanted = ", ".join(f"{e['file']} (sha256 {e['sha256'][:12]}) as {e['token']!r}" for e in missing)
        raise ValueError(f"{args.from_png} was made with embedding {wanted}: pass --embedding FILE for each to redo it")


@dataclass(frozen=True)
class ControlArgument:
    """One --control: [PRE=]FILE:IMAGE[:SCALE[:START:END]]."""

    file: Path
    image: Path
    preprocess: str | None = None
    scale: float | None = None
    start: float = 0.0
    end: float = 1.0


def control_argument(value: str) -> ControlArgument:
    """Parse a --control value; its trailing numbers are SCALE, or SCALE:START:END."""
    parts = value.split(":")
    numbers: list[float] = []
    while len(parts) > 2 and len(numbers) < 3 and _is_number(parts[-1]):
        numbers.insert(0, float(parts.pop()))
    if len(parts) != 2 or len(numbers) == 2 or not all(parts):
        raise ValueError(f"--control {value!r}: expected [PRE=]FILE:IMAGE[:SCALE[:START:END]], e.g. "
                         f"canny=control_v11p_sd15_canny.pth:photo.png:0.8:0:0.8")
    model, image = parts
    preprocess, _, file = model.rpartition("=") if "=" in model else (None, "", model)
    if preprocess is not None and preprocess not in PREPROCESSORS:
        raise ValueError(f"--control {value!r}: unknown preprocessor {preprocess!r}; choose one of {PREPROCESSORS}")
    window = dict(zip(("start", "end"), numbers[1:]))
    return ControlArgument(Path(file), Path(image), preprocess, numbers[0] if numbers else None, **window)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _load_controls(model: DiffusionModel, args: argparse.Namespace, images: dict[str, Image.Image]
                   ) -> tuple[list[ControlInput], list[dict[str, Any]]]:
    """Each --control loaded with its (preprocessed) image, and what the PNG records of its files; with --from,
    every control its PNG records must be given again."""
    from .checkpoints.controlnet import load_control_model

    controls, sources = [], []
    for value in args.control:
        spec = control_argument(value)
        if not spec.image.is_file():
            raise FileNotFoundError(f"--control {value!r}: no image {spec.image}")
        if spec.preprocess == "inpaint" and "mask" not in images:
            raise ValueError("--control inpaint=... takes the mask of the inpaint command's --mask")
        image = _preprocessed(Image.open(spec.image), spec.preprocess, images.get("mask"))
        control_model = load_control_model(spec.file, model.device, model.dtype)
        controls.append(ControlInput(control_model, image, spec.scale, spec.start, spec.end))
        sources.append({"file": spec.file.name, "sha256": path_sha256(spec.file), "image": spec.image.name,
                        "image_sha256": file_sha256(spec.image), "preprocess": spec.preprocess})
    if args.from_png:
        _check_redone(read_png_parameters(args.from_png).get("controls", []), controls, sources, args.from_png)
    return controls, sources


def _preprocessed(image: Image.Image, name: str | None, mask: Image.Image | None) -> Image.Image | torch.Tensor:
    """The control image after --control's PRE (preprocess.py), or as it is."""
    if name == "canny":
        return preprocess.canny(image)
    if name == "shuffle":
        return preprocess.shuffle(image)
    if name == "inpaint":
        return preprocess.inpaint_condition(image, mask)
    return image


def _check_redone(recorded: list[dict[str, Any]], controls: list[ControlInput], sources: list[dict[str, Any]],
                  png: Path) -> None:
    """--from: each control the PNG records is given again, with the same files and window and the same scale
    (or none given: the same default again)."""
    def redoes(record: dict[str, Any], source: dict[str, Any], control: ControlInput) -> bool:
        same_files = all(record[k] == source[k] for k in ("sha256", "image_sha256", "preprocess"))
        same_window = (record["start"], record["end"]) == (control.start, control.end)
        return same_files and same_window and control.scale in (None, record["scale"])

    missing = [r for r in recorded if not any(redoes(r, s, c) for s, c in zip(sources, controls))]
    if missing:
        wanted = ", ".join(f"{c['file']} on {c['image']} (preprocess {c['preprocess']}, scale {c['scale']:g}, "
                           f"{c['start']:g}..{c['end']:g})" for c in missing)
        raise ValueError(f"{png} was made with control {wanted}: pass --control for each to redo it")


def _refiner_settings(args: argparse.Namespace) -> tuple[Path, float] | None:
    """(refiner file, switch) from --refiner / --refiner-switch-at; --from's PNG names the refiner it used."""
    refiner, switch_at = getattr(args, "refiner", None), getattr(args, "refiner_switch_at", None)
    recorded = read_png_parameters(args.from_png) if args.from_png else {}
    if recorded.get("refiner") and refiner is None:
        raise ValueError(f"{args.from_png} was refined by {recorded['refiner']!r}: pass --refiner FILE to redo it")
    if refiner is None:
        if switch_at is not None:
            raise ValueError("--refiner-switch-at needs --refiner")
        return None
    if not refiner.exists():
        raise FileNotFoundError(f"--refiner {refiner}: no such file or folder")
    return refiner, switch_at if switch_at is not None else recorded.get("refiner_switch_at") or 0.8


def _base_config(args: argparse.Namespace, model: DiffusionModel) -> GenerationConfig:
    """--from's parameters, then --quality's, then every flag given explicitly."""
    values: dict[str, Any] = read_png_parameters(args.from_png) if args.from_png else {}
    if args.quality:
        preset = model.get_optimal_config(args.quality, "")
        values.update(sampler=preset.sampler, num_inference_steps=preset.num_inference_steps)
    flip = lambda pair: None if pair is None else (pair[1], pair[0])  # noqa: E731  the CLI's W H / X Y -> (h, w) / (top, left)
    flags = {"prompt": args.prompt, "negative_prompt": args.negative, "num_inference_steps": args.steps,
             "guidance_scale": args.cfg, "guidance_rescale": args.rescale, "seed": args.seed,
             "sampler": args.sampler, "width": args.width, "height": args.height, "prompt_2": args.prompt_2,
             "negative_prompt_2": args.negative_2, "original_size": flip(args.original_size),
             "crops_coords_top_left": flip(args.crop), "target_size": flip(args.target_size),
             "aesthetic_score": args.aesthetic_score, "clip_skip": args.clip_skip,
             "prompt_weighting": args.prompt_weighting}
    values.update({k: v for k, v in flags.items() if v is not None})
    if "prompt" not in values:
        raise ValueError("give a prompt (or --from an earlier image)")
    values.setdefault("seed", 0)
    return GenerationConfig.from_dict(values)


def _generate(model: DiffusionModel, args: argparse.Namespace, configs: list[GenerationConfig],
              images: dict[str, Image.Image], refiner: DiffusionModel | None, switch_at: float | None,
              controls: list[ControlInput]):
    common = {"progress": not args.quiet, "control": controls or None, "guess_mode": _guess_mode(args)}
    if args.command == "generate":
        handover = {} if refiner is None else {"refiner": refiner, "refiner_switch_at": switch_at}
        for start in range(0, len(configs), args.batch_size):
            yield from model.generate_batch(configs[start:start + args.batch_size], **common, **handover)
    elif args.command == "img2img":
        for config in configs:
            yield model.image_to_image(config, images["image"], args.strength, **common)
    else:
        for config in configs:
            yield model.inpaint(config, images["image"], images["mask"], args.strength, **common)


def _guess_mode(args: argparse.Namespace) -> bool:
    """--guess-mode / --no-guess-mode, else what the --from image recorded, else off."""
    if args.guess_mode is not None:
        return args.guess_mode
    return bool(args.from_png and read_png_parameters(args.from_png).get("guess_mode"))


def save_without_overwriting(result: GeneratedImage, folder: Path) -> Path:
    """Save to the first free <folder>/<number>-<seed>.png; the exclusive open never replaces a file."""
    number = len(list(folder.glob("*.png")))
    while True:
        try:
            return result.save(folder / f"{number:05d}-{result.seed}.png")
        except FileExistsError:
            number += 1


if __name__ == "__main__":
    sys.exit(main())
