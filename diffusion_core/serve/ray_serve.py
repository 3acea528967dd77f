"""`diffusion-core serve --ray --replicas N`: the same app on Ray Serve, past one device or one machine.

Two deployments. The ingress (one replica, no CPU of its own) is the very app of app.py, with the queue,
options, caches, auth and limits; its executor hands each job to the `Generator` deployment, N replicas of
one GPU (or a CPU share) each, one job at a time each. Serve's model multiplexing is the model cache: a job
asks for its checkpoint's sha256 as the multiplexed model id, Serve routes it to a replica that has that
model loaded when one is free, and each replica keeps its last `--model-cache` models.

A replica streams its progress back after every step, and reads interrupt and skip from a small `Flags`
actor, so /progress, /interrupt and /skip work as they do on one machine. On a cluster, every node needs the
package and the model folders at the same paths (a shared file system).
"""
from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import ray
import torch
from ray import serve

from ..generation import GeneratedImage
from .app import Settings, create_app
from .jobs import Job, run_job
from .models import Checkpoint, ModelLoadError, ModelStore
from .security import Limits
from .worker import QueueFull, Task


class Flags:
    """A Ray actor: the interrupts and skips asked of running tasks, by task id."""

    def __init__(self):
        self.flags: dict[str, str] = {}

    def set(self, task_id: str, flag: str) -> None:
        self.flags[task_id] = flag

    def get(self, task_id: str) -> str | None:
        return self.flags.get(task_id)

    def clear(self, task_id: str) -> None:
        self.flags.pop(task_id, None)


class ReplicaTask(Task):
    """A task as a replica runs it: each step reports its progress and reads the task's flag."""

    def __init__(self, task_id: str, job_count: int, flags, report):
        super().__init__(id=task_id, job_count=job_count)
        self.flags, self.report = flags, report

    def step_callback(self, i: int, *_: Any) -> bool:
        self.sampling_step = i + 1
        self.report((self.job_no, self.sampling_step, self.sampling_steps))
        flag = ray.get(self.flags.get.remote(self.id))
        if flag == "interrupt":
            self.interrupted.set()
        elif flag == "skip":
            self.skipped.set()
        return self.interrupted.is_set() or self.skipped.is_set()

    def start_batch(self, number: int, steps: int) -> bool:
        if self.skipped.is_set():  # a skip stops one batch only
            ray.get(self.flags.clear.remote(self.id))
        return super().start_batch(number, steps)


def generator_deployment(store_kwargs: dict[str, Any], model_cache: int, replicas: int,
                         actor_options: dict[str, Any]):
    """The Generator deployment: `replicas` replicas, each with its own ModelStore and multiplexed models."""

    @serve.deployment(num_replicas=replicas, max_ongoing_requests=1, ray_actor_options=actor_options)
    class Generator:
        def __init__(self, flags, threads: int):
            self.store, self.flags = ModelStore(**store_kwargs), flags
            if torch.get_num_threads() != threads:
                torch.set_num_threads(threads)

        @serve.multiplexed(max_num_models_per_replica=model_cache)
        async def model(self, sha256: str):
            return await asyncio.to_thread(self.store.open, self.store.by_sha256(sha256))

        async def load(self) -> str | None:
            """Load the requested model; its error message, if it fails (Ray would lose the exception's type)."""
            try:
                await self.model(serve.get_multiplexed_model_id())
            except ValueError as error:
                return str(error)
            return None

        async def embeddings(self) -> dict:
            sha256 = serve.get_multiplexed_model_id()
            await self.model(sha256)
            return self.store.embedding_reports[sha256]

        async def generate(self, job: Job, task_id: str):
            """Stream ("progress", (batch, step, steps)) after each step, then ("done", images) or ("error", text)."""
            if await self.flags.get.remote(task_id) == "interrupt":  # its client left while it waited
                yield ("done", [])
                return
            try:
                model = await self.model(serve.get_multiplexed_model_id())
            except ValueError as error:
                yield ("error", str(error))
                return
            loop, updates = asyncio.get_running_loop(), asyncio.Queue()
            task = ReplicaTask(task_id, job.n_iter, self.flags,
                               lambda state: loop.call_soon_threadsafe(updates.put_nowait, state))
            work = loop.run_in_executor(None, run_job, job, model, task)
            while not work.done() or not updates.empty():
                update = asyncio.ensure_future(updates.get())
                await asyncio.wait({work, update}, return_when=asyncio.FIRST_COMPLETED)
                if update.done():
                    yield ("progress", update.result())
                else:
                    update.cancel()
            try:
                yield ("done", work.result())
            except ValueError as error:
                yield ("error", str(error))

    return Generator


