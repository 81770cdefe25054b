"""The supervisor's hub: the state the worker processes of `aigne-hub serve --workers N`
must share, kept in the supervisor and reached over a Unix socket in its run folder.

Why the supervisor: rate-limit counters and cooldowns live in process memory when no
Redis is configured (AIGNE_HUB_REDIS_URL). N workers each with their own counters would
admit N times a limit (20 RPM would become 40 with two workers) and a deployment would
have to fail N times as often to rest. The supervisor outlives every worker (a worker
cannot outlive it: see `server.serving.workers`), so keeping ONE `MemoryCounters` and
ONE `MemoryCooldowns` there gives the exact single-process behaviour across workers,
with no new service to run and none of the database's write contention (a counter in
SQLite would take the ledger's write lock on every call). With Redis configured, the
workers use Redis as replicas do and the hub only carries the bridge's health.

Protocol: JSON lines. A worker sends `{"id": n, "op": ..., ...}` and gets `{"id": n,
"r": result}`; an op without an id gets no answer. The hub pushes `{"push": ...}` lines
to every worker: the REST bridge going up or down (`serve` reports it as gRPC health of
"") and a deployment starting to rest (each worker keeps a mirror of the rests, so
`resting` costs no round trip; they use the same CLOCK_MONOTONIC).

Costs per call: an admit (and, for token and concurrency limits, a settle) round trip
only when a limit applies to the call; a deployment's successes are sent in batches
(every `SUCCESS_FLUSH_S`, and before a failure, so the failure ratio sees them).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.config import CooldownConfig
from server.limits.counters import Counter, CounterState, Kind, MemoryCounters, Verdict
from server.routing.cooldown import MemoryCooldowns

log = logging.getLogger(__name__)

LINE_LIMIT = 1 << 20
SUCCESS_FLUSH_S = 0.1


def _counters_to_wire(counters: Sequence[Counter]) -> list[list[Any]]:
    return [[c.name, c.kind, c.limit, c.cost] for c in counters]


def _counters_from_wire(rows: Any) -> list[Counter]:
    out = []
    for name, kind, limit, cost in rows:
        out.append(Counter(str(name), _kind(kind), int(limit), int(cost)))
    return out


def _kind(value: Any) -> Kind:
    if value == "requests":
        return "requests"
    if value == "tokens":
        return "tokens"
    if value == "concurrency":
        return "concurrency"
    raise ValueError(f"unknown counter kind {value!r}")


class Hub:
    """The supervisor's side: serves the workers on `path`."""

    def __init__(self, path: Path, cooldown: CooldownConfig) -> None:
        self.path = path
        self.counters = MemoryCounters()
        self.cooldowns = MemoryCooldowns(cooldown)
        self.bridge_up = False
        self._rests: dict[str, float] = {}
        self._writers: set[asyncio.StreamWriter] = set()
        self._ready: dict[int, asyncio.Future[int]] = {}
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._serve, path=str(self.path), limit=LINE_LIMIT)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()

    def expect_ready(self, index: int) -> asyncio.Future[int]:
        """A future set to the pid of worker `index` when it reports that it serves."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._ready[index] = future
        return future

    def set_bridge(self, up: bool) -> None:
        self.bridge_up = up
        self._broadcast({"push": "bridge", "up": up})

    def _broadcast(self, message: dict[str, Any]) -> None:
        line = json.dumps(message).encode() + b"\n"
        for writer in list(self._writers):
            if not writer.is_closing():
                writer.write(line)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while line := await reader.readline():
                message = json.loads(line)
                result = await self._handle(message)
                if "id" in message:
                    writer.write(json.dumps({"id": message["id"], "r": result}).encode() + b"\n")
        except (ConnectionError, ValueError, KeyError, TypeError) as exc:
            log.warning("worker hub: dropping a worker connection: %s", exc)
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle(self, message: dict[str, Any]) -> Any:
        op = message["op"]
        if op == "hello":
            now = time.monotonic()
            return {"bridge_up": self.bridge_up, "rests": {k: v for k, v in self._rests.items() if v > now}}
        if op == "ready":
            future = self._ready.get(int(message["index"]))
            if future is not None and not future.done():
                future.set_result(int(message["pid"]))
            return None
        if op == "admit":
            verdict = await self.counters.admit(
                _counters_from_wire(message["counters"]), str(message["member"]), int(message["lease_ms"])
            )
            states = [[s.remaining, s.reset_ms] for s in verdict.states]
            return [verdict.admitted, verdict.refused, verdict.retry_after_ms, states]
        if op == "settle":
            await self.counters.settle(
                _counters_from_wire(message["counters"]), str(message["member"]), [int(d) for d in message["deltas"]]
            )
            return None
        if op == "renew":
            held: dict[str, Sequence[Counter]] = {str(m): _counters_from_wire(r) for m, r in message["held"].items()}
            await self.counters.renew(held, int(message["lease_ms"]))
            return None
        if op == "successes":
            for deployment, count in message["counts"].items():
                for _ in range(min(int(count), 100_000)):
                    await self.cooldowns.success(str(deployment))
            return None
        if op == "failure":
            return await self._failure(message)
        if op == "invalidate":
            self._broadcast({"push": "invalidate", "key_id": message.get("key_id")})
            return None
        raise ValueError(f"unknown op {op!r}")

    async def _failure(self, message: dict[str, Any]) -> float | None:
        deployment = str(message["deployment"])
        retry_after = message.get("retry_after_s")
        rest = await self.cooldowns.failure(
            deployment,
            retry_after_s=float(retry_after) if retry_after is not None else None,
            rate_limited=bool(message.get("rate_limited")),
        )
        if rest is not None:
            until = time.monotonic() + rest
            self._rests[deployment] = until
            self._broadcast({"push": "rest", "deployment": deployment, "until": until})
        return rest


class HubClient:
    """A worker's connection to the hub: calls with answers, and the hub's pushes."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._next_id = 0
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self.rests: dict[str, float] = {}
        self.bridge_up = False
        self.on_bridge: Callable[[bool], Coroutine[Any, Any, None]] | None = None
        # Told of a key (its id) or of limit rules (None) another worker changed.
        self.on_invalidate: Callable[[str | None], None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    @classmethod
    async def connect(cls, path: Path) -> HubClient:
        reader, writer = await asyncio.open_unix_connection(str(path), limit=LINE_LIMIT)
        client = cls(reader, writer)
        client._task = asyncio.create_task(client._read(), name="worker-hub-reader")
        hello = await client.call("hello")
        client.bridge_up = bool(hello["bridge_up"])
        client.rests = {str(k): float(v) for k, v in hello["rests"].items()}
        return client

    async def call(self, op: str, **args: Any) -> Any:
        if self._writer.is_closing():
            raise ConnectionError("the worker hub connection is closed")
        self._next_id += 1
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._waiting[self._next_id] = future
        self._writer.write(json.dumps({"id": self._next_id, "op": op, **args}).encode() + b"\n")
        return await future

    def send(self, op: str, **args: Any) -> None:
        """An op without an answer."""
        if not self._writer.is_closing():
            self._writer.write(json.dumps({"op": op, **args}).encode() + b"\n")

    async def _read(self) -> None:
        try:
            while line := await self._reader.readline():
                message = json.loads(line)
                if "id" in message:
                    future = self._waiting.pop(int(message["id"]), None)
                    if future is not None and not future.done():
                        future.set_result(message.get("r"))
                else:
                    self._pushed(message)
        except (ConnectionError, ValueError) as exc:
            log.error("worker hub connection failed: %s", exc)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ConnectionError("the worker hub connection is closed"))
            self._waiting.clear()
            self._writer.close()

    def _pushed(self, message: dict[str, Any]) -> None:
        kind = message.get("push")
        if kind == "rest":
            self.rests[str(message["deployment"])] = float(message["until"])
        elif kind == "invalidate" and self.on_invalidate is not None:
            key_id = message.get("key_id")
            self.on_invalidate(None if key_id is None else str(key_id))
        elif kind == "bridge":
            self.bridge_up = bool(message["up"])
            if self.on_bridge is not None:
                task = asyncio.create_task(self.on_bridge(self.bridge_up))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    async def aclose(self) -> None:
        self._writer.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                await self._task


