"""`diffusion-core serve`: AUTOMATIC1111's API on this machine (uvicorn), loopback unless credentials are set."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


from ..pipeline import DTYPES, device_and_dtype
from .security import Limits, check_bind, parse_credentials

SERVE_EXAMPLES = """\
examples:
  # the bundled shapes model on http://127.0.0.1:7860/sdapi/v1 (any A1111 client, e.g. webuiapi, works)
  diffusion-core serve

  # a folder of checkpoints, LoRAs and embeddings; two models kept loaded; a GPU in fp16
  diffusion-core serve --models-dir models/Stable-diffusion --lora-dir models/Lora \\
      --embeddings-dir embeddings --model-cache 2 --device cuda --dtype float16

  # reachable from other machines: credentials are required (or set DIFFUSION_CORE_API_AUTH, kept out of `ps`)
  diffusion-core serve --host 0.0.0.0 --api-auth alice:s3cret

Routes: POST /sdapi/v1/txt2img, /img2img (with "mask": inpainting), /interrupt, /skip, /options, /png-info;
GET /sdapi/v1/progress, /samplers, /schedulers, /sd-models, /loras, /embeddings, /options; /internal/ping,
/metrics (Prometheus). docs/serving.md has the table against A1111's and the security model.
"""



def add_serve_parser(commands) -> None:
    help_text = "serve AUTOMATIC1111's /sdapi/v1 HTTP API (needs the [serve] extra)"
    command = commands.add_parser("serve", help=help_text, description=help_text, epilog=SERVE_EXAMPLES,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    models = command.add_argument_group("models")
    models.add_argument("--checkpoint", type=Path, help="one checkpoint file or diffusers folder (default: the "
                        "bundled shapes model)")
    models.add_argument("--models-dir", type=Path, help="a folder of checkpoints clients choose from by name")
    models.add_argument("--lora-dir", type=Path, help="LoRAs that prompts name as <lora:name:weight>")
    models.add_argument("--embeddings-dir", type=Path, help="textual-inversion embeddings, loaded into each model")
    models.add_argument("--model-cache", type=int, default=2, help="checkpoints kept loaded (default: 2)")
    models.add_argument("--device", help="cpu, cuda, cuda:1, mps (default: cuda if available, else cpu)")
    models.add_argument("--dtype", choices=list(DTYPES), help="default: float16 on cuda, float32 elsewhere")
    network = command.add_argument_group("network")
    network.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this "
                         "machine only; any other needs --api-auth)")
    network.add_argument("--port", type=int, default=7860, help="default: 7860, A1111's")
    network.add_argument("--api-auth", metavar="USER:PASS[,USER2:PASS2]", default=os.environ.get(
        "DIFFUSION_CORE_API_AUTH"), help="HTTP Basic credentials every request must carry (default: "
        "$DIFFUSION_CORE_API_AUTH)")
    service = command.add_argument_group("service")
    service.add_argument("--queue-size", type=int, default=8, help="requests that may wait for the worker; more "
                         "are answered 429 with Retry-After (default: 8)")
    service.add_argument("--result-cache", type=int, default=64, help="answers kept for fixed-seed requests "
                         "(default: 64; 0 turns it off)")
    scale = command.add_argument_group("Ray Serve (needs the [ray] extra; RAY_ADDRESS joins a cluster)")
    scale.add_argument("--ray", action="store_true", help="run on Ray Serve: an ingress and --replicas "
                       "generator replicas, Serve's model multiplexing as the model cache")
    scale.add_argument("--replicas", type=int, default=1, help="generator replicas (default: 1), each one GPU "
                       "when there are GPUs, else --cpus-per-replica CPUs")
    scale.add_argument("--cpus-per-replica", type=int, default=1, help="default: 1")
    limits = command.add_argument_group("limits (each refusal is a 4xx naming the field)")
    defaults = Limits()
    limits.add_argument("--max-body-mb", type=float, default=defaults.max_body_bytes / 2**20,
                        help="request body (default: %(default)g)")
    limits.add_argument("--max-pixels", type=int, default=defaults.max_pixels,
                        help="width × height of an output (default: %(default)d)")
    limits.add_argument("--max-steps", type=int, default=defaults.max_steps, help="default: %(default)d")
    limits.add_argument("--max-images", type=int, default=defaults.max_images,
                        help="batch_size × n_iter (default: %(default)d)")


def run_serve(args: argparse.Namespace) -> int:
    """Check the bind and the flags, load nothing yet (models load on first use), and serve until stopped."""
    try:
        import uvicorn

        from .app import Settings, create_app, json_log_formatter
        from .models import ModelStore
    except ImportError as error:
        raise ImportError(f"diffusion-core serve needs the [serve] extra: pip install 'diffusion-core[serve]' "
                          f"({error})") from None
    credentials = parse_credentials(args.api_auth) if args.api_auth else None
    check_bind(args.host, credentials)
    for flag in ("model_cache", "queue_size", "max_pixels", "max_steps", "max_images"):
        if getattr(args, flag) < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.result_cache < 0 or args.max_body_mb <= 0:
        raise ValueError("--result-cache must be >= 0 and --max-body-mb positive")
    device, dtype = device_and_dtype(args.device, args.dtype)
    store_kwargs = dict(checkpoint=args.checkpoint, models_dir=args.models_dir, cache_size=args.model_cache,
                        device=device, dtype=dtype, lora_dir=args.lora_dir, embeddings_dir=args.embeddings_dir)
    store = ModelStore(**store_kwargs)  # checks the folders now, before anything starts
    limits = Limits(max_body_bytes=int(args.max_body_mb * 2**20), max_pixels=args.max_pixels,
                    max_steps=args.max_steps, max_images=args.max_images)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(json_log_formatter())
    logger = logging.getLogger("diffusion_core.serve")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    where = f"{args.replicas} Ray Serve replica(s)" if args.ray else device
    print(f"diffusion-core: serving http://{args.host}:{args.port}/sdapi/v1 on {where} "
          f"({'HTTP Basic auth' if credentials else 'no auth: loopback only'})", file=sys.stderr, flush=True)
    if args.ray:
        return _serve_on_ray(args, store_kwargs, limits, credentials)
    app = create_app(Settings(store, limits, credentials, args.queue_size, args.result_cache))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_keep_alive=5)
    return 0


def _serve_on_ray(args: argparse.Namespace, store_kwargs: dict, limits: Limits,
                  credentials: list[tuple[str, str]] | None) -> int:
    """serve.run the ingress and generators, and keep them up until Ctrl-C (or SIGTERM)."""
    import signal
    import time

    try:
        import ray
        from ray import serve

        from .ray_serve import build_ray_app
    except ImportError as error:
        raise ImportError(f"--ray needs the [ray] extra: pip install 'diffusion-core[ray]' ({error})") from None
    if args.replicas < 1 or args.cpus_per_replica < 1:
        raise ValueError("--replicas and --cpus-per-replica must be at least 1")
    if "RAY_ADDRESS" in os.environ:  # a cluster's
        ray.init()
    else:  # a local Ray of this machine's CPUs and GPUs, without its dashboard's open port
        ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # so that the finally below runs
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        gpus = 1 if store_kwargs["device"].startswith("cuda") else 0
        serve.run(build_ray_app(store_kwargs, limits, credentials, args.queue_size, args.result_cache,
                                args.replicas, args.model_cache, args.cpus_per_replica, gpus),
                  name="diffusion-core", route_prefix="/")
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()