class RayExecutor:
    """The ingress's executor: jobs go to the Generator replicas; at most `capacity` are in flight."""

    def __init__(self, generator, flags, capacity: int):
        self.generator, self.flags, self.capacity = generator, flags, capacity
        self.tasks: dict[str, Task] = {}
        self.seconds_per_task = 1.0
        self.on_change = lambda: None
        self._ids = itertools.count(1)

    async def generate(self, job: Job, task: Task) -> list[GeneratedImage]:
        if len(self.tasks) >= self.capacity:
            raise QueueFull
        task.id = task.id or f"task({next(self._ids)})"
        self.tasks[task.id] = task
        self.on_change()
        try:
            stream = self.generator.options(stream=True, multiplexed_model_id=job.checkpoint.sha256)
            async for kind, value in stream.generate.remote(job, task.id):
                if kind == "progress":
                    self._update(task, *value)
                elif kind == "error":
                    raise ModelLoadError(value)
                else:
                    return value
            raise RuntimeError("the replica ended its stream without an answer")
        finally:
            if task.started is not None:
                self.seconds_per_task = 0.8 * self.seconds_per_task + 0.2 * (time.time() - task.started)
            del self.tasks[task.id]
            self.flags.clear.remote(task.id)
            self.on_change()

    @staticmethod
    def _update(task: Task, job_no: int, step: int, steps: int) -> None:
        task.started = task.started or time.time()
        if job_no != task.job_no:  # a new batch: a skip asked of the last one is done
            task.skipped.clear()
        task.job_no, task.sampling_step, task.sampling_steps = job_no, step, steps

    async def load(self, checkpoint: Checkpoint) -> None:
        error = await self.generator.options(multiplexed_model_id=checkpoint.sha256).load.remote()
        if error is not None:
            raise ModelLoadError(error)

    async def embeddings(self, checkpoint: Checkpoint) -> dict:
        return await self.generator.options(multiplexed_model_id=checkpoint.sha256).embeddings.remote()

    def running(self) -> list[Task]:
        return [task for task in self.tasks.values() if task.started is not None]

    def interrupt(self, task: Task) -> None:
        task.interrupted.set()
        self.flags.set.remote(task.id, "interrupt")

    def skip(self, task: Task) -> None:
        task.skipped.set()
        self.flags.set.remote(task.id, "skip")

    def depth(self) -> int:
        return sum(task.started is None for task in self.tasks.values())

    def retry_after(self) -> int:
        return max(1, round(self.seconds_per_task))

    def close(self) -> None:
        pass


@serve.deployment(ray_actor_options={"num_cpus": 0})
@serve.ingress()
class Ingress:
    """The HTTP app of app.py, its work done by the Generator replicas."""

    def __init__(self, generator, flags, store_kwargs: dict[str, Any], limits: Limits,
                 credentials: list[tuple[str, str]] | None, queue_size: int, result_cache: int, replicas: int):
        settings = Settings(ModelStore(**store_kwargs), limits, credentials, queue_size, result_cache)
        self.asgi = create_app(settings, RayExecutor(generator, flags, capacity=replicas + queue_size))

    def __serve_build_asgi_app__(self):
        return self.asgi


def build_ray_app(store_kwargs: dict[str, Any], limits: Limits, credentials: list[tuple[str, str]] | None,
                  queue_size: int = 8, result_cache: int = 64, replicas: int = 1, model_cache: int = 2,
                  cpus_per_replica: int = 1, gpus_per_replica: float = 0):
    """The Serve application: an Ingress over `replicas` Generators (serve.run it). Ray must be initialised."""
    if replicas < 1 or cpus_per_replica < 1:
        raise ValueError(f"--replicas and --cpus-per-replica must be at least 1, got {replicas}, {cpus_per_replica}")
    flags = ray.remote(Flags).options(num_cpus=0).remote()
    actor_options = {"num_cpus": cpus_per_replica, "num_gpus": gpus_per_replica}
    generator = generator_deployment(store_kwargs, model_cache, replicas, actor_options)
    return Ingress.bind(generator.bind(flags, cpus_per_replica), flags, store_kwargs, limits, credentials,
                        queue_size, result_cache, replicas)

