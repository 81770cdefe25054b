"""One measured phase: wrk against one target at one concurrency, with the CPU time and
memory of the target's processes meanwhile."""

from __future__ import annotations

import json
import os
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
    name: str, url: str, key: str, pids: Callable[[], list[int]], *, status: bool, label: str | None = None
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
        ),
        # [DONE] comes last: seeing it proves the whole stream crossed the gateway.
        Target(
            f"{name}-sse",
            f"{label or name}: SSE 20 chunks",
            wrk.Request(chat_url, DONE, "POST", chat_body("sse/gpt-4o-mini", True), key),
            pids,
            "fake-sse",
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


async def measure(target: Target, script: Path, wrk_path: str, connections: int, seconds: float) -> Phase:
    pids = target.pids()
    before = procstat.tree_cpu_seconds(pids)
    busy_before, all_before = procstat.machine_cpu_seconds()
    result = await wrk.run(wrk_path, target.request.url, script, connections=connections, seconds=seconds)
    spent = procstat.tree_cpu_seconds(pids) - before
    busy_after, all_after = procstat.machine_cpu_seconds()
    cores = os.cpu_count() or 1
    busy = cores * (busy_after - busy_before) / max(all_after - all_before, 1e-9)
    return Phase(target, connections, result, spent, procstat.tree_rss_bytes(target.pids()), busy)
