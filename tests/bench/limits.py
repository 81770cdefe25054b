"""`python -m tests.bench.limits [--calls N] [--concurrency C]`: what the rate limiter
costs a call, against a private redis-server (started here on a free port, so that the
command counts are this run's alone) and in process.

Each call goes through six counters (RPM, TPM and concurrency on a key and on its
owner), as the meter runs it: admit before the call, settle after. Prints the latency
of admit + settle per call (p50, p99) and the client commands Redis received per call
(INFO commandstats, leaving out what the scripts run inside Redis): 2.0 means one round
trip to admit through all six limits and one to settle.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from server.limits.limiter import Limiter, open_limiter
from server.limits.rules import LimitRule, LimitStore
from server.storage import Database
from server.storage.settings import StorageSettings

INSIDE_SCRIPTS = {"time", "get", "set", "del", "pexpire", "zadd", "zrem", "zcard", "zremrangebyscore"}
CONNECTION_SETUP = {"hello", "client|setinfo", "ping", "select", "info", "config|resetstat"}
BIG = 10**9


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_cli(port: int, *args: str) -> str:
    return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True, check=True).stdout


def _client_commands(port: int) -> int:
    total = 0
    for line in _redis_cli(port, "info", "commandstats").splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line.removeprefix("cmdstat_").partition(":")
            if name not in INSIDE_SCRIPTS | CONNECTION_SETUP:
                total += int(stats.split(",")[0].removeprefix("calls="))
    return total


async def _limiter(folder: Path, redis_url: str | None) -> tuple[Limiter, Database, str, str]:
    db = await Database.open_with(StorageSettings(data_dir=folder))
    from server.accounts.keys import KeyStore
    from server.accounts.owners import ensure_owner

    owner = await ensure_owner(db, "user", "bench")
    record, _ = await KeyStore(db).create_key(owner.id, "bench")
    store = LimitStore(db, cache_ttl_s=60)
    await store.set(LimitRule("key", record.id, rpm=BIG, tpm=BIG, concurrency=BIG))
    await store.set(LimitRule("owner", owner.id, rpm=BIG, tpm=BIG, concurrency=BIG))
    limiter = open_limiter(store, redis_url, on_redis_failure="closed", budget_s=5.0)
    return limiter, db, record.id, owner.id


async def _run(limiter: Limiter, key_id: str, owner_id: str, calls: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            admission = await limiter.admit(key_id, owner_id, "openai/gpt-4o-mini", None, 500)
            assert admission is not None
            await admission.finish(120)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _report(label: str, latencies: list[float], commands: int | None, calls: int) -> None:
    ordered = sorted(latencies)
    p50 = statistics.median(ordered) * 1000
    p99 = ordered[int(len(ordered) * 0.99) - 1] * 1000
    per_call = f"{commands / calls:.2f}" if commands is not None else "-"
    print(f"  {label:<28} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  Redis commands/call {per_call}")


def _start_redis(port: int, folder: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        cwd=folder,
        stdout=subprocess.DEVNULL,
    )


async def main(calls: int, concurrency: int) -> None:
    port = _free_port()
    with tempfile.TemporaryDirectory() as folder:
        server = _start_redis(port, folder)
        try:
            while True:
                try:
                    if _redis_cli(port, "ping").strip() == "PONG":
                        break
                except subprocess.CalledProcessError:
                    pass
                await asyncio.sleep(0.05)
            print(f"rate limiter: {calls} calls through 6 limits (key + owner: RPM, TPM, concurrency)")
            for label, url in (("Redis", f"redis://127.0.0.1:{port}/0"), ("in process", None)):
                limiter, db, key_id, owner_id = await _limiter(Path(folder) / label.replace(" ", "-"), url)
                for level in sorted({1, concurrency}):
                    await _run(limiter, key_id, owner_id, 50, level)  # warm-up: scripts, pool, rules cache
                    _redis_cli(port, "config", "resetstat")
                    latencies = await _run(limiter, key_id, owner_id, calls, level)
                    commands = _client_commands(port) if url else None
                    _report(f"{label}, concurrency {level}", latencies, commands, calls)
                await limiter.aclose()
                await db.close()
        finally:
            server.terminate()
            server.wait(10)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="python -m tests.bench.limits", description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    asyncio.run(main(args.calls, args.concurrency))
