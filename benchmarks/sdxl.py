"""SDXL against diffusers, side by side in one run: whole images on the CPU, loading an SDXL-size fp16 file,
and (where CUDA is available) 1024x1024 in fp16.

    python benchmarks/sdxl.py [--repeats 3] [--threads N] [--no-full-cpu] [--no-loading] [--no-gpu]

CPU, fp32, Euler (SDXL's scheduler), guidance 5, batch 1: the tiny test SDXL at 64x64 with 10 steps, and the
SDXL base architecture (2.6B-parameter UNet, both text towers, random weights) at 256x256 with 2 steps, and
its UNet alone.
Ours shares the reference's weight tensors (converted by the key maps), so both fit in memory at once.
Loading: a random SDXL-base-size fp16 single file (6.9 GB) into fp32, ours (`load_components`) against
diffusers (`StableDiffusionXLPipeline.from_single_file(..., config=folder)`), each in fresh subprocesses
(benchmarks/loading.py's method). GPU: 1024x1024, 30 steps, fp16: ours, ours with compile=True, diffusers;
seconds per image, peak memory, the largest pixel difference, and a check that the fp16 VAE path gives no
NaN or black image. Ratios are ours / diffusers: <= 1.0 is no slower / no bigger.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import checkpoint_fixtures as fx  # noqa: E402
import reference  # noqa: E402
import sdxl_fixtures as sx  # noqa: E402
from loading import best_of_fresh_processes, measured_load, print_table  # noqa: E402
from pipeline import HEADER, compare, measure  # noqa: E402

from diffusion_core import DiffusionModel  # noqa: E402
from diffusion_core.checkpoints.configs import SDXL_BASE, sdxl_scheduler_config  # noqa: E402
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers  # noqa: E402
from diffusion_core.checkpoints.loader import Components, original_state_dict, text_encoder_for  # noqa: E402
from diffusion_core.checkpoints.text_keys import text_from_transformers  # noqa: E402
from diffusion_core.models.text_encoder import TextEncoderConfig  # noqa: E402
from diffusion_core.models.unet import UNetConfig, UNetModel  # noqa: E402
from diffusion_core.models.vae import VAE, VAEConfig  # noqa: E402
from diffusion_core.schedulers import make_scheduler  # noqa: E402

# text_encoder/ and text_encoder_2/config.json of stabilityai/stable-diffusion-xl-base-1.0
CLIP_L, CLIP_G = CLIPTextConfig(**reference.SD15_TEXT), CLIPTextConfig(**reference.SDXL_TEXT_2)


def sdxl_reference() -> dict:
    """The SDXL base architecture with seeded random weights, in diffusers' and transformers' classes."""
    return dict(kind="base", unet=reference.full_size(lambda: UNet2DConditionModel(**reference.SDXL_BASE_UNET), 1),
                vae=reference.full_size(lambda: AutoencoderKL(**reference.SDXL_VAE), 2),
                text_encoder=reference.full_size(lambda: CLIPTextModel(CLIP_L), 3),
                text_encoder_2=reference.full_size(lambda: CLIPTextModelWithProjection(CLIP_G), 4),
                tokenizer=fx.clip_tokenizer("sd1"), tokenizer_2=fx.clip_tokenizer("sd2"),
                scheduler=sx.sdxl_scheduler(), requires_aesthetics_score=False, force_zeros_for_empty_prompt=True)


def ours_sharing(ref: dict, name: str) -> DiffusionModel:
    """Our modules on the reference's own tensors (renamed by the key maps; bigG's fused q/k/v are new)."""
    unet_config = UNetConfig.from_diffusers(dict(ref["unet"].config))
    vae_config = VAEConfig.from_diffusers(dict(ref["vae"].config))
    clip_l = TextEncoderConfig.from_transformers(ref["text_encoder"].config.to_dict(), 49407, sdxl=True)
    clip_g = TextEncoderConfig.from_transformers(ref["text_encoder_2"].config.to_dict(), 0, sdxl=True, projection=True)
    size = ref["unet"].config.sample_size * 2 ** (len(vae_config.ch_mult) - 1)
    config = dataclasses.replace(SDXL_BASE, name=name, unet=unet_config, text=clip_l, text_2=clip_g, native_size=size,
                                 vae=dataclasses.replace(vae_config, force_upcast=True))
    text = {**{"clip_l." + k: v for k, v in text_from_transformers(ref["text_encoder"].state_dict(), clip_l).items()},
            **{"clip_g." + k: v for k, v in text_from_transformers(ref["text_encoder_2"].state_dict(), clip_g).items()}}
    modules = []
    for build, module_config, weights in (
            (UNetModel, unet_config, unet_from_diffusers(ref["unet"].state_dict(), unet_config)),
            (VAE, config.vae, vae_from_diffusers(ref["vae"].state_dict(), vae_config)),
            (text_encoder_for, config, text)):
        with torch.device("meta"):
            module = build(module_config)
        module.load_state_dict(weights, assign=True)
        modules.append(module.eval())
    return DiffusionModel(Components(*modules, make_scheduler("euler", **config.scheduler), config))


def unet_rounds(ref: dict, rounds: int) -> None:
    """The SDXL UNet alone, ours and diffusers' on the same weights (batch 2, 32x32 latents), taking turns."""
    ours = ours_sharing(ref, "sdxl").unet
    gen = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 32, 32, generator=gen), torch.randn(2, 77, 2048, generator=gen)
    added = {"text_embeds": torch.randn(2, 1280, generator=gen),
             "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]] * 2)}  # original size, crop, target size
    measured = measure({"ours": lambda: ours(x, 500, context, **added),
                        "diffusers": lambda: ref["unet"](x, 500, context, added_cond_kwargs=added).sample},
                       torch.device("cpu"), rounds)
    print(f"\nSDXL UNet alone, batch 2, 32x32 latents, {rounds} rounds taking turns: " + ", ".join(
        f"{name} {min(m.times):.2f}-{max(m.times):.2f} s (median {m.seconds:.2f})" for name, m in measured.items()))


# ---------------------------------------------------------------- loading an SDXL-size file


def write_sdxl_file(path: Path) -> None:
    """Random fp16 weights under sgm's names, shapes from our meta-device modules."""
    from safetensors.torch import save_file

    with torch.device("meta"):
        modules = UNetModel(SDXL_BASE.unet), VAE(SDXL_BASE.vae), text_encoder_for(SDXL_BASE)
    names = original_state_dict(Components(*modules, scheduler=None, config=SDXL_BASE))
    gen = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape, generator=gen).mul_(0.02).half() if v.is_floating_point()
             else torch.arange(77)[None] for k, v in names.items()}
    save_file(state, str(path))


