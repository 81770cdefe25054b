"""`python -m tests.bench.credit_windows [--calls N] [--concurrency C] [--postgres URL]`:
what credit limits per day and month cost a call's credit reservation.

Each call reserves and settles as the meter and the ledger do (`reserve`, then `settle`)
for one key, without credit windows (the baseline: balance and key cap) and with two
(the key's daily and its owner's monthly credits), in alternating rounds of one run. Prints
p50 / p99 of reserve + settle and the ratio to the baseline, on SQLite (a temporary
file) and on PostgreSQL (a temporary database on the server of `--postgres`, default
postgres@127.0.0.1:5432; skipped when unreachable).
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg  # type: ignore[import-untyped]
from sqlalchemy.engine import make_url

from server.accounts.credits import CreditService
from server.accounts.keys import KeyStore
from server.accounts.owners import ensure_owner
from server.limits.windows import CreditWindow
from server.storage import Database

CREDIT = 1_000_000


@asynccontextmanager
async def _postgres(url: str) -> AsyncIterator[str | None]:
    try:
        admin = await asyncpg.connect(url, timeout=5)
    except (OSError, asyncpg.PostgresError):
        yield None
        return
    name = f"aigne_bench_{secrets.token_hex(4)}"
    await admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _run(db: Database, calls: int, concurrency: int, windowed: bool) -> list[float]:
    owner = (await ensure_owner(db, "user", f"bench-{secrets.token_hex(3)}")).id
    key, _ = await KeyStore(db).create_key(owner, "bench")
    credits = CreditService(db, billing_enabled=True)
    await credits.grant(owner, 10**9 * CREDIT)
    windows = (
        [
            CreditWindow("key", key.id, "*", "daily_credits", 10**9 * CREDIT),
            CreditWindow("owner", owner, "*", "monthly_credits", 10**9 * CREDIT),
        ]
        if windowed
        else []
    )
    latencies: list[float] = []
    queue = iter(range(calls))

    async def worker() -> None:
        for _ in queue:
            started = time.perf_counter()
            held = await credits.reserve(owner, CREDIT, key_id=key.id, windows=windows)
            await credits.settle(held, CREDIT // 2)
            latencies.append(time.perf_counter() - started)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _line(name: str, latencies: list[float], baseline: float | None) -> str:
    cuts = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies) * 1000, cuts[98] * 1000
    ratio = f"  x{p50 / baseline:.2f} of the baseline p50" if baseline else ""
    return f"  {name:<24} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms{ratio}"


async def _backend(label: str, url: str, calls: int, concurrency: int) -> None:
    db = await Database.open(url, migrate=True)
    plain: list[float] = []
    windowed: list[float] = []
    try:
        await _run(db, 50, 1, True)  # warm up: connections, compiled statements
        # Rounds of 50 calls, alternating which goes first: the machine's noise falls
        # on both alike.
        for round_ in range(max(calls // 50, 1)):
            for with_windows in (True, False) if round_ % 2 else (False, True):
                (windowed if with_windows else plain).extend(await _run(db, 50, concurrency, with_windows))
    finally:
        await db.close()
    print(f"{label}: {calls} calls, {concurrency} at a time, reserve + settle")
    print(_line("no credit windows", plain, None))
    print(_line("two credit windows", windowed, statistics.median(plain) * 1000))


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        await _backend("SQLite", f"sqlite:///{Path(folder) / 'bench.db'}", args.calls, args.concurrency)
    async with _postgres(args.postgres) as url:
        if url is None:
            print("PostgreSQL: unreachable, skipped")
        else:
            await _backend("PostgreSQL", url, args.calls, args.concurrency)


if __name__ == "__main__":
    asyncio.run(main())
