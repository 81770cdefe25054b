"""The counters behind the limits: GCRA for requests and tokens per minute, leased
slots for calls in flight; in Redis (every replica shares them) or in this process.

Why GCRA (the generic cell rate algorithm) rather than a sliding window: it keeps one
number per counter (the "theoretical arrival time", TAT), is exact (a limit of N per
minute admits at most N in any 60 s, and exactly N from a full bucket at once), gives
the real wait for free (how far the new TAT is past the window), and a token
reservation can be corrected afterwards by moving the TAT back or forward, which a
window log cannot do without rewriting its entries. Each unit advances the TAT by
`60 s / limit`; a call costing `c` is admitted while `max(TAT, now) + c * interval`
stays within 60 s of now.

Calls in flight are members of a sorted set scored by their lease's end: admitting
drops expired members and counts the rest; the serving process renews its members'
leases every third of the lease, so a crashed replica's slots expire within one lease.

One Redis round trip admits a call through all its counters (one Lua script, atomic on
the server, all or nothing: a call refused by one counter takes nothing from the
others), and one more settles it when it ends (token correction, slot release), only
when it holds tokens or a slot. The
script reads Redis's own clock, so replicas with skewed clocks still share one window.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

WINDOW_MS = 60_000.0
# Float slack so that N units of 60 000/N ms fit a window exactly.
EPSILON_MS = 0.001
Kind = Literal["requests", "tokens", "concurrency"]
_CODES: dict[Kind, str] = {"requests": "r", "tokens": "t", "concurrency": "c"}


@dataclass(frozen=True, slots=True)
class Counter:
    """One counter a call goes through: its storage name, kind, limit and this call's cost."""

    name: str
    kind: Kind
    limit: int
    cost: int = 1

    @property
    def interval_ms(self) -> float:
        return WINDOW_MS / self.limit


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter after the decision: what is left and when it is full again."""

    remaining: int
    reset_ms: int


@dataclass(frozen=True, slots=True)
class Verdict:
    admitted: bool
    # The index of the first counter that refused (-1: none).
    refused: int
    retry_after_ms: int
    states: tuple[CounterState, ...]


class Counters(Protocol):
    async def admit(self, counters: Sequence[Counter], member: str, lease_ms: int) -> Verdict: ...

    async def settle(self, counters: Sequence[Counter], member: str, token_deltas: Sequence[int]) -> None:
        """Ends a call: releases its slots, moves token counters by `token_deltas`
        (actual minus reserved, one per counter; ignored for other kinds)."""
        ...

    async def renew(self, held: dict[str, Sequence[Counter]], lease_ms: int) -> None: ...

    async def aclose(self) -> None: ...


# KEYS: one per counter. ARGV: lease_ms, member, then (kind code, limit, cost) per counter.
# Returns {refused index (0: admitted), wait ms, remaining_1, reset_1, remaining_2, ...}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local lease = tonumber(ARGV[1])
local refused, wait = 0, 0
local out, tats = {}, {}
for i = 1, #KEYS do
  local kind, limit, cost = ARGV[3*i], tonumber(ARGV[3*i+1]), tonumber(ARGV[3*i+2])
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    local held = redis.call('ZCARD', KEYS[i])
    if held + 1 > limit then
      if refused == 0 then refused, wait = i, 1000 end
      out[2*i-1] = math.max(limit - held, 0)
    else
      out[2*i-1] = limit - held - 1
    end
    out[2*i] = 0
  else
    local interval = window / limit
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if tat < now then tat = now end
    local next_tat = tat + cost * interval
    local used = next_tat
    if next_tat - now > window + 0.001 then
      if refused == 0 then refused, wait = i, next_tat - now - window end
      used = tat
    end
    tats[i] = next_tat
    out[2*i-1] = math.max(math.floor((window - (used - now)) / interval + 0.000001), 0)
    out[2*i] = math.ceil(used - now)
  end
end
if refused == 0 then
  for i = 1, #KEYS do
    if ARGV[3*i] == 'c' then
      redis.call('ZADD', KEYS[i], now + lease, ARGV[2])
      redis.call('PEXPIRE', KEYS[i], lease + 1000)
    else
      redis.call('SET', KEYS[i], string.format('%.3f', tats[i]), 'PX', math.ceil(tats[i] - now) + 1000)
    end
  end
end
local answer = {refused, math.ceil(wait)}
for i = 1, #out do answer[#answer + 1] = out[i] end
return answer
"""

