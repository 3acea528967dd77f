"""The HTTP app: AUTOMATIC1111's /sdapi/v1 routes over an executor, with auth, limits, caches and metrics.

Handlers only translate (jobs.py) and wait; the executor (executors.py: the worker thread, or Ray Serve
replicas) does every model call, so a slow generation never blocks /progress or /interrupt, and a model is
never used by two requests at once.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBasic, HTTPBasicCredentials
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool

from .. import a1111
from ..generation import GeneratedImage
from ..schedulers import supports_karras_sigmas
from .executors import LocalExecutor
from .jobs import build_job, option_changes, png_info, response
from .models import ModelStore, UnknownName
from .schemas import Img2Img, PngInfo, Txt2Img
from .security import BodyLimit, Limits, RequestError, credentials_match, decode_image
from .worker import QueueFull, Task

log = logging.getLogger("diffusion_core.serve")


@dataclass
class Settings:
    """What `diffusion-core serve` configures."""

    store: ModelStore
    limits: Limits = field(default_factory=Limits)
    credentials: list[tuple[str, str]] | None = None  # --api-auth; None: no auth (loopback only)
    queue_size: int = 8                                # requests that may wait besides the running one
    result_cache_size: int = 64                        # requests' images kept when their seed is fixed


class Metrics:
    """Prometheus series, in a registry of the app's own (so several apps in one process do not collide)."""

    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter("diffusion_core_requests", "HTTP requests by route and status",
                                ["route", "status"], registry=self.registry)
        self.latency = Histogram("diffusion_core_request_seconds", "HTTP request latency by route", ["route"],
                                 registry=self.registry, buckets=(0.01, 0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300))
        self.queue_depth = Gauge("diffusion_core_queue_depth", "tasks waiting for the worker", registry=self.registry)
        self.generation = Histogram("diffusion_core_generation_seconds", "worker seconds per generation task",
                                    registry=self.registry, buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600))
        self.cache_hits = Counter("diffusion_core_cache_hits", "requests answered from a cache", ["cache"],
                                  registry=self.registry)


class ResultCache:
    """The images of the last `size` fixed-seed requests, by Job.cache_key (least recently used goes first).
    Images, not answers: the answer echoes each request's own fields (send_images, parameters, ...)."""

    def __init__(self, size: int):
        self.size, self.images = size, OrderedDict()

    def get(self, key: str) -> list[GeneratedImage] | None:
        if key in self.images:
            self.images.move_to_end(key)
        return self.images.get(key)

    def put(self, key: str, images: list[GeneratedImage]) -> None:
        self.images[key] = images
        while len(self.images) > self.size:
            self.images.popitem(last=False)


