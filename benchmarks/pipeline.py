"""Whole text-to-image runs, ours against diffusers' StableDiffusionPipeline on the same weights and settings.

    python benchmarks/pipeline.py [--cpu-steps 4] [--cpu-size 256] [--repeats 3] [--threads N] [--no-sd15-cpu]
                                  [--no-gpu]

CPU (always): the tiny test model (64x64, 10 steps) and the SD1.5 architecture with random weights at a
reduced size (--cpu-size, --cpu-steps), fp32, guidance 7.5, PNDM, batch 1.
GPU (when CUDA is available): the SD1.5 architecture, 512x512, 50 steps, guidance 7.5, fp16, batch 1 and 4,
for diffusers' default pipeline (SDPA attention), our default DiffusionModel and our opt-in fast path
(`DiffusionModel(..., compile=True)`: channels_last + torch.compile; its compilation is a warm-up run).
Prints, per setting: seconds per image, denoising steps per second, peak GPU memory, the largest pixel
difference between the two images, and the ratios ours/diffusers (time: lower is better, <= 1.0 is no
slower; speed-up = diffusers / ours). Each figure is the median of --repeats runs after one warm-up run, the
pipelines taking turns.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import PNDMScheduler, StableDiffusionPipeline
from transformers import CLIPTextConfig, CLIPTextModel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import checkpoint_fixtures as fx  # noqa: E402  (tiny references and the CLIP tokenizer rebuilt offline)
import reference  # noqa: E402  (seeded random diffusers models at SD's real architectures)

from diffusion_core import DiffusionModel, GenerationConfig  # noqa: E402
from diffusion_core.checkpoints.configs import ModelConfig, sd_scheduler_config  # noqa: E402
from diffusion_core.checkpoints.keymaps import unet_from_diffusers, vae_from_diffusers  # noqa: E402
from diffusion_core.checkpoints.loader import Components  # noqa: E402
from diffusion_core.checkpoints.text_keys import text_from_transformers  # noqa: E402
from diffusion_core.models.text_encoder import TextEncoder, TextEncoderConfig  # noqa: E402
from diffusion_core.models.unet import UNetConfig, UNetModel  # noqa: E402
from diffusion_core.models.vae import VAE, VAEConfig  # noqa: E402
from diffusion_core.schedulers import make_scheduler  # noqa: E402

PROMPT = "a photograph of an astronaut riding a horse"
NEGATIVE = "blurry"


def sd15_reference() -> dict:
    """SD1.5's UNet, VAE and CLIP ViT-L/14 text encoder with seeded random weights, in diffusers' classes."""
    text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                        num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                        hidden_act="quick_gelu", layer_norm_eps=1e-5)).eval()
    return dict(unet=reference.build_unet(reference.SD15_UNET), vae=reference.build_vae(reference.SD_VAE),
                text_encoder=text, tokenizer=fx.clip_tokenizer("sd1"),
                scheduler=PNDMScheduler.from_config(sd_scheduler_config()))


def ours_from_reference(ref: dict, name: str) -> Components:
    """The same weights in our modules, converted in memory by the checkpoint key maps."""
    unet_config = UNetConfig.from_diffusers(dict(ref["unet"].config))
    vae_config = VAEConfig.from_diffusers(dict(ref["vae"].config))
    text_config = TextEncoderConfig.from_transformers(ref["text_encoder"].config.to_dict(),
                                                      ref["tokenizer"].pad_token_id)
    modules = []
    for module_class, config, weights in (
            (UNetModel, unet_config, unet_from_diffusers(ref["unet"].state_dict(), unet_config)),
            (VAE, vae_config, vae_from_diffusers(ref["vae"].state_dict(), vae_config)),
            (TextEncoder, text_config, text_from_transformers(ref["text_encoder"].state_dict(), text_config))):
        with torch.device("meta"):
            module = module_class(config)
        module.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
        modules.append(module.eval())
    side = ref["unet"].config.sample_size * 2 ** (len(vae_config.ch_mult) - 1)
    config = ModelConfig(name, unet_config, vae_config, text_config, native_size=side,
                         scheduler=sd_scheduler_config(), scheduler_name="pndm")
    return Components(*modules, make_scheduler("pndm", **config.scheduler), config)


def diffusers_pipeline(ref: dict) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline(vae=ref["vae"], text_encoder=ref["text_encoder"], tokenizer=ref["tokenizer"],
                                   unet=ref["unet"], scheduler=ref["scheduler"], safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@dataclass
class Measure:
    seconds: float            # median wall time of one call
    peak_memory: int | None   # bytes allocated at most on the GPU during a call
    images: list              # the PIL images of the last call
    times: list[float]        # the wall time of each measured call


def measure(runs: dict, device: torch.device, repeats: int) -> dict[str, Measure]:
    """Each run once to warm up (kernel selection, torch.compile), then `repeats` rounds taking them in turn, so
    that a machine drifting faster or slower (other load, clocks, memory) weighs on all alike."""
    for run in runs.values():
        run()
    times = {name: [] for name in runs}
    peaks, images = {}, {}
    for _ in range(repeats):
        for name, run in runs.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            images[name] = run()
            if device.type == "cuda":
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated()
            times[name].append(time.perf_counter() - start)
    return {name: Measure(statistics.median(times[name]), peaks.get(name), images[name], times[name]) for name in runs}


def compare(label: str, ours: DiffusionModel, pipe: StableDiffusionPipeline, size: int, steps: int, batch: int,
            repeats: int, fast: DiffusionModel | None = None, guidance: float = 7.5) -> list[str]:
    """Time both (and the fast path) on the same seeds; return markdown table rows. `pipe` may be any diffusers
    text-to-image pipeline taking SD's arguments (SDXL's does)."""
    device = ours.device
    configs = [GenerationConfig(PROMPT, negative_prompt=NEGATIVE, width=size, height=size, num_inference_steps=steps,
                                guidance_scale=guidance, seed=i) for i in range(batch)]

    def run_diffusers():
        generators = [torch.Generator("cpu").manual_seed(i) for i in range(batch)]
        return pipe([PROMPT] * batch, negative_prompt=[NEGATIVE] * batch, width=size, height=size,
                    num_inference_steps=steps, guidance_scale=guidance, generator=generators).images

    def runner(model: DiffusionModel):
        return lambda: [r.image for r in model.generate_batch(configs, progress=False)]

    runs = {"diffusers": run_diffusers, "ours": runner(ours)}
    if fast is not None:
        runs["ours, compile=True"] = runner(fast)
    measured = measure(runs, device, repeats)
    theirs = measured.pop("diffusers")
    rows = [row(label, "diffusers", theirs, theirs, batch, steps, None)]
    for name, result in measured.items():
        diff = max(int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())
                   for a, b in zip(result.images, theirs.images))
        rows.append(row(label, name, result, theirs, batch, steps, diff))
    for line in rows:
        print(line, flush=True)
    return rows


def row(label: str, name: str, m: Measure, base: Measure, batch: int, steps: int, diff: int | None) -> str:
    memory = f"{m.peak_memory / 2**30:.2f}" if m.peak_memory is not None else "-"
    memory_ratio = f"{m.peak_memory / base.peak_memory:.2f}" if m.peak_memory is not None else "-"
    return (f"| {label} | {name} | {m.seconds / batch:.3f} | {steps / m.seconds:.2f} | {memory} | "
            f"{m.seconds / base.seconds:.2f} | {base.seconds / m.seconds:.2f} | {memory_ratio} | "
            f"{'-' if diff is None else diff} |")


HEADER = ("| setting | pipeline | s/image | steps/s | peak GiB | time ratio | speed-up | memory ratio | max px diff |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-steps", type=int, default=4, help="steps of the SD1.5-size CPU run")
    parser.add_argument("--cpu-size", type=int, default=256, help="image side of the SD1.5-size CPU run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-sd15-cpu", action="store_true", help="skip the SD1.5-size CPU run (slow)")
    parser.add_argument("--no-gpu", action="store_true")
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's; 1 on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cuda.matmul.allow_tf32 = False
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"GPU: {torch.cuda.get_device_name() if torch.cuda.is_available() else 'none'}")
    print(HEADER)
    with torch.no_grad():
        tiny = fx.tiny_reference("sd1")
        compare("CPU fp32, tiny model, 64x64, 10 steps", DiffusionModel(ours_from_reference(tiny, "tiny")),
                diffusers_pipeline(tiny), 64, 10, 1, args.repeats)
        del tiny
        gpu = torch.cuda.is_available() and not args.no_gpu
        sd15 = sd15_reference() if gpu or not args.no_sd15_cpu else None
        if not args.no_sd15_cpu:
            compare(f"CPU fp32, SD1.5 architecture, {args.cpu_size}x{args.cpu_size}, {args.cpu_steps} steps",
                    DiffusionModel(ours_from_reference(sd15, "sd15")), diffusers_pipeline(sd15), args.cpu_size,
                    args.cpu_steps, 1, args.repeats)
        if gpu:
            gpu_benchmark(sd15, args.repeats)


def gpu_benchmark(sd15: dict, repeats: int) -> None:
    """SD1.5 architecture, 512x512, 50 steps, guidance 7.5, fp16, batch 1 and 4."""
    components = ours_from_reference(sd15, "sd15")
    pipe = diffusers_pipeline(sd15).to("cuda", torch.float16)
    ours = DiffusionModel(components, device="cuda", dtype=torch.float16)
    fast = DiffusionModel(ours_from_reference(sd15, "sd15"), device="cuda", dtype=torch.float16, compile=True)
    for batch in (1, 4):
        compare(f"GPU fp16, SD1.5 architecture, 512x512, 50 steps, batch {batch}", ours, pipe, 512, 50, batch,
                repeats, fast)


if __name__ == "__main__":
    main()