# KEYS: one per counter. ARGV: member, then (kind code, token delta) per counter.
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for i = 1, #KEYS do
  local kind, delta = ARGV[2*i], tonumber(ARGV[2*i+1])
  if kind == 'c' then
    redis.call('ZREM', KEYS[i], ARGV[1])
  elseif kind == 't' and delta ~= 0 then
    local tat = tonumber(redis.call('GET', KEYS[i]) or '0')
    if delta > 0 and tat < now then tat = now end
    tat = tat + delta
    if tat > now then
      redis.call('SET', KEYS[i], string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
    else
      redis.call('DEL', KEYS[i])
    end
  end
end
return 0
"""

# KEYS: slot sets. ARGV: lease_ms, then one member per key.
_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local lease = tonumber(ARGV[1])
for i = 1, #KEYS do
  redis.call('ZADD', KEYS[i], 'XX', now + lease, ARGV[i + 1])
  redis.call('PEXPIRE', KEYS[i], lease + 1000)
end
return 0
"""


def _delta_ms(counter: Counter, delta: int) -> float:
    return delta * counter.interval_ms if counter.kind == "tokens" else 0.0


class RedisCounters:
    """Counters shared by every replica through Redis (AIGNE_HUB_REDIS_URL)."""

    def __init__(self, url: str, *, prefix: str = "aigne-hub:limit:", socket_timeout_s: float = 1.0) -> None:
        import redis.asyncio as aioredis

        self._redis: Any = aioredis.Redis.from_url(
            url, socket_timeout=socket_timeout_s, socket_connect_timeout=socket_timeout_s
        )
        self._prefix = prefix
        self._admit = self._redis.register_script(_ADMIT)
        self._settle = self._redis.register_script(_SETTLE)
        self._renew = self._redis.register_script(_RENEW)

    async def admit(self, counters: Sequence[Counter], member: str, lease_ms: int) -> Verdict:
        args: list[str | int] = [lease_ms, member]
        for counter in counters:
            args += [_CODES[counter.kind], counter.limit, counter.cost]
        answer = await self._admit(keys=[self._prefix + c.name for c in counters], args=args)
        refused, wait = int(answer[0]), int(answer[1])
        states = tuple(CounterState(int(answer[2 + 2 * i]), int(answer[3 + 2 * i])) for i in range(len(counters)))
        return Verdict(refused == 0, refused - 1, wait, states)

    async def settle(self, counters: Sequence[Counter], member: str, token_deltas: Sequence[int]) -> None:
        args: list[str | int | float] = [member]
        for counter, delta in zip(counters, token_deltas, strict=True):
            args += [_CODES[counter.kind], round(_delta_ms(counter, delta), 3)]
        await self._settle(keys=[self._prefix + c.name for c in counters], args=args)

    async def renew(self, held: dict[str, Sequence[Counter]], lease_ms: int) -> None:
        keys, args = [], [lease_ms]
        for member, counters in held.items():
            for counter in counters:
                if counter.kind == "concurrency":
                    keys.append(self._prefix + counter.name)
                    args.append(member)  # type: ignore[arg-type]
        if keys:
            await self._renew(keys=keys, args=args)

    async def aclose(self) -> None:
        await self._redis.aclose()


class MemoryCounters:
    """The same counters in this process only (one replica, or Redis unreachable).
    Each method runs without awaiting, so it is atomic on the event loop."""

    def __init__(self, clock: Any = time.monotonic) -> None:
        self._clock = clock
        self._tats: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}

    def _now_ms(self) -> float:
        return float(self._clock()) * 1000.0

    async def admit(self, counters: Sequence[Counter], member: str, lease_ms: int) -> Verdict:
        now = self._now_ms()
        refused, wait = -1, 0.0
        states: list[CounterState] = []
        next_tats: list[float] = []
        for index, counter in enumerate(counters):
            if counter.kind == "concurrency":
                slots = self._slots.setdefault(counter.name, {})
                for name in [m for m, end in slots.items() if end <= now]:
                    del slots[name]
                full = len(slots) + 1 > counter.limit
                if full and refused < 0:
                    refused, wait = index, 1000.0
                states.append(CounterState(max(counter.limit - len(slots) - (0 if full else 1), 0), 0))
                next_tats.append(0.0)
                continue
            tat = max(self._tats.get(counter.name, 0.0), now)
            next_tat = tat + counter.cost * counter.interval_ms
            used = next_tat
            if next_tat - now > WINDOW_MS + EPSILON_MS:
                if refused < 0:
                    refused, wait = index, next_tat - now - WINDOW_MS
                used = tat
            next_tats.append(next_tat)
            remaining = int((WINDOW_MS - (used - now)) / counter.interval_ms + 1e-6)
            states.append(CounterState(max(remaining, 0), int(-(-(used - now) // 1))))
        if refused < 0:
            for counter, next_tat in zip(counters, next_tats, strict=True):
                if counter.kind == "concurrency":
                    self._slots[counter.name][member] = now + lease_ms
                else:
                    self._tats[counter.name] = next_tat
        return Verdict(refused < 0, refused, int(-(-wait // 1)), tuple(states))

    async def settle(self, counters: Sequence[Counter], member: str, token_deltas: Sequence[int]) -> None:
        now = self._now_ms()
        for counter, delta in zip(counters, token_deltas, strict=True):
            if counter.kind == "concurrency":
                self._slots.get(counter.name, {}).pop(member, None)
            elif counter.kind == "tokens" and delta:
                tat = self._tats.get(counter.name, 0.0)
                if delta > 0:
                    tat = max(tat, now)
                self._tats[counter.name] = tat + _delta_ms(counter, delta)

    async def renew(self, held: dict[str, Sequence[Counter]], lease_ms: int) -> None:
        now = self._now_ms()
        for member, counters in held.items():
            for counter in counters:
                slots = self._slots.get(counter.name)
                if counter.kind == "concurrency" and slots is not None and member in slots:
                    slots[member] = now + lease_ms

    async def aclose(self) -> None:
        return None
