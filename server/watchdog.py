"""One timer for all the waits of a stream, instead of one per message.

A stream's waits are bounded one by one: the upstream's next chunk within `idle_s`
(server.routing.attempts), the method's next message before the call's default
deadline (server.api.intake). `asyncio.timeout` per wait arms and cancels a timer
for every chunk, twice per chunk with both bounds. A `Watchdog` keeps one timer for
the whole stream: each wait only notes when it started; when the timer fires, it
ends the wait in progress if that wait is past its bound, and otherwise sets itself
for the moment the current wait will be (or, between waits, leaves the next wait to
set it). A stream of chunks arriving faster than the bound never touches the timer
after its first wait.

Ending a wait works as `asyncio.timeout` does it: the task is cancelled and the
wait raises `TimeoutError` instead of `CancelledError`, unless the task was also
cancelled by someone else (then the cancellation goes on).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

T = TypeVar("T")


class Watchdog:
    """Bounds each `wait` by `idle_s` from its start (`idle_s`), or all of them by
    the loop time `deadline`; one timer at a time for the watchdog's life."""

    def __init__(self, *, idle_s: float | None = None, deadline: float | None = None) -> None:
        self._idle_s = idle_s
        self._deadline = deadline
        self._loop = asyncio.get_running_loop()
        self._handle: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[Any] | None = None
        self._since: float | None = None  # when the wait in progress started
        self._expiring = False
        # Whether a wait has ended with TimeoutError because of this watchdog.
        self.fired = False

    async def wait(self, awaitable: Awaitable[T]) -> T:
        """`await awaitable`, or TimeoutError once it runs past the bound."""
        # With the loop given, current_task skips get_running_loop, which on Python
        # 3.11 makes a getpid syscall each time (this runs once per chunk).
        task = asyncio.current_task(self._loop)
        assert task is not None, "a Watchdog waits inside a task"
        self._task = task
        cancelling = task.cancelling()
        self._since = now = self._loop.time()
        if self._handle is None:
            self._handle = self._loop.call_at(self._due(now), self._check)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self._expiring:
                self._expiring = False
                if task.uncancel() <= cancelling:
                    self.fired = True
                    raise TimeoutError from None
            raise
        finally:
            self._since = None
            if self._expiring:  # the answer came in the same loop pass as the timer
                self._expiring = False
                task.uncancel()

    def close(self) -> None:
        """Stops the timer (the stream ended)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _due(self, since: float) -> float:
        if self._deadline is not None:
            return self._deadline if self._idle_s is None else min(self._deadline, since + self._idle_s)
        assert self._idle_s is not None
        return since + self._idle_s

    def _check(self) -> None:
        self._handle = None
        since = self._since
        if since is None:
            return  # between waits: the next one sets the timer
        due = self._due(since)
        if self._loop.time() >= due and self._task is not None:
            self._expiring = True
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._check)
