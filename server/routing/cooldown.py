"""Cooldowns: a deployment that keeps failing rests, so calls go elsewhere at once
instead of waiting for it to fail again.

A deployment trips when, within the window, it fails `failures` times, or more than
half of at least `min_calls` calls fail, or it answers 429 (rate limited). It then
rests for the provider's Retry-After when it gave one, else for `rest_s`, doubled on
each trip that follows a trip (up to `max_rest_s`). When the rest ends it is on
probation for one window: its next failure trips it again at once (with the longer
rest), its next success clears it.

Two stores with the same behaviour: `MemoryCooldowns` (one process) and
`RedisCooldowns` (every replica sees the same state; each change is one Lua script,
atomic on the server). When Redis cannot be reached the process falls back to its own
memory and says so in the log once per minute; routing never fails because of Redis.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from server.config import CooldownConfig

log = logging.getLogger(__name__)


class CooldownStore(Protocol):
    async def resting(self, deployments: Sequence[str]) -> dict[str, float]:
        """The deployments among `deployments` that rest now, with seconds left."""
        ...

    async def failure(
        self, deployment: str, *, retry_after_s: float | None = None, rate_limited: bool = False
    ) -> float | None:
        """Counts a failed attempt; returns the rest in seconds if this tripped it."""
        ...

    async def success(self, deployment: str) -> None:
        """Counts a successful attempt."""
        ...

    async def aclose(self) -> None: ...


def rest_for(config: CooldownConfig, trips: int, retry_after_s: float | None) -> float:
    """How long a deployment rests on its `trips`-th trip in a row."""
    if retry_after_s is not None and retry_after_s > 0:
        return float(min(retry_after_s, config.max_rest_s))
    return float(min(config.rest_s * 2.0 ** max(trips - 1, 0), config.max_rest_s))


@dataclass
class _State:
    calls: deque[tuple[float, bool]] = field(default_factory=deque)  # (time, failed)
    rest_until: float = 0.0
    probation_until: float = 0.0
    trips: int = 0


class MemoryCooldowns:
    """Cooldown state of this process only."""

    def __init__(self, config: CooldownConfig, clock: Any = time.monotonic) -> None:
        self._config = config
        self._clock = clock
        self._states: dict[str, _State] = {}

    async def resting(self, deployments: Sequence[str]) -> dict[str, float]:
        now = self._clock()
        left = {}
        for name in deployments:
            state = self._states.get(name)
            if state is not None and state.rest_until > now:
                left[name] = state.rest_until - now
        return left

    async def failure(
        self, deployment: str, *, retry_after_s: float | None = None, rate_limited: bool = False
    ) -> float | None:
        if not self._config.enabled:
            return None
        now = self._clock()
        state = self._states.setdefault(deployment, _State())
        if state.rest_until > now:
            return None  # already resting (a call that started before it tripped)
        self._record(state, now, failed=True)
        failed = sum(1 for _, f in state.calls if f)
        on_probation = state.rest_until <= now < state.probation_until
        if not (rate_limited or on_probation or self._tripped(failed, len(state.calls))):
            return None
        state.trips += 1
        rest = rest_for(self._config, state.trips, retry_after_s)
        state.rest_until = now + rest
        state.probation_until = state.rest_until + self._config.window_s
        state.calls.clear()
        return rest

    async def success(self, deployment: str) -> None:
        now = self._clock()
        state = self._states.get(deployment)
        if state is None:
            state = self._states[deployment] = _State()
        self._record(state, now, failed=False)
        if state.rest_until <= now:
            state.trips = 0
            state.probation_until = 0.0

    async def aclose(self) -> None:
        return None

    def _record(self, state: _State, now: float, *, failed: bool) -> None:
        state.calls.append((now, failed))
        horizon = now - self._config.window_s
        while state.calls and state.calls[0][0] < horizon:
            state.calls.popleft()

    def _tripped(self, failed: int, calls: int) -> bool:
        config = self._config
        return failed >= config.failures or (calls >= config.min_calls and failed * 2 > calls)


# KEYS: calls (zset of "f:<id>"/"s:<id>" scored by ms), rest, trips, probation.
# ARGV: now_ms, window_ms, failures, min_calls, rest_ms, max_rest_ms, retry_after_ms
#       (-1: none), rate_limited (0/1), a unique member id.
_FAILURE_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
if redis.call('EXISTS', KEYS[2]) == 1 then return -1 end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, 'f:' .. ARGV[9])
redis.call('PEXPIRE', KEYS[1], math.floor(window))
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local failed = 0
for _, member in ipairs(members) do
  if string.sub(member, 1, 2) == 'f:' then failed = failed + 1 end
end
local calls = #members
local on_probation = redis.call('EXISTS', KEYS[4]) == 1
local tripped = ARGV[8] == '1' or on_probation or failed >= tonumber(ARGV[3])
  or (calls >= tonumber(ARGV[4]) and failed * 2 > calls)
if not tripped then return -1 end
local trips = redis.call('INCR', KEYS[3])
local rest = tonumber(ARGV[7])
if rest <= 0 then rest = tonumber(ARGV[5]) * 2 ^ (trips - 1) end
rest = math.max(1, math.floor(math.min(rest, tonumber(ARGV[6]))))
redis.call('SET', KEYS[2], trips, 'PX', rest)
redis.call('SET', KEYS[4], 1, 'PX', rest + math.floor(window))
redis.call('PEXPIRE', KEYS[3], rest + math.floor(window))
redis.call('DEL', KEYS[1])
return rest
"""

