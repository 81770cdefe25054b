"""One measured phase: wrk against one target at one concurrency, with the CPU time
each process of the stack spent meanwhile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tests.bench import procstat, reuse, wrk
from tests.bench.stack import Stack

CHAT_MESSAGES = [{"role": "user", "content": "Say hello in one short sentence."}]
FAKE_CONTENT = '"content":"Hello! How can I help you today?"'


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    request: wrk.Request


@dataclass(frozen=True)
class Phase:
    target: Target
    connections: int
    result: wrk.Result
    # CPU seconds spent during the run; None when the process could not be found.
    cpu_s: dict[str, float | None]
    gateway_rss: int
    # Connections the fake upstream accepted during the run: about `connections` for (c)
    # (wrk connects afresh), about 0 for (b) and (d) once the gateway's pool is warm.
    fake_connections: int | None


def targets(stack: Stack) -> list[Target]:
    key = stack.api_key
    chat = json.dumps({"model": "json/gpt-4o-mini", "messages": CHAT_MESSAGES, "max_tokens": 32})
    stream = json.dumps({"model": "sse/gpt-4o-mini", "messages": CHAT_MESSAGES, "max_tokens": 32, "stream": True})
    bridge_chat = f"{stack.rest_url}/v1/chat/completions"
    fake_chat = f"{stack.fake_url}/v1/chat/completions"
    return [
        Target("a", "GET /status via bridge", wrk.Request(f"{stack.rest_url}/status", '"available":true', api_key=key)),
        Target("b", "chat via bridge+gRPC", wrk.Request(bridge_chat, FAKE_CONTENT, "POST", chat, key)),
        Target("c", "chat, fake directly", wrk.Request(fake_chat, FAKE_CONTENT, "POST", chat)),
        # [DONE] comes last: seeing it proves the whole stream crossed the bridge.
        Target("d", "stream via bridge+gRPC", wrk.Request(bridge_chat, "data: [DONE]", "POST", stream, key)),
    ]


def _pids(stack: Stack) -> dict[str, int | None]:
    return {"gateway": stack.gateway_pid, "bridge": stack.bridge_pid, "fake": stack.fake_pid}


def _cpu(pids: dict[str, int | None]) -> dict[str, float | None]:
    return {name: None if pid is None else procstat.cpu_seconds(pid) for name, pid in pids.items()}


async def measure(stack: Stack, target: Target, script: Path, wrk_path: str, connections: int, seconds: float) -> Phase:
    pids = _pids(stack)
    cx_before, before = await reuse.fake_connections(stack), _cpu(pids)
    result = await wrk.run(wrk_path, target.request.url, script, connections=connections, seconds=seconds)
    after, cx_after = _cpu(pids), await reuse.fake_connections(stack)
    spent = {name: _delta(before[name], after[name]) for name in pids}
    new_cx = None if cx_before is None or cx_after is None else cx_after - cx_before
    return Phase(target, connections, result, spent, procstat.rss_bytes(stack.gateway_pid), new_cx)


def _delta(before: float | None, after: float | None) -> float | None:
    return None if before is None or after is None else after - before
