"""The bounded pool the local models run in, off the event loop.

A fixed number of worker threads run inference (llama.cpp, ONNX Runtime and
PocketSphinx release the GIL while they compute); a call beyond the workers waits in
a queue of bounded length, and a call beyond that is refused at once with
`UpstreamRateLimited` (RESOURCE_EXHAUSTED, HTTP 429) and a retry hint, rather than
piling up behind a long generation. Admission is counted here, not by the executor,
because `ThreadPoolExecutor` has an unbounded queue.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from server.errors import UpstreamRateLimited

T = TypeVar("T")

# How long a refused client is told to wait: about one short generation.
RETRY_AFTER_S = 1.0


class InferencePool:
    """`workers` threads and room for `queue` more calls waiting for one."""

    def __init__(self, *, provider: str, workers: int, queue: int) -> None:
        self.provider = provider
        self.workers = workers
        self.queue = queue
        self._executor = ThreadPoolExecutor(workers, thread_name_prefix=f"{provider}-inference")
        self._lock = threading.Lock()
        self._admitted = 0

    @property
    def admitted(self) -> int:
        """Calls running or waiting now."""
        with self._lock:
            return self._admitted

    def submit(self, fn: Callable[..., T], *args: object) -> Future[T]:
        """Runs `fn(*args)` on a worker, or raises `UpstreamRateLimited` when full."""
        with self._lock:
            if self._admitted >= self.workers + self.queue:
                raise UpstreamRateLimited(
                    f"the local models are busy: {self.workers} calls running and {self.queue} waiting "
                    "(AIGNE_HUB_LOCAL_WORKERS, AIGNE_HUB_LOCAL_QUEUE); retry shortly",
                    provider=self.provider,
                    retry_after_seconds=RETRY_AFTER_S,
                )
            self._admitted += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())
        return future

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on a worker, awaited."""
        return await asyncio.wrap_future(self.submit(fn, *args))

    def close(self) -> None:
        """Drops the waiting calls; the running ones finish on their own."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _release(self) -> None:
        with self._lock:
            self._admitted -= 1
