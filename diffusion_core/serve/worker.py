"""One generation worker per device and the bounded queue in front of it.

A device runs one denoising loop at a time well; two at once only share it. So requests wait in a queue of
bounded length (a full queue is refused at once, never left to pile up) and one thread takes them in order.
Each task carries its own progress and its own interrupt/skip flags, which the loop's callback reads after
every step: an interrupt stops at the next step and returns what was made.
"""
from __future__ import annotations

import itertools
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any


class QueueFull(Exception):
    """The queue holds its maximum of waiting tasks."""


@dataclass
class Task:
    """A unit of work for the worker, with what /progress reports of it (A1111's shared.state fields)."""

    run: Callable[[Task], Any] | None = None  # the local worker calls it with the task itself
    name: str = "txt2img"               # A1111's `job`
    id: str = ""                        # A1111's task id (force_task_id, or a counter)
    job_count: int = 1                  # batches to make (A1111's n_iter)
    job_no: int = 0                     # batches done
    sampling_step: int = 0              # steps done in the current batch
    sampling_steps: int = 0             # steps the current batch takes
    started: float | None = None        # time.time() when the worker took it
    future: Future = field(default_factory=Future)
    interrupted: threading.Event = field(default_factory=threading.Event)  # stop everything at the next step
    skipped: threading.Event = field(default_factory=threading.Event)      # stop the current batch only

    def step_callback(self, i: int, *_: Any) -> bool:
        """The loop's callback: record step i, and return True (stop) when interrupted or skipped."""
        self.sampling_step = i + 1
        return self.interrupted.is_set() or self.skipped.is_set()

    def start_batch(self, number: int, steps: int) -> bool:
        """Before batch `number`: reset the step count and the skip flag; False when interrupted."""
        self.job_no, self.sampling_step, self.sampling_steps = number, 0, steps
        self.skipped.clear()
        return not self.interrupted.is_set()

    def progress(self) -> float:
        """A1111's /progress formula: 0.01 + the share of batches done + the current batch's share of steps."""
        done = self.job_no / self.job_count
        if self.sampling_steps:
            done += self.sampling_step / self.sampling_steps / self.job_count
        return min(0.01 + done, 1.0)


class Worker:
    """A thread that runs queued tasks one at a time; at most `queue_size` tasks wait besides the running one."""

    def __init__(self, queue_size: int, on_change: Callable[[], None] = lambda: None):
        if queue_size < 1:
            raise ValueError(f"the queue size must be at least 1 (tasks that may wait), got {queue_size}")
        self.queue: queue.Queue[Task | None] = queue.Queue(maxsize=queue_size)
        self.current: Task | None = None
        self.on_change = on_change  # called when the queue depth changes (metrics)
        self.seconds_per_task = 1.0  # running mean of task times, for Retry-After
        self._ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name="generation-worker", daemon=True)
        self._thread.start()

    def submit(self, task: Task) -> Future:
        """Queue a task; QueueFull when `queue_size` tasks already wait."""
        task.id = task.id or f"task({next(self._ids)})"
        try:
            self.queue.put_nowait(task)
        except queue.Full:
            raise QueueFull from None
        self.on_change()
        return task.future

    def depth(self) -> int:
        """Tasks waiting, not counting the one running."""
        return self.queue.qsize()

    def retry_after(self) -> int:
        """Seconds until a place in the queue is likely free: about one task's time."""
        return max(1, round(self.seconds_per_task))

    def stop(self) -> None:
        self.queue.put(None)
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while (task := self.queue.get()) is not None:
            if task.interrupted.is_set():  # its client went away while it waited
                task.future.set_result([])
                self.on_change()
                continue
            self.current = task
            self.on_change()
            task.future.set_running_or_notify_cancel()
            task.started = time.time()
            try:
                task.future.set_result(task.run(task))
            except BaseException as error:  # noqa: BLE001  the request's handler turns it into a response
                task.future.set_exception(error)
            finally:
                self.seconds_per_task = 0.8 * self.seconds_per_task + 0.2 * (time.time() - task.started)
                self.current = None
                self.on_change()
