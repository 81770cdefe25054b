"""Keeps the REST bridge up while `aigne-hub serve` runs.

When Envoy exits on its own (crash, OOM kill, `kill -9`), the supervisor logs it with
the tail of Envoy's log, reports the bridge down (`serve` turns that into gRPC health
NOT_SERVING for ""), and starts Envoy again after a backoff: 0.5 s, doubling up to
`max_delay_s`. A start that fails counts like a crash. Envoy that then runs for
`stable_after_s` resets the count; after `max_restarts` restarts in a row without such a
stable run the supervisor gives up with `BridgeFailed`, and `serve` exits non-zero (a
process manager can then restart the whole gateway, or an operator look at the log).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from server.bridge.process import EnvoyProcess

log = logging.getLogger(__name__)


class BridgeFailed(RuntimeError):
    """Envoy kept failing; the gateway gives up rather than run without REST."""


@dataclass(frozen=True)
class RestartPolicy:
    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    max_restarts: int = 5
    stable_after_s: float = 60.0

    def delay(self, restarts: int) -> float:
        return float(min(self.first_delay_s * 2**restarts, self.max_delay_s))


async def supervise(
    envoy: EnvoyProcess,
    stop: asyncio.Event,
    on_change: Callable[[bool], Awaitable[None]],
    ready: Callable[[], Awaitable[None]],
    policy: RestartPolicy | None = None,
) -> None:
    """Runs until `stop` is set, restarting `envoy` (started already) whenever it exits.

    `ready` waits until the restarted bridge serves (raises if it does not);
    `on_change(up)` is awaited when the bridge goes down and when it is back.
    """
    policy = policy or RestartPolicy()
    loop = asyncio.get_running_loop()
    restarts = 0
    while True:
        started = loop.time()
        code = await _exit_or_stop(envoy, stop)
        if code is None:
            return
        if loop.time() - started >= policy.stable_after_s:
            restarts = 0
        await on_change(False)
        log.error("Envoy exited unexpectedly (code %s); REST is down. Envoy log tail:\n%s", code, envoy.log_tail(10))
        while True:
            if restarts >= policy.max_restarts:
                raise BridgeFailed(
                    f"Envoy failed {restarts} times in a row; giving up (Envoy log {envoy.log_path}):\n"
                    f"{envoy.log_tail(10)}"
                )
            delay = policy.delay(restarts)
            restarts += 1
            log.warning("restarting Envoy in %.1f s (restart %d of at most %d)", delay, restarts, policy.max_restarts)
            if await _stopped_within(stop, delay):
                return
            try:
                await envoy.start()
                await ready()
            except (OSError, RuntimeError, TimeoutError) as exc:
                log.error("Envoy restart failed: %s", exc)
                await envoy.terminate()
                continue
            break
        log.warning("Envoy restarted (pid %s); REST is serving again", envoy.pid)
        await on_change(True)


async def _exit_or_stop(envoy: EnvoyProcess, stop: asyncio.Event) -> int | None:
    """Envoy's exit code, or None if `stop` was set first."""
    exited = asyncio.ensure_future(envoy.wait())
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (exited, stopping):
            task.cancel()
    if stop.is_set():
        return None
    return exited.result()


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    try:
        await asyncio.wait_for(stop.wait(), seconds)
    except TimeoutError:
        return False
    return True
