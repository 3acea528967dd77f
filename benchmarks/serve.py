"""What the HTTP server costs over a direct call, and what Ray workers add to a batch, on the bundled model.

    python benchmarks/serve.py [--requests 20] [--steps 30] [--concurrency 4] [--lines 24] [--threads 1]

1. Direct: `DiffusionModel.generate` --requests times (distinct seeds), one after another.
2. HTTP: the same requests to a `diffusion-core serve` on 127.0.0.1 (its own process, --threads threads),
   one after another, then --concurrency at a time (the one worker queues them). Seeds are distinct, so the
   result cache never answers.
3. Batch: `diffusion-core batch` of --lines lines, in-process, and on Ray Data with 1 and 2 workers (one
   CPU each; Ray's start-up and each worker's model load are included, as a user pays them).
Prints requests per second and p50 / p95 latency for 1 and 2, images per second for 3.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests
import torch

from diffusion_core import DiffusionModel, GenerationConfig
from diffusion_core.serve.batch import generate_batch_file

PROMPT = "a red circle on a blue background"


def percentiles(seconds: list[float]) -> str:
    ordered = sorted(seconds)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return f"p50 {statistics.median(ordered) * 1000:.0f} ms, p95 {p95 * 1000:.0f} ms"


def direct(args) -> None:
    model = DiffusionModel()
    model.generate(GenerationConfig(PROMPT, num_inference_steps=args.steps), progress=False)  # warm-up
    seconds = []
    for seed in range(args.requests):
        start = time.perf_counter()
        model.generate(GenerationConfig(PROMPT, num_inference_steps=args.steps, seed=seed, sampler="euler_a",
                                        guidance_scale=2.0, prompt_weighting=True), progress=False)
        seconds.append(time.perf_counter() - start)
    print(f"direct calls:        {len(seconds) / sum(seconds):.2f} requests/s, {percentiles(seconds)}")


def http(args) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "diffusion_core.cli", "serve", "--port", str(port),
                               "--queue-size", str(args.requests)], stderr=subprocess.DEVNULL,
                              env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})
    url = f"http://127.0.0.1:{port}/sdapi/v1/txt2img"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/internal/ping", timeout=1)
                break
            except requests.ConnectionError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.3)

        def one(seed: int) -> float:
            body = {"prompt": PROMPT, "width": 64, "height": 64, "steps": args.steps, "cfg_scale": 2.0,
                    "seed": seed, "sampler_name": "Euler a"}
            start = time.perf_counter()
            answer = requests.post(url, json=body, timeout=600)
            assert answer.status_code == 200, answer.text[:300]
            return time.perf_counter() - start

        one(10_000)  # warm-up: the model loads on first use
        seconds = [one(seed) for seed in range(args.requests)]
        print(f"HTTP, one at a time: {len(seconds) / sum(seconds):.2f} requests/s, {percentiles(seconds)}")
        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            seconds = list(pool.map(one, range(20_000, 20_000 + args.requests)))
        wall = time.perf_counter() - start
        print(f"HTTP, {args.concurrency} at a time:  {args.requests / wall:.2f} requests/s, {percentiles(seconds)} "
              f"(latency includes the wait in the queue)")
    finally:
        os.kill(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def batch(args) -> None:
    import ray

    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": PROMPT, "seed": seed, "num_inference_steps": args.steps})
                                   + "\n" for seed in range(args.lines)))
        runs = [("in-process", {}), ("Ray, 1 worker", {"ray": True, "workers": 1}),
                ("Ray, 2 workers", {"ray": True, "workers": 2})]
        ray_dir = tempfile.mkdtemp(prefix="ray-")
        try:
            for n, (name, options) in enumerate(runs):
                if options and not ray.is_initialized():
                    ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
                start = time.perf_counter()
                written = generate_batch_file(prompts, Path(folder) / f"out{n}", progress=False, **options)
                wall = time.perf_counter() - start
                print(f"batch, {name:<15} {len(written) / wall:.2f} images/s ({len(written)} in {wall:.1f} s)")
        finally:
            ray.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--lines", type=int, default=24)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"bundled shapes model, 64x64, {args.steps} steps of Euler a, {args.threads} thread(s) per process")
    direct(args)
    http(args)
    batch(args)


if __name__ == "__main__":
    main()