def write_sdxl_config_folder(folder: Path) -> None:
    """model_index.json and each component's config (no weights), as in stable-diffusion-xl-base-1.0."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    with torch.device("meta"):
        UNet2DConditionModel(**reference.SDXL_BASE_UNET).save_config(folder / "unet")
        AutoencoderKL(**reference.SDXL_VAE).save_config(folder / "vae")
    CLIP_L.save_pretrained(folder / "text_encoder")
    CLIP_G.save_pretrained(folder / "text_encoder_2")
    fx.clip_tokenizer("sd1").save_pretrained(folder / "tokenizer")
    fx.clip_tokenizer("sd2").save_pretrained(folder / "tokenizer_2")
    EulerDiscreteScheduler.from_config(sdxl_scheduler_config()).save_config(folder / "scheduler")
    text = ["transformers", "CLIPTextModel"], ["transformers", "CLIPTextModelWithProjection"]
    components = {"unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
                  "text_encoder": text[0], "text_encoder_2": text[1], "tokenizer": ["transformers", "CLIPTokenizer"],
                  "tokenizer_2": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                  "force_zeros_for_empty_prompt": True}
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline", **components}))


def child(loader: str, path: str, folder: str) -> None:
    """One measured load in this (fresh) process; prints a JSON line."""
    if loader == "ours":
        from diffusion_core.checkpoints.loader import load_components

        measured_load(lambda: load_components(path))
    else:
        measured_load(lambda: StableDiffusionXLPipeline.from_single_file(path, config=folder, local_files_only=True,
                                                                         torch_dtype=torch.float32))


def loading_benchmark(repeats: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path, folder = Path(tmp) / "sd_xl_base-fp16.safetensors", Path(tmp) / "sdxl-config"
        write_sdxl_file(path)
        write_sdxl_config_folder(folder)
        print(f"\nloading a {path.stat().st_size / 2**30:.2f} GiB SDXL fp16 file into fp32, best of {repeats} "
              f"fresh processes each")
        print_table(best_of_fresh_processes(__file__, path, folder, repeats))


# ---------------------------------------------------------------- GPU


def gpu_benchmark(ref: dict, repeats: int) -> None:
    """SDXL base architecture, 1024x1024, 30 steps, guidance 5, fp16, batch 1."""
    pipe = sx.sdxl_pipeline(ref).to("cuda", torch.float16)
    ours = ours_sharing(ref, "sdxl").to("cuda", torch.float16)  # shares the (now fp16, on-GPU) tensors
    fast = ours_sharing(ref, "sdxl")
    fast.compiled = True  # channels_last + torch.compile on the first call
    compare("GPU fp16, SDXL base architecture, 1024x1024, 30 steps, batch 1", ours, pipe, 1024, 30, 1, repeats, fast,
            guidance=5.0)
    for model in (ours, fast):
        image = np.asarray(model.generate(_config(1024, 30), progress=False).image)
        print(f"fp16 VAE path: finite and not black: {bool(np.isfinite(image).all() and image.max() > 0)}, "
              f"VAE dtype {next(model.vae.parameters()).dtype}")


def _config(size: int, steps: int):
    from diffusion_core import GenerationConfig

    return GenerationConfig("a photograph of an astronaut riding a horse", width=size, height=size,
                            num_inference_steps=steps, guidance_scale=5.0, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's)")
    parser.add_argument("--no-full-cpu", action="store_true", help="skip the SDXL-architecture CPU run")
    parser.add_argument("--no-loading", action="store_true", help="skip the loading benchmark")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    import diffusers
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, {torch.get_num_threads()} CPU threads, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(HEADER)
    with torch.no_grad():
        tiny = sx.tiny_sdxl("base")
        compare("CPU fp32, tiny SDXL, 64x64, 10 steps", ours_sharing(tiny, "tiny"), sx.sdxl_pipeline(tiny), 64, 10, 1,
                args.repeats, guidance=5.0)
        del tiny
        gpu = torch.cuda.is_available() and not args.no_gpu
        full = sdxl_reference() if gpu or not args.no_full_cpu else None
        if not args.no_full_cpu:
            compare("CPU fp32, SDXL base architecture, 256x256, 2 steps", ours_sharing(full, "sdxl"),
                    sx.sdxl_pipeline(full), 256, 2, 1, args.repeats, guidance=5.0)
            unet_rounds(full, args.repeats + 1)
        if gpu:
            gpu_benchmark(full, args.repeats)
        del full
    if not args.no_loading:
        loading_benchmark(min(args.repeats, 2))


if __name__ == "__main__":
    main()
