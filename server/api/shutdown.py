"""Ending open streams cleanly when the shutdown grace period runs out.

`grpc.aio.Server.stop(grace)` cancels every handler still running when the grace
ends; a cancelled stream just stops, which over REST is a clean EOF that an SDK takes
for a normal, short answer. So `Gateway.stop` calls `OpenStreams.interrupt` shortly
before the grace ends: each open stream's task is cancelled, and the stream, seeing
that the cancellation is the gateway's own, turns it into `ShuttingDown`. The meter
records the call as "interrupted" (reason SHUTTING_DOWN), and the client gets an
error event (REST) or the UNAVAILABLE status with reason SHUTTING_DOWN (gRPC).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from contextlib import contextmanager

from server.errors import ShuttingDown

log = logging.getLogger(__name__)

# Interrupt streams this long before the grace ends (a quarter of a short grace), so
# they can record and send their error event before the server cancels them.
INTERRUPT_LEAD_S = 1.0


def interrupt_after(grace_s: float) -> float:
    """When, after the grace began, open streams are interrupted."""
    return max(grace_s - min(INTERRUPT_LEAD_S, grace_s / 4), 0.0)


class OpenStreams:
    """The tasks of the streams in flight."""

    def __init__(self) -> None:
        self._tasks: set[asyncio.Task[object]] = set()
        self._interrupted: set[asyncio.Task[object]] = set()

    def __len__(self) -> int:
        return len(self._tasks)

    @contextmanager
    def track(self) -> Iterator[None]:
        """Marks the current task as an open stream while the block runs."""
        task = asyncio.current_task()
        if task is None:
            yield
            return
        self._tasks.add(task)
        try:
            yield
        finally:
            self._tasks.discard(task)
            self._interrupted.discard(task)

    def interrupt(self) -> int:
        """Cancels every open stream; returns how many."""
        for task in self._tasks - self._interrupted:
            self._interrupted.add(task)
            task.cancel()
        if self._tasks:
            log.warning("shutdown grace ends: interrupting %d open streams", len(self._tasks))
        return len(self._tasks)

    def raise_if_interrupted(self) -> None:
        """Called on CancelledError: when the gateway itself cancelled the current
        stream, takes the cancellation back and raises ShuttingDown instead."""
        task = asyncio.current_task()
        if task is not None and task in self._interrupted:
            task.uncancel()
            raise ShuttingDown("the gateway is shutting down and ended this stream; retry the request")