def create_app(settings: Settings, executor=None) -> FastAPI:
    """The app over `executor` (default: a LocalExecutor of the settings' store and queue size)."""
    store, limits, metrics = settings.store, settings.limits, Metrics()
    executor = executor or LocalExecutor(store, settings.queue_size)
    executor.on_change = lambda: metrics.queue_depth.set(executor.depth())
    results = ResultCache(settings.result_cache_size)
    options = {"sd_model_checkpoint": _first_checkpoint(store), "CLIP_stop_at_last_layers": 1}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(executor.close)

    app = FastAPI(title="diffusion-core", summary="AUTOMATIC1111's /sdapi/v1 API on diffusion_core",
                  dependencies=[Depends(_authenticate(settings.credentials))], docs_url=None, redoc_url=None,
                  openapi_url=None, lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.middleware("http")
    async def observe(request: Request, call_next):
        started = time.perf_counter()
        answer = await call_next(request)
        route = getattr(request.scope.get("route"), "path", "unmatched")  # the template: no client text in labels
        seconds = time.perf_counter() - started
        metrics.requests.labels(route, str(answer.status_code)).inc()
        metrics.latency.labels(route).observe(seconds)
        log.info("request", extra={"fields": {"method": request.method, "route": route,
                                              "status": answer.status_code, "seconds": round(seconds, 4)}})
        return answer

    @app.exception_handler(Unauthorized)
    async def unauthorized(request: Request, error: Unauthorized):
        return _error(401, "Unauthorized", "this server needs HTTP Basic credentials (--api-auth)",
                      headers={"WWW-Authenticate": 'Basic realm="diffusion-core"'})

    @app.exception_handler(RequestError)
    async def refused(request: Request, error: RequestError):
        return _error(error.status, type(error).__name__, str(error))

    @app.exception_handler(UnknownName)
    async def unknown(request: Request, error: UnknownName):
        return _error(400, "UnknownName", str(error))

    @app.exception_handler(ValueError)  # ModelLoadError, and the library's own checks of a config
    async def invalid(request: Request, error: ValueError):
        return _error(422, type(error).__name__, str(error))

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, error: RequestValidationError):
        problems = [f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in error.errors()]
        return _error(422, "RequestValidationError", "; ".join(problems))

    async def generate(request: Txt2Img, http: Request, name: str) -> dict[str, Any]:
        started = time.time()
        job = await run_in_threadpool(build_job, request, store, dict(options), limits)
        key = job.cache_key(store) if request.seed != -1 else None
        if key is not None and (cached := results.get(key)) is not None:
            metrics.cache_hits.labels("result").inc()
            return response(request, job, cached, started)
        task = Task(name=name, id=request.force_task_id or "", job_count=job.n_iter)
        try:
            made = await _until_done(executor.generate(job, task), task, http, executor)
        except QueueFull:
            retry = executor.retry_after()
            return _error(429, "QueueFull", f"the queue is full ({settings.queue_size} requests waiting); retry "
                          f"in about {retry} s", headers={"Retry-After": str(retry)})
        metrics.generation.observe(time.time() - (task.started or started))
        if key is not None and not any(r.interrupted for r in made) and len(made) == len(job.configs):
            results.put(key, made)
        log.info("generated", extra={"fields": {"task": task.id, "images": len(made), "seconds":
                                                round(time.time() - started, 3)}})
        return response(request, job, made, started)

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(request: Txt2Img, http: Request):
        return await generate(request, http, "txt2img")

    @app.post("/sdapi/v1/img2img")
    async def img2img(request: Img2Img, http: Request):
        return await generate(request, http, "img2img")

    @app.get("/sdapi/v1/progress")
    async def progress(skip_current_image: bool = False):
        running = executor.running()
        return _progress(running[0] if running else None)

    @app.post("/sdapi/v1/interrupt")
    async def interrupt():
        for task in executor.running():
            executor.interrupt(task)
        return {}

    @app.post("/sdapi/v1/skip")
    async def skip():
        for task in executor.running():
            executor.skip(task)
        return {}

    @app.get("/sdapi/v1/samplers")
    async def samplers():
        return [{"name": name, "aliases": a1111.SAMPLER_ALIASES[name], "options": {}}
                for name in a1111.SAMPLER_NAMES.values()]

    @app.get("/sdapi/v1/schedulers")
    async def schedulers():
        return [{"name": name, "label": label, "aliases": None, "default_rho": 7.0 if name == "karras" else -1,
                 "need_inner_model": False,
                 "samplers": [a1111.sampler_name(s) for s in a1111.SAMPLER_NAMES
                              if name == "automatic" or supports_karras_sigmas(s)]}
                for name, label in a1111.SCHEDULES.items()]

    @app.get("/sdapi/v1/sd-models")
    async def sd_models():
        return [c.listing() for c in await run_in_threadpool(store.checkpoints)]

    @app.post("/sdapi/v1/refresh-checkpoints")
    async def refresh_checkpoints():
        await run_in_threadpool(store.checkpoints)
        return {}

    @app.get("/sdapi/v1/loras")
    async def loras():
        return [{"name": name, "alias": name, "path": path.relative_to(store.lora_dir).as_posix(), "metadata": {}}
                for name, path in store.loras().items()]

    @app.get("/sdapi/v1/embeddings")
    async def embeddings():
        return await executor.embeddings(store.find(options["sd_model_checkpoint"]))

    @app.get("/sdapi/v1/options")
    async def get_options():
        current = store.find(options["sd_model_checkpoint"])
        return {**options, "sd_checkpoint_hash": current.sha256}

    @app.post("/sdapi/v1/options")
    async def set_options(body: dict[str, Any]):
        changes = option_changes(body)
        if "sd_model_checkpoint" in changes:  # loaded now, by the executor, so a broken file answers here
            checkpoint = await run_in_threadpool(store.find, changes["sd_model_checkpoint"])
            try:
                await executor.load(checkpoint)
            except QueueFull:
                return _error(429, "QueueFull", "the queue is full; retry later",
                              headers={"Retry-After": str(executor.retry_after())})
            changes["sd_model_checkpoint"] = checkpoint.title
        options.update(changes)
        return {}

    @app.post("/sdapi/v1/png-info")
    async def png_info_route(body: PngInfo):
        image = await run_in_threadpool(decode_image, "image", body.image, limits)
        return png_info(image)

    @app.get("/internal/ping")
    async def ping():
        return {}

    @app.get("/metrics")
    async def prometheus():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _until_done(work, task: Task, http: Request, executor) -> list:
    """The work's result; when the client goes away first, its task is interrupted: dropped if it still waits,
    stopped at its next step if it runs."""
    waiting = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({waiting}, timeout=0.5)
        if done:
            return waiting.result()
        if not task.interrupted.is_set() and await http.is_disconnected():
            executor.interrupt(task)


