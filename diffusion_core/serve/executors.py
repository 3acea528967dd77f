"""Where a request's work runs: here, on the worker thread (LocalExecutor), or on Ray Serve replicas (ray_serve.py).

The app (app.py) asks an executor for these things, and knows nothing else of where models live:
`await generate(job, task)` (the images; QueueFull when no place is free), `await load(checkpoint)` (a checkpoint
made ready, or ModelLoadError), `await embeddings(checkpoint)` (what its model loaded), `running()` (the tasks being worked on, for /progress), `interrupt(task)` /
`skip(task)`, and `depth()` / `retry_after()` / `close()` for the queue.
"""
from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..generation import GeneratedImage
from .jobs import Job, run_job
from .models import Checkpoint, ModelStore
from .worker import Task, Worker


class LocalExecutor:
    """One worker thread for this machine's device, with the store's LRU cache of loaded models."""

    def __init__(self, store: ModelStore, queue_size: int):
        self.store = store
        self.worker = Worker(queue_size, on_change=lambda: self.on_change())
        self.on_change: Callable[[], None] = lambda: None  # the app sets it: the queue depth changed

    async def generate(self, job: Job, task: Task) -> list[GeneratedImage]:
        task.run = lambda task: run_job(job, self.store.load(job.checkpoint), task)
        return await asyncio.wrap_future(self.worker.submit(task))

    async def load(self, checkpoint: Checkpoint) -> None:
        await asyncio.wrap_future(self.worker.submit(Task(lambda task: self.store.load(checkpoint), "load model")))

    async def embeddings(self, checkpoint: Checkpoint) -> dict:
        """A1111's /embeddings for a checkpoint: what its model loaded and skipped (nothing until it is loaded)."""
        return self.store.embedding_reports.get(checkpoint.sha256, {"loaded": {}, "skipped": {}})

    def running(self) -> list[Task]:
        task = self.worker.current
        return [task] if task is not None and task.started is not None else []

    def interrupt(self, task: Task) -> None:
        task.interrupted.set()

    def skip(self, task: Task) -> None:
        task.skipped.set()

    def depth(self) -> int:
        return self.worker.depth()

    def retry_after(self) -> int:
        return self.worker.retry_after()

    def close(self) -> None:
        self.worker.stop()
