"""`python -m tests.bench.conversation [--turns N] [--postgres URL]`: what keeping
conversation state in the database costs a turn, and what stored credentials as
deployments cost a call.

- Anthropic: a tool-calling turn with thinking stores its blocks (one write, at the
  end of the answer); the next request reads them back (one read, before the upstream
  call). Printed: p50 / p99 of each, with a 4 kB thinking block, on SQLite (a file in a
  temporary folder) and, with `--postgres`, on PostgreSQL.
- The plan expansion every routed call makes (`with_credentials`) with two stored
  credentials, from the vault's cache, against the same call without a vault.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from server.accounts.credentials import CredentialVault
from server.api.credential_deployments import with_credentials
from server.config import GatewayConfig, ProviderConfig
from server.providers.anthropic_turns import ThinkingTurns
from server.providers.base import Capability, ChatCompletions
from server.providers.registry import build_provider
from server.providers.transport import Transport
from server.routing.router import Router
from server.storage import Database
from server.storage.conversation import DatabaseConversationStore


def _ms(samples: list[float]) -> str:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p99 {p99 * 1000:.2f} ms"


async def bench_turns(url: str, turns: int) -> None:
    db = await Database.open(url, migrate=True)
    try:
        store = ThinkingTurns(DatabaseConversationStore(db))
        thought = "x" * 4096
        writes, reads = [], []
        for n in range(turns):
            call_id = f"toolu_bench_{os.urandom(8).hex()}_{n}"
            blocks: list[dict[str, Any]] = [
                {"type": "thinking", "thinking": thought, "signature": "s" * 300},
                {"type": "tool_use", "id": call_id, "name": "f", "input": {"a": n}},
            ]
            started = time.perf_counter()
            await store.remember(blocks)
            writes.append(time.perf_counter() - started)
            call = {"id": call_id, "type": "function", "function": {"name": "f", "arguments": f'{{"a": {n}}}'}}
            started = time.perf_counter()
            recall = await store.recall_for({"messages": [{"role": "assistant", "tool_calls": [call]}]})
            reads.append(time.perf_counter() - started)
            assert recall.recall(blocks[1:]) == blocks
        print(f"{db.backend}: store a thinking turn {_ms(writes)}; read it back {_ms(reads)} ({turns} turns)")
    finally:
        await db.close()


async def bench_expansion(folder: Path, calls: int) -> None:
    db = await Database.open(f"sqlite:///{folder / 'vault.db'}", migrate=True)
    try:
        vault = CredentialVault(db, os.urandom(32), cache_ttl_s=3600)
        for n in range(2):
            await vault.add("openai", f"sk-bench-{n}-" + base64.b16encode(os.urandom(16)).decode())
        config = GatewayConfig(providers={"openai": ProviderConfig(api_key="sk-x", base_url="http://127.0.0.1:9")})
        async with Transport() as transport:
            providers = {name: build_provider(name, cfg, transport) for name, cfg in config.providers.items()}
        plan = Router(config, providers).plan("openai/gpt-4o-mini", Capability.CHAT, ChatCompletions)
        for label, source in (("no vault", None), ("2 stored credentials", vault)):
            await with_credentials(plan, source)
            started = time.perf_counter()
            for _ in range(calls):
                await with_credentials(plan, source)
            per_call = (time.perf_counter() - started) / calls
            print(f"plan expansion, {label}: {per_call * 1e6:.1f} us per call ({calls} calls)")
    finally:
        await db.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--turns", type=int, default=300)
    parser.add_argument("--postgres", default=None, help="a PostgreSQL URL (a database the bench may write to)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        await bench_turns(f"sqlite:///{Path(folder) / 'turns.db'}", args.turns)
        if args.postgres:
            await bench_turns(args.postgres, args.turns)
        await bench_expansion(Path(folder), 20_000)


if __name__ == "__main__":
    asyncio.run(main())