def _progress(task: Task | None) -> dict[str, Any]:
    """A1111's ProgressResponse: progress and eta of the running task, and its shared.state fields."""
    state = {"skipped": False, "interrupted": False, "stopping_generation": False, "job": "", "job_count": 0,
             "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}
    if task is None or task.started is None:
        return {"progress": 0.0, "eta_relative": 0.0, "state": state, "current_image": None, "textinfo": None}
    state.update(skipped=task.skipped.is_set(), interrupted=task.interrupted.is_set(), job=task.name,
                 job_count=task.job_count, job_no=task.job_no, sampling_step=task.sampling_step,
                 sampling_steps=task.sampling_steps,
                 job_timestamp=time.strftime("%Y%m%d%H%M%S", time.localtime(task.started)))
    progress, elapsed = task.progress(), time.time() - task.started
    return {"progress": progress, "eta_relative": elapsed / progress - elapsed, "state": state,
            "current_image": None, "textinfo": None, "id_task": task.id}


def _first_checkpoint(store: ModelStore) -> str:
    listing = store.checkpoints()
    if not listing:
        raise ValueError(f"--models-dir {store.models_dir}: no checkpoints (.safetensors, .ckpt or diffusers "
                         f"folders) in it")
    return listing[0].title


def _error(status: int, kind: str, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """A1111's error body ({"error", "detail"}), with the message saying what was wrong."""
    return JSONResponse({"error": kind, "detail": detail}, status_code=status, headers=headers)


def _authenticate(credentials: list[tuple[str, str]] | None):
    """A dependency every route has: HTTP Basic against --api-auth, or nothing when none was given."""
    basic = HTTPBasic(auto_error=False)

    async def check(given: HTTPBasicCredentials | None = Depends(basic)) -> None:
        if credentials is None:
            return
        if given is None or not credentials_match(given.username, given.password, credentials):
            raise Unauthorized

    return check


class Unauthorized(Exception):
    """No credentials, or wrong ones: answered 401 with the Basic challenge."""


def json_log_formatter() -> logging.Formatter:
    """Structured logs: one JSON object per line (time, level, event, and the record's fields)."""
    class JsonFormatter(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            return json.dumps({"time": round(record.created, 3), "level": record.levelname,
                               "event": record.getMessage(), **getattr(record, "fields", {})})
    return JsonFormatter()
