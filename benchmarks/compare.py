"""What `compare` costs on a full-size UNet (SDXL base: 2.6B parameters; SD1.5: 860M; random weights), CPU, fp32.

    python benchmarks/compare.py [--model sdxl|sd15] [--size 512] [--stored-gb 2] [--threads N]

Ours shares the reference's weight tensors (converted by the key maps), as in the tests, so one copy sits in
memory (SDXL 10.3 GB, SD1.5 3.4 GB); `diffusion-core compare` on a real file holds two, one network at a time. The
reference's activations are held up to --stored-gb, then the comparison runs in windows. Printed: the
windows, seconds, rows, the worst row, the process's peak resident memory, and a forward pass of each
network alone, so that the cost of the hooks shows as a ratio.
"""
from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import reference  # noqa: E402

from diffusion_core.checkpoints.keymaps import unet_from_diffusers  # noqa: E402
from diffusion_core.compare import compare_unet  # noqa: E402
from diffusion_core.models.unet import SD15_UNET, SDXL_BASE_UNET, UNetModel  # noqa: E402

MODELS = {"sdxl": (reference.SDXL_BASE_UNET, SDXL_BASE_UNET), "sd15": (reference.SD15_UNET, SD15_UNET)}


def peak_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # GiB; ru_maxrss is in KiB on Linux


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=list(MODELS), default="sdxl")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (latent side / 8)")
    parser.add_argument("--stored-gb", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    diffusers_config, config = MODELS[args.model]
    ref = reference.build_unet(diffusers_config)
    with torch.device("meta"):
        ours = UNetModel(config).eval()
    ours.load_state_dict(unet_from_diffusers(ref.state_dict(), config), assign=True)
    print(f"models built; peak {peak_gb():.1f} GiB")
    gen = torch.Generator().manual_seed(0)
    side = args.size // 8
    sample = torch.randn(1, 4, side, side, generator=gen)
    context = torch.randn(1, 77, config.context_dim, generator=gen)
    added = {} if args.model == "sd15" else dict(
        text_embeds=torch.randn(1, 1280, generator=gen),
        time_ids=torch.tensor([[args.size, args.size, 0, 0, args.size, args.size]], dtype=torch.float32))
    start = time.perf_counter()
    ref(sample, 500, encoder_hidden_states=context, **({"added_cond_kwargs": added} if added else {}))
    reference_alone = time.perf_counter() - start
    start = time.perf_counter()
    ours(sample, 500, context, **added)
    ours_alone = time.perf_counter() - start
    passes = []
    ref.register_forward_pre_hook(lambda *_: passes.append(1))
    start = time.perf_counter()
    comparison = compare_unet(ours, ref, sample, 500, context, **added, stored_bytes=int(args.stored_gb * 2 ** 30))
    seconds = time.perf_counter() - start
    worst = max(comparison.rows, key=lambda r: r.max_rel)
    print(f"{args.model} UNet, {args.size}x{args.size} ({side}x{side} latents), fp32, {args.threads} threads, "
          f"activations held <= {args.stored_gb} GB")
    print(f"  windows (passes of each network): {len(passes)}")
    print(f"  rows: {len(comparison.rows)}, passed: {comparison.passed}, worst {worst.max_rel:.2e} at {worst.ours}")
    print(f"  compare: {seconds:.1f} s; one forward alone: reference {reference_alone:.1f} s, ours {ours_alone:.1f} s "
          f"(compare / (both alone x windows) = {seconds / ((reference_alone + ours_alone) * len(passes)):.2f})")
    print(f"  peak resident memory: {peak_gb():.1f} GiB")
    print(comparison.table(worst=3))


if __name__ == "__main__":
    main()
