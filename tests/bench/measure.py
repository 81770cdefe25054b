"""One measured phase: wrk against one target at one concurrency, with the CPU time and
memory of the target's processes meanwhile.

The figures are those of a window of whole seconds after the run has settled, not of
the whole run. wrk closes the loop at a fixed number of connections: its first answers
come one latency after the start, and the answers still in flight when it stops are
dropped, so "requests / duration" undercounts a target by about its connections /
(req/s x duration). For a fast target that is a few percent; for one whose latency is
seconds (LiteLLM streaming at 64 connections: 4.6 s) it is more than half of what it
does. Here wrk runs `settle_s` + the window + 1 s; it counts answers by wall-clock
second (wrk.py), the target's CPU is read at the window's two edges, and both come from
the window alone. A target whose median latency is more than half of `settle_s` is
measured again with a settling time of twice its median."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tests.bench import procstat, wrk

CHAT_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
FAKE_CONTENT = '"content":"Hello! How can I help you today?"'
DONE = "data: [DONE]"


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    request: wrk.Request
    # The processes whose CPU and memory count (read at the start of each run).
    pids: Callable[[], list[int]]
    # The key of the target whose latency this one adds to ("" for none).
    baseline: str = ""
    # Other processes whose CPU counts too, not their memory (PostgreSQL's backends
    # serving the target), read at the start of the measured window.
    also_cpu: Callable[[], list[int]] | None = None


@dataclass(frozen=True)
class Phase:
    target: Target
    connections: int
    result: wrk.Result
    cpu_s: float
    rss_bytes: int
    # Cores the whole machine kept busy meanwhile (wrk, the fake and anything else
    # included): near the core count, a second worker has nothing left to use.
    machine_busy_cores: float = 0.0
    # Of cpu_s, what the target's `also_cpu` processes took (PostgreSQL's backends).
    also_cpu_s: float = 0.0

    @property
    def cpu_ms_per_request(self) -> float:
        return 1e3 * self.cpu_s / max(self.result.requests, 1)


def chat_body(model: str, stream: bool = False) -> str:
    body: dict[str, object] = {"model": model, "messages": CHAT_MESSAGES, "max_tokens": 32}
    if stream:
        body["stream"] = True
    return json.dumps(body)


def fake_targets(fake_url: str, fake_pid: int | None) -> list[Target]:
    pids = (lambda: [fake_pid]) if fake_pid else list
    return [
        Target(
            "fake",
            "fake directly: chat",
            wrk.Request(f"{fake_url}/v1/chat/completions", FAKE_CONTENT, "POST", chat_body("x")),
            pids,
        ),
        Target(
            "fake-sse",
            "fake directly: SSE 20 chunks",
            wrk.Request(f"{fake_url}/sse/v1/chat/completions", DONE, "POST", chat_body("x", True)),
            pids,
        ),
    ]


def gateway_targets(
    name: str,
    url: str,
    key: str,
    pids: Callable[[], list[int]],
    *,
    status: bool,
    label: str | None = None,
    also_cpu: Callable[[], list[int]] | None = None,
) -> list[Target]:
    chat_url = f"{url}/v1/chat/completions"
    found = []
    if status:
        found.append(
            Target(
                f"{name}-status",
                f"{name}: trivial RPC (GET /status)",
                wrk.Request(f"{url}/status", '"available":true'),
                pids,
            )
        )
    found += [
        Target(
            f"{name}-chat",
            f"{label or name}: chat",
            wrk.Request(chat_url, FAKE_CONTENT, "POST", chat_body("json/gpt-4o-mini"), key),
            pids,
            "fake",
            also_cpu,
        ),
        # [DONE] comes last: seeing it proves the whole stream crossed the gateway.
        Target(
            f"{name}-sse",
            f"{label or name}: SSE 20 chunks",
            wrk.Request(chat_url, DONE, "POST", chat_body("sse/gpt-4o-mini", True), key),
            pids,
            "fake-sse",
            also_cpu,
        ),
    ]
    return found


def litellm_targets(url: str, key: str, pids: Callable[[], list[int]]) -> list[Target]:
    chat_url = f"{url}/v1/chat/completions"
    return [
        Target(
            "litellm-chat",
            "litellm-1w: chat",
            wrk.Request(chat_url, FAKE_CONTENT, "POST", chat_body("gpt-4o-mini"), key),
            pids,
            "fake",
        ),
        Target(
            "litellm-sse",
            "litellm-1w: SSE 20 chunks",
            wrk.Request(chat_url, DONE, "POST", chat_body("gpt-4o-mini-stream", True), key),
            pids,
            "fake-sse",
        ),
    ]


def _cpu_by_pid(pids: list[int]) -> dict[int, float]:
    found = {}
    for pid in pids:
        with contextlib.suppress(OSError, ValueError, IndexError):
            found[pid] = procstat.cpu_seconds(pid)
    return found


async def measure(
    target: Target, script: Path, wrk_path: str, connections: int, seconds: float, *, settle_s: float = 2.0
) -> Phase:
    """`seconds` (whole) of steady load, after `settle_s` (see the module's docstring)."""
    phase = await _measure_window(target, script, wrk_path, connections, seconds, settle_s)
    needed = math.ceil(2 * phase.result.p50_s)
    if needed > settle_s:
        phase = await _measure_window(target, script, wrk_path, connections, seconds, needed)
    return phase


async def _measure_window(
    target: Target, script: Path, wrk_path: str, connections: int, seconds: float, settle_s: float
) -> Phase:
    pids = target.pids()
    extra: list[int] = []
    window = max(1, round(seconds))
    started = time.time()
    first = math.ceil(started + settle_s)
    marks: dict[int, tuple[float, float, float]] = {}
    extra_marks: dict[int, dict[int, float]] = {}

    async def mark(second: int) -> None:
        await asyncio.sleep(max(0.0, second - time.time()))
        if second == first and target.also_cpu is not None:
            # Once the load has settled: a pool opens its connections under load.
            extra.extend(await asyncio.to_thread(target.also_cpu))
        marks[second] = (procstat.tree_cpu_seconds(pids), *procstat.machine_cpu_seconds())
        extra_marks[second] = _cpu_by_pid(extra)

    marking = [asyncio.create_task(mark(edge)) for edge in (first, first + window)]
    # Long enough that the window's last second ends before wrk stops (wrk starts after `started`).
    try:
        result = await wrk.run(
            wrk_path, target.request.url, script, connections=connections, seconds=math.ceil(settle_s) + window + 1
        )
        await asyncio.gather(*marking)
    finally:
        for task in marking:
            task.cancel()
    (cpu_0, busy_0, all_0), (cpu_1, busy_1, all_1) = marks[first], marks[first + window]
    requests = sum(result.per_second.get(second, 0) for second in range(first, first + window))
    counted = dataclasses.replace(result, requests=requests, seconds=float(window), rps=requests / window)
    busy = (os.cpu_count() or 1) * (busy_1 - busy_0) / max(all_1 - all_0, 1e-9)
    # A PostgreSQL backend that exits in the window (its pool closed the connection)
    # would count its CPU so far as negative: only those there at both ends count.
    before, after = extra_marks[first], extra_marks[first + window]
    also = sum(after[pid] - before[pid] for pid in before.keys() & after.keys())
    rss = procstat.tree_rss_bytes(target.pids())
    return Phase(target, connections, counted, cpu_1 - cpu_0 + also, rss, busy, also)