_SUCCESS_SCRIPT = """
local now = tonumber(ARGV[1])
local window = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - window)
redis.call('ZADD', KEYS[1], now, 's:' .. ARGV[3])
redis.call('PEXPIRE', KEYS[1], math.floor(window))
if redis.call('EXISTS', KEYS[2]) == 0 then redis.call('DEL', KEYS[3], KEYS[4]) end
return 0
"""


class RedisCooldowns:
    """Cooldown state shared by every replica through Redis (AIGNE_HUB_REDIS_URL)."""

    def __init__(self, url: str, config: CooldownConfig, *, prefix: str = "aigne-hub:cooldown:") -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)
        self._config = config
        self._prefix = prefix
        self._failure = self._redis.register_script(_FAILURE_SCRIPT)
        self._success = self._redis.register_script(_SUCCESS_SCRIPT)
        self._fallback = MemoryCooldowns(config)
        self._warned_at = -1e9
        self._ids = f"{uuid.uuid4().hex[:8]}-"
        self._count = 0

    def _keys(self, deployment: str) -> list[str]:
        base = self._prefix + deployment
        return [f"{base}:calls", f"{base}:rest", f"{base}:trips", f"{base}:probation"]

    def _member(self) -> str:
        self._count += 1
        return f"{self._ids}{self._count}"

    async def resting(self, deployments: Sequence[str]) -> dict[str, float]:
        if not deployments:
            return {}
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for name in deployments:
                    pipe.pttl(self._keys(name)[1])
                ttls = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis down: route on this process's view
            self._redis_failed(exc)
            return await self._fallback.resting(deployments)
        return {name: ttl / 1000 for name, ttl in zip(deployments, ttls, strict=True) if ttl and ttl > 0}

    async def failure(
        self, deployment: str, *, retry_after_s: float | None = None, rate_limited: bool = False
    ) -> float | None:
        config = self._config
        args: list[int | str] = [
            int(time.time() * 1000),
            int(config.window_s * 1000),
            config.failures,
            config.min_calls,
            int(config.rest_s * 1000),
            int(config.max_rest_s * 1000),
            int(retry_after_s * 1000) if retry_after_s else -1,
            1 if rate_limited else 0,
            self._member(),
        ]
        try:
            rest_ms = await self._failure(keys=self._keys(deployment), args=args)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)
            return await self._fallback.failure(deployment, retry_after_s=retry_after_s, rate_limited=rate_limited)
        return None if int(rest_ms) < 0 else int(rest_ms) / 1000

    async def success(self, deployment: str) -> None:
        args: list[int | str] = [int(time.time() * 1000), int(self._config.window_s * 1000), self._member()]
        try:
            await self._success(keys=self._keys(deployment), args=args)
        except Exception as exc:  # noqa: BLE001
            self._redis_failed(exc)
            await self._fallback.success(deployment)

    async def aclose(self) -> None:
        await self._redis.aclose()

    def _redis_failed(self, exc: BaseException) -> None:
        now = time.monotonic()
        if now - self._warned_at >= 60:
            self._warned_at = now
            log.warning("Redis unreachable for cooldowns (%s); using this process's own state", type(exc).__name__)


def open_cooldowns(redis_url: str | None, config: CooldownConfig) -> CooldownStore:
    """Shared through Redis when a URL is set, else this process's own (also when
    cooldowns are off: nothing is then ever recorded)."""
    if redis_url and config.enabled:
        return RedisCooldowns(redis_url, config)
    return MemoryCooldowns(config)
