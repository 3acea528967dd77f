"""Time and peak RAM to load an SD1.5-size fp16 single file into fp32 models: ours against diffusers.

    python benchmarks/loading.py [--repeats 2] [--keep DIR]

Writes a random SD1.5-layout fp16 .safetensors file (2.1 GB) and the diffusers config folder that
`from_single_file(..., config=folder, local_files_only=True)` needs, then loads it in a fresh
subprocess per run (so neither loader inherits the other's memory or imports): ours with
`load_components(path)`, diffusers with `StableDiffusionPipeline.from_single_file(..., torch_dtype=float32)`.
Prints, per loader, the best load time (imports excluded) and the peak resident memory the load added
(getrusage's ru_maxrss minus the resident size just before loading), and the ratios ours/diffusers
(lower is better; <= 1.0 means no slower / no bigger).
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def resident_bytes() -> int:
    """Current resident set size of this process (Linux /proc)."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * resource.getpagesize()


def write_sd15_file(path: Path) -> None:
    """Random fp16 weights under SD1.5's original names, shapes from our meta-device modules."""
    from safetensors.torch import save_file

    from diffusion_core.checkpoints.configs import SD15
    from diffusion_core.checkpoints.loader import Components, original_state_dict
    from diffusion_core.models.text_encoder import TextEncoder
    from diffusion_core.models.unet import UNetModel
    from diffusion_core.models.vae import VAE

    with torch.device("meta"):
        modules = UNetModel(SD15.unet), VAE(SD15.vae), TextEncoder(SD15.text)
    names = original_state_dict(Components(*modules, scheduler=None, config=SD15))
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen).mul_(0.02).half() if v.is_floating_point()
             else torch.arange(77)[None] for k, v in names.items()}
    save_file(state, str(path))


def write_diffusers_config_folder(folder: Path) -> None:
    """model_index.json and each component's config (no weights), as in runwayml/stable-diffusion-v1-5."""
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTokenizer

    from diffusion_core.checkpoints.configs import SD15

    sys.path.insert(0, str(ROOT / "tests"))
    from checkpoint_fixtures import clip_vocab_dir  # the CLIP tokenizer rebuilt offline from open_clip's BPE

    with torch.device("meta"):
        UNet2DConditionModel(**SD15.unet.to_diffusers(), sample_size=64).save_config(folder / "unet")
        AutoencoderKL(**SD15.vae.to_diffusers()).save_config(folder / "vae")
    CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                   hidden_act="quick_gelu", max_position_embeddings=77).save_pretrained(folder / "text_encoder")
    CLIPTokenizer.from_pretrained(clip_vocab_dir(), model_max_length=77).save_pretrained(folder / "tokenizer")
    PNDMScheduler.from_config(SD15.scheduler).save_config(folder / "scheduler")
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
                  "feature_extractor": [None, None], "requires_safety_checker": False}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline", **components}))


def child(loader: str, path: str, folder: str) -> None:
    """One measured load in this (fresh) process; prints a JSON line."""
    if loader == "ours":
        from diffusion_core.checkpoints.loader import load_components

        measured_load(lambda: load_components(path))
    else:
        from diffusers import StableDiffusionPipeline

        measured_load(lambda: StableDiffusionPipeline.from_single_file(
            path, config=folder, local_files_only=True, torch_dtype=torch.float32, safety_checker=None))


def measured_load(load) -> None:
    """Print, as JSON, how long `load()` takes and the peak resident memory it adds to this process."""
    before = resident_bytes()
    start = time.perf_counter()
    loaded = load()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_added": peak - before, "loaded": type(loaded).__name__}))


def best_of_fresh_processes(script: str, path: Path, folder: Path, repeats: int) -> dict[str, dict]:
    """Each loader's best time and peak over `repeats` runs of `script --child LOADER PATH FOLDER`, alternated so
    that neither profits from a warmer page cache."""
    runs = {"ours": [], "diffusers": []}
    for _ in range(repeats):
        for loader, measured in runs.items():
            out = subprocess.run([sys.executable, script, "--child", loader, str(path), str(folder)], check=True,
                                 capture_output=True, text=True, cwd=ROOT)
            measured.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {loader: {key: min(r[key] for r in measured) for key in ("seconds", "peak_added")}
            for loader, measured in runs.items()}


def print_table(results: dict[str, dict]) -> None:
    print(f"{'loader':10} {'load s':>8} {'peak RAM added GiB':>19}")
    for loader, r in results.items():
        print(f"{loader:10} {r['seconds']:8.2f} {r['peak_added'] / 2**30:19.2f}")
    ours, theirs = results["ours"], results["diffusers"]
    print(f"{'ratio':10} {ours['seconds'] / theirs['seconds']:8.2f} "
          f"{ours['peak_added'] / theirs['peak_added']:19.2f}   (ours / diffusers)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--keep", type=Path, help="write the file and config folder here and keep them")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        path, folder = root / "sd15-fp16.safetensors", root / "sd15-config"
        if not path.exists():
            write_sd15_file(path)
        write_diffusers_config_folder(folder)
        import diffusers
        print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} threads; "
              f"{path.stat().st_size / 2**30:.2f} GiB fp16 file -> fp32 models; best of {args.repeats} fresh processes")
        print_table(best_of_fresh_processes(__file__, path, folder, args.repeats))


if __name__ == "__main__":
    main()
