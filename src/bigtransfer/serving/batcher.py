"""Dynamic batching: requests' images wait a few milliseconds to run through the model together.

Requests arrive on the event loop; batches run on worker threads (torch releases the GIL while it
computes, so the loop keeps reading and decoding the next requests meanwhile). A batch holds
requests of one kind (predict or embed) and at most `max_batch` images, unless one request alone
holds more; its first request waits at most `timeout_s` for others to join, and not at all when no
other request is on its way (`en_route`: admitted, still being read or decoded), so a lone client
pays no batching delay.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import torch

log = logging.getLogger("bigtransfer.serve")


@dataclass
class _Job:
    kind: str
    images: torch.Tensor  # [n, 3, R, R]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop


class Batcher:
    """Collects jobs into batches and runs `compute(kind, images) -> rows` on worker threads."""

    def __init__(self, compute: Callable[[str, torch.Tensor], torch.Tensor], *, max_batch: int, timeout_s: float,
                 workers: int = 1, on_batch: Callable[[int], None] | None = None,
                 en_route: Callable[[], int] = lambda: 1):
        self.compute, self.max_batch, self.timeout_s = compute, max_batch, timeout_s
        self.on_batch = on_batch or (lambda size: None)
        self.en_route = en_route
        self._jobs: deque[_Job] = deque()
        self._wakeup = threading.Condition()
        self._stopping = False
        self._threads = [threading.Thread(target=self._work, name=f"batcher-{i}", daemon=True)
                         for i in range(workers)]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Run what is already queued, then end the worker threads."""
        with self._wakeup:
            self._stopping = True
            self._wakeup.notify_all()
        deadline = time.monotonic() + timeout_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    async def submit(self, kind: str, images: torch.Tensor) -> torch.Tensor:
        """The model's rows for `images`, once a batch holding them has run."""
        loop = asyncio.get_running_loop()
        job = _Job(kind, images, loop.create_future(), loop)
        with self._wakeup:
            if self._stopping:
                raise RuntimeError("the batcher is stopping")
            self._jobs.append(job)
            self._wakeup.notify()
        return await job.future

    # ------------------------------------------------------------------ worker threads
    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _next_batch(self) -> list[_Job] | None:
        """The oldest job plus same-kind jobs that fit, waiting up to the timeout for them; None: stop."""
        with self._wakeup:
            while not self._jobs and not self._stopping:
                self._wakeup.wait()
            if not self._jobs:
                return None
            batch = [self._jobs.popleft()]
            size = len(batch[0].images)
            deadline = time.monotonic() + self.timeout_s
            while size < self.max_batch:
                job = self._take_fitting(batch[0].kind, self.max_batch - size)
                if job is not None:
                    batch.append(job)
                    size += len(job.images)
                    continue
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stopping or self.en_route() == 0:
                    break
                self._wakeup.wait(remaining)
            return batch

    def _take_fitting(self, kind: str, room: int) -> _Job | None:
        for i, job in enumerate(self._jobs):
            if job.kind == kind and len(job.images) <= room:
                del self._jobs[i]
                return job
        return None

    def _run(self, batch: list[_Job]) -> None:
        images = torch.cat([job.images for job in batch]) if len(batch) > 1 else batch[0].images
        try:
            rows = self.compute(batch[0].kind, images)
        except Exception as err:  # a bug or an exhausted device: every request of the batch fails alike
            log.exception("a batch of %d images failed", len(images))
            for job in batch:
                _deliver(job, error=err)
            return
        self.on_batch(len(images))
        start = 0
        for job in batch:
            _deliver(job, rows[start:start + len(job.images)])
            start += len(job.images)


def _deliver(job: _Job, rows: torch.Tensor | None = None, error: Exception | None = None) -> None:
    def settle():
        if job.future.done():  # the client went away and the request was cancelled
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(rows)

    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop has already closed
        pass
