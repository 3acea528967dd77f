"""The per-step cost of ControlNet: one guided denoising step (ControlNet, then the UNet with its residuals),
ours against diffusers' ControlNetModel + UNet2DConditionModel, on the same weights.

    python benchmarks/controlnet.py [--size 256] [--repeats 5] [--threads N] [--device cpu|cuda] [--dtype float16]

The SD1.5 architecture (UNet and its ControlNet) with seeded random weights, every zero convolution perturbed,
batch 2 (the negative and positive halves of classifier-free guidance), a --size x --size control image.
Prints the median seconds of one step with and without the ControlNet, for both implementations, the ratio
ours / diffusers (lower is better; <= 1.0 is no slower), the ControlNet's share of a step, and the largest
relative difference between the two noise predictions. The implementations take turns, who goes first
alternating, after one warm-up each.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from diffusers import ControlNetModel as DiffusersControlNet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import reference  # noqa: E402  (seeded random diffusers models at SD's real architectures)

from diffusion_core import ControlNetModel  # noqa: E402
from diffusion_core.checkpoints.controlnet import controlnet_config_from_diffusers  # noqa: E402
from diffusion_core.checkpoints.keymaps import controlnet_from_diffusers, unet_from_diffusers  # noqa: E402
from diffusion_core.models.unet import UNetConfig, UNetModel  # noqa: E402


def ours_from(module: torch.nn.Module, build, config, weights: dict) -> torch.nn.Module:
    with torch.device("meta"):
        ours = build(config)
    ours.load_state_dict({k: v.clone() for k, v in weights.items()}, assign=True)
    return ours.eval()


def timed(step, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=256, help="image side in pixels (latents: size / 8)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, help="CPU threads for both (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=["float32", "float16"], default="float32")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    ref_unet = reference.build_unet(reference.SD15_UNET)
    ref_cn = reference.randomize_(DiffusersControlNet.from_unet(ref_unet).eval(), seed=1)
    unet_config = UNetConfig.from_diffusers(dict(ref_unet.config))
    cn_config = controlnet_config_from_diffusers(dict(ref_cn.config))
    unet = ours_from(ref_unet, UNetModel, unet_config, unet_from_diffusers(ref_unet.state_dict(), unet_config))
    cn = ours_from(ref_cn, ControlNetModel, cn_config, controlnet_from_diffusers(ref_cn.state_dict(), cn_config))
    for module in (ref_unet, ref_cn, unet, cn):
        module.to(device, dtype)

    gen = torch.Generator().manual_seed(0)
    latent = args.size // 8
    x = torch.randn(2, 4, latent, latent, generator=gen).to(device, dtype)
    context = torch.randn(2, 77, 768, generator=gen).to(device, dtype)
    image = torch.rand(2, 3, args.size, args.size, generator=gen).to(device, dtype)
    t = torch.tensor(500, device=device)

    def theirs(part: str) -> torch.Tensor:
        extra = {}
        if part != "unet":
            down, mid = ref_cn(x, t, context, image, return_dict=False)
            if part == "controlnet":
                return mid
            extra = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
        return ref_unet(x, t, context, **extra).sample

    def ours(part: str) -> torch.Tensor:
        extra = {}
        if part != "unet":
            extra["down_residuals"], extra["mid_residual"] = cn(x, t, context, image)
            if part == "controlnet":
                return extra["mid_residual"]
        return unet(x, t, context, **extra)

    expected = theirs("both").float()
    difference = ((ours("both").float() - expected).abs().max() / expected.abs().max()).item()
    parts = {"unet": "UNet alone", "controlnet": "ControlNet alone", "both": "ControlNet + UNet (a step)"}
    times = {(name, part): [] for name in ("diffusers", "ours") for part in parts}
    for repeat in range(args.repeats):
        for part in parts:
            runs = [("diffusers", theirs), ("ours", ours)]
            for name, run in runs if repeat % 2 == 0 else runs[::-1]:  # who goes first alternates
                times[name, part].append(timed(lambda: run(part), device))
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"SD1.5 UNet + ControlNet, {args.size}x{args.size}, batch 2, {args.dtype} on {device}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print("| forward | diffusers (s) | ours (s) | ours / diffusers |\n| --- | --- | --- | --- |")
    for part, label in parts.items():
        d, o = median["diffusers", part], median["ours", part]
        print(f"| {label} | {d:.3f} | {o:.3f} | {o / d:.2f} |")
    print(f"largest relative difference of the noise predictions: {difference:.1e}")


if __name__ == "__main__":
    main()