class HubCounters:
    """`server.limits.counters.Counters` kept by the hub: one set for every worker."""

    def __init__(self, client: HubClient) -> None:
        self._client = client

    async def admit(self, counters: Sequence[Counter], member: str, lease_ms: int) -> Verdict:
        admitted, refused, wait, states = await self._client.call(
            "admit", counters=_counters_to_wire(counters), member=member, lease_ms=lease_ms
        )
        return Verdict(bool(admitted), int(refused), int(wait), tuple(CounterState(int(r), int(s)) for r, s in states))

    async def settle(self, counters: Sequence[Counter], member: str, token_deltas: Sequence[int]) -> None:
        await self._client.call(
            "settle", counters=_counters_to_wire(counters), member=member, deltas=list(token_deltas)
        )

    async def renew(self, held: dict[str, Sequence[Counter]], lease_ms: int) -> None:
        await self._client.call("renew", held={m: _counters_to_wire(c) for m, c in held.items()}, lease_ms=lease_ms)

    async def aclose(self) -> None:
        return None


class HubCooldowns:
    """`server.routing.cooldown.CooldownStore` kept by the hub (see the module docstring)."""

    def __init__(self, client: HubClient, config: CooldownConfig) -> None:
        self._client = client
        self._config = config
        self._successes: dict[str, int] = {}
        self._flusher: asyncio.Task[None] | None = None

    async def resting(self, deployments: Sequence[str]) -> dict[str, float]:
        now = time.monotonic()
        rests = self._client.rests
        return {d: rests[d] - now for d in deployments if d in rests and rests[d] > now}

    async def failure(
        self, deployment: str, *, retry_after_s: float | None = None, rate_limited: bool = False
    ) -> float | None:
        if not self._config.enabled:
            return None
        self._flush()
        try:
            rest = await self._client.call(
                "failure", deployment=deployment, retry_after_s=retry_after_s, rate_limited=rate_limited
            )
        except ConnectionError:  # the supervisor is going away; routing never fails for this
            return None
        return None if rest is None else float(rest)

    async def success(self, deployment: str) -> None:
        if not self._config.enabled:
            return
        self._successes[deployment] = self._successes.get(deployment, 0) + 1
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush_soon(), name="cooldown-success-flush")

    async def _flush_soon(self) -> None:
        await asyncio.sleep(SUCCESS_FLUSH_S)
        self._flush()

    def _flush(self) -> None:
        if self._successes:
            counts, self._successes = self._successes, {}
            self._client.send("successes", counts=counts)

    async def aclose(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
        self._flush()


# The worker that sweeps expired reservations and re-checks invalid credentials for
# every worker of its `serve` (server.app.start_gateway).
DUTY_WORKER = 0


@dataclass(frozen=True)
class WorkerRole:
    """What makes a gateway process worker `index` of `serve --workers N`."""

    index: int
    socket: Path
    hub: HubClient

    @property
    def keeps_shared_duties(self) -> bool:
        """Worker 0 runs the background work one process does for all (see
        `server.app.start_gateway`); restarted with the same index, it resumes it."""
        return self.index == DUTY_WORKER
