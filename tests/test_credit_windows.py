"""Credit limits per UTC day and calendar month (issue 10: spend windows), enforced in
the database beside the balance (server.limits.windows).

Library tests run on SQLite and PostgreSQL (tests/storage_fixtures.py); the server
tests run the real gRPC server (and Envoy for REST and the openai SDK) against the fake
OpenAI upstream, on both backends too. "Now" is set through `CreditService.clock`, so a
window resets without waiting a day.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
from sqlalchemy import select

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.credits import CreditService, Rate, credits_to_micros
from server.accounts.keys import KeyStore
from server.accounts.ledger import Ledger, UsageRecord
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import Settings
from server.errors import RateLimited
from server.limits.rules import LimitRule
from server.limits.windows import CreditWindow, WindowSpend, period_of, spend_of, windows_of
from server.storage import Database
from server.storage.schema import spend_windows, utcnow
from tests.conftest import FAKE_KEY, Bridge, gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors, chat_request, error_info
from tests.storage_fixtures import count_queries, database_url, db  # noqa: F401 - the fixtures

CREDIT = 1_000_000
# The gateway's credit clock is set by the tests; the ledger stamps records with the real
# time, from which a period's first call counts what was charged before. Moments two
# years back keep the two apart whatever day the suite runs (it failed on 2026-12-01,
# when the real day was the one the test moved its clock to).
NOON = datetime(2024, 11, 30, 12, 0, tzinfo=UTC)


def _at(moment: datetime) -> object:
    return lambda: moment


# -- periods -------------------------------------------------------------------------------


def test_periods_are_the_utc_day_and_the_calendar_month() -> None:
    day = period_of("daily_credits", datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC))
    assert (day.key, day.start, day.end) == (
        "day:2026-11-30",
        datetime(2026, 11, 30, tzinfo=UTC),
        datetime(2026, 12, 1, tzinfo=UTC),
    )
    december = period_of("monthly_credits", datetime(2026, 12, 31, 23, 0, tzinfo=UTC))
    assert (december.key, december.end) == ("month:2026-12", datetime(2027, 1, 1, tzinfo=UTC))
    february = period_of("monthly_credits", datetime(2028, 2, 10, tzinfo=UTC))
    assert (february.end - february.start) == timedelta(days=29), "a leap year's February"
    # Another time zone names the same UTC instant.
    local = datetime(2026, 12, 1, 1, 0, tzinfo=UTC).astimezone(__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
    assert period_of("daily_credits", local).key == "day:2026-12-01"


def test_a_rules_windows_apply_to_the_models_its_glob_matches() -> None:
    rules = [
        LimitRule("key", "k1", "openai/*", daily_credits_micros=5 * CREDIT),
        LimitRule("owner", "user:a", "*", rpm=10, monthly_credits_micros=50 * CREDIT),
    ]
    assert {(w.scope, w.kind) for w in windows_of(rules, "openai/gpt-4o")} == {
        ("key", "daily_credits"),
        ("owner", "monthly_credits"),
    }
    assert [w.kind for w in windows_of(rules, "anthropic/claude")] == ["monthly_credits"]


# -- the library ---------------------------------------------------------------------------


async def _owner_and_key(db: Database, name: str) -> tuple[str, str]:  # noqa: F811
    owner = (await ensure_owner(db, "user", name)).id
    key, _ = await KeyStore(db).create_key(owner, "k")
    return owner, key.id


async def _spend(db: Database, window: CreditWindow, now: datetime) -> WindowSpend:  # noqa: F811
    async with db.read() as conn:
        return (await spend_of(conn, [window], now))[window]


async def test_a_window_holds_reservations_and_counts_the_charge(db: Database) -> None:  # noqa: F811
    owner, key = await _owner_and_key(db, "windowed")
    credits = CreditService(db, billing_enabled=True)
    credits.clock = _at(NOON)  # type: ignore[assignment]
    await credits.grant(owner, 100 * CREDIT)
    daily = CreditWindow("key", key, "*", "daily_credits", 3 * CREDIT)
    first = await credits.reserve(owner, 2 * CREDIT, key_id=key, windows=[daily])
    assert await _spend(db, daily, NOON) == WindowSpend(0, 2 * CREDIT)
    with pytest.raises(RateLimited) as refused:
        await credits.reserve(owner, 2 * CREDIT, key_id=key, windows=[daily])
    assert refused.value.metadata["limit_kind"] == "daily_credits"
    assert refused.value.retry_after_seconds == 12 * 3600, "until midnight UTC"
    assert "alone exceeds" not in refused.value.message
    with pytest.raises(RateLimited, match="this call's worst case alone exceeds the limit: lower max_tokens"):
        await credits.reserve(owner, 4 * CREDIT, key_id=key, windows=[daily])
    balance = await credits.balance(owner)
    assert balance.reserved_micros == 2 * CREDIT, "a refused call holds nothing, not even of the balance"
    assert await credits.settle(first, CREDIT // 2) == CREDIT // 2
    assert await _spend(db, daily, NOON) == WindowSpend(CREDIT // 2, 0)
    second = await credits.reserve(owner, 2 * CREDIT, key_id=key, windows=[daily])
    assert await credits.settle(second, 5 * CREDIT) == 2 * CREDIT, "charged at most the reservation"
    assert await _spend(db, daily, NOON) == WindowSpend(CREDIT * 5 // 2, 0)
    # The next day is a new window; yesterday's spend stays where it was.
    tomorrow = NOON + timedelta(days=1)
    credits.clock = _at(tomorrow)  # type: ignore[assignment]
    third = await credits.reserve(owner, 2 * CREDIT, key_id=key, windows=[daily])
    await credits.release(third)
    assert await _spend(db, daily, tomorrow) == WindowSpend(0, 0)
    assert await _spend(db, daily, NOON) == WindowSpend(CREDIT * 5 // 2, 0)
    # Past periods are pruned once untouched for longer than any month; a held one never.
    held = await credits.reserve(owner, CREDIT, key_id=key, windows=[daily])
    assert await credits.prune_spend_windows(now=datetime.now(UTC) + timedelta(days=61)) == 0
    assert await credits.prune_spend_windows(now=datetime.now(UTC) + timedelta(days=63)) == 1
    assert await _spend(db, daily, tomorrow) == WindowSpend(0, CREDIT), "the held window stays"
    await credits.release(held)


async def test_a_window_costs_one_update_per_call_to_reserve_and_one_to_settle(db: Database) -> None:  # noqa: F811
    owner, key = await _owner_and_key(db, "counted")
    credits = CreditService(db, billing_enabled=True)
    await credits.grant(owner, 100 * CREDIT)
    daily = CreditWindow("key", key, "*", "daily_credits", 50 * CREDIT)
    await credits.settle(await credits.reserve(owner, CREDIT, key_id=key, windows=[daily]), 0)  # the day's row
    with count_queries(db) as plain:
        await credits.settle(await credits.reserve(owner, CREDIT, key_id=key), CREDIT)
    with count_queries(db) as windowed:
        await credits.settle(await credits.reserve(owner, CREDIT, key_id=key, windows=[daily]), CREDIT)
    assert len(windowed) - len(plain) == 2, (plain, windowed)
    assert sum("spend_windows" in statement for statement in windowed) == 2


async def test_the_ledger_settles_windows_with_the_record_and_a_dead_calls_hold_expires(
    db: Database,  # noqa: F811
) -> None:
    owner, key = await _owner_and_key(db, "ledgered")
    credits = CreditService(db, billing_enabled=True, reservation_lease_s=1)
    credits.clock = _at(NOON)  # type: ignore[assignment]
    ledger = Ledger(db, credits=credits)
    await credits.grant(owner, 100 * CREDIT)
    monthly = CreditWindow("owner", owner, "openai/*", "monthly_credits", 10 * CREDIT)
    recorded = await credits.reserve(owner, CREDIT, key_id=key, windows=[monthly])
    record = UsageRecord("req-window", "openai", "openai/m", key_id=key, owner_id=owner, cost_micros=CREDIT // 4)
    assert (await ledger.record(record, reservation=recorded)).credits_micros == CREDIT // 4
    dead = await credits.reserve(owner, 4 * CREDIT, key_id=key, windows=[monthly])
    assert dead.id is not None
    credits.forget(dead.id)  # its process died mid-call
    assert await _spend(db, monthly, NOON) == WindowSpend(CREDIT // 4, 4 * CREDIT)
    assert await credits.release_expired(now=datetime.now(UTC) + timedelta(seconds=60)) == 1
    assert await _spend(db, monthly, NOON) == WindowSpend(CREDIT // 4, 0), "the lapsed hold came back"


async def test_concurrent_reservations_on_two_replicas_never_overshoot_a_window(
    db: Database,  # noqa: F811
    database_url: str,  # noqa: F811
) -> None:
    owner, key = await _owner_and_key(db, "racing")
    other = await Database.open(database_url, migrate=False)
    try:
        replicas = [CreditService(db, billing_enabled=True), CreditService(other, billing_enabled=True)]
        for replica in replicas:
            replica.clock = _at(NOON)  # type: ignore[assignment]
        await replicas[0].grant(owner, 1000 * CREDIT)
        daily = CreditWindow("owner", owner, "*", "daily_credits", 10 * CREDIT)

        async def call(replica: CreditService) -> bool:
            try:
                held = await replica.reserve(owner, CREDIT, key_id=key, windows=[daily])
            except RateLimited:
                return False
            await asyncio.sleep(0.01)
            await replica.settle(held, CREDIT)
            return True

        results = await asyncio.gather(*(call(replicas[i % 2]) for i in range(40)))
        assert sum(results) == 10 and (await _spend(db, daily, NOON)).spent_micros == 10 * CREDIT
        async with db.read() as conn:
            row = (await conn.execute(select(spend_windows))).one()
        assert (row.spent_micros, row.reserved_micros, row.period) == (10 * CREDIT, 0, "day:2024-11-30")
    finally:
        await other.close()


# -- through the server --------------------------------------------------------------------

# Input 0.1 credit a token, output 1: a chat call of openai/gpt-4o-mini with max_tokens=2
# reserves 4 credits (20 tokens for its request's size, plus 2 output; openai/slow: 3.7)
# and is charged 2.1 (the fake's usage: 1 in, 2 out). So one at a time, a window of
# 5 credits serves 1 call, 7 serves 2, 9 serves 3, 11 serves 4.
RATE = Rate(
    "openai/*", input_per_million_micros=credits_to_micros(100_000), output_per_million_micros=credits_to_micros(10**6)
)
CHARGE = CREDIT * 21 // 10
LATE = datetime(2024, 11, 30, 23, 58, 30, tzinfo=UTC)  # 90 s before the day (and the month) ends


@pytest.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    """An upstream of this module's own (its "slow" model keeps calls in flight)."""
    async with FakeOpenAI(api_key=FAKE_KEY) as fake:
        yield fake


async def _gateway(url: str, upstream: FakeOpenAI, now: datetime = NOON) -> Gateway:
    if url.startswith("postgresql"):
        await (await Database.open(url, migrate=True)).close()
    gateway = await start_gateway(
        Settings(grpc_port=0, database_url=url, billing_enabled=True, key_cache_ttl_s=0),
        gateway_config(upstream.base_url),
    )
    await gateway.accounts.credits.set_rate(RATE)
    gateway.accounts.credits.clock = _at(now)  # type: ignore[assignment]
    return gateway


async def _funded_key(gateway: Gateway, owner: str | None = None) -> tuple[str, str, str]:
    """(owner, key id, secret) of a new key whose owner has 1000 credits."""
    if owner is None:
        owner = (await ensure_owner(gateway.accounts.db, "user", f"w-{uuid.uuid4().hex[:8]}")).id
        await gateway.accounts.credits.grant(owner, 1000 * CREDIT)
    record, secret = await gateway.accounts.keys.create_key(owner, "windowed")
    return owner, record.id, secret


async def _limit(gateway: Gateway, rule: LimitRule) -> None:
    assert gateway.accounts.limiter is not None
    await gateway.accounts.limiter.store.set(rule)


async def _chats(port: int, secret: str, calls: int, model: str = "openai/gpt-4o-mini") -> list[object]:
    """`calls` chat calls at once; each result is the reply or the AioRpcError."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(secret)) as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        return await asyncio.gather(
            *(stub.CreateChatCompletion(chat_request(model, max_tokens=2), timeout=60) for _ in range(calls)),
            return_exceptions=True,
        )


def _served(results: list[object]) -> tuple[int, list[grpc.aio.AioRpcError]]:
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    served = sum(isinstance(r, chat_pb.CreateChatCompletionResponse) for r in results)
    assert served + len(refused) == len(results), [r for r in results if isinstance(r, Exception)][:3]
    return served, refused


async def _until_refused(port: int, secret: str, model: str = "openai/gpt-4o-mini") -> int:
    """Calls one at a time until one is refused; how many were served."""
    for served in range(100):
        if _served(await _chats(port, secret, 1, model))[1]:
            return served
    raise AssertionError("never refused")


async def test_50_concurrent_calls_on_two_replicas_never_take_a_daily_window_past_its_limit(
    database_url: str,  # noqa: F811
    upstream: FakeOpenAI,
) -> None:
    upstream.slow_seconds = 3.0  # every admitted call holds its reservation while the others try
    gateway = await _gateway(database_url, upstream, now=LATE)
    replica = await _gateway(database_url, upstream, now=LATE)  # a second gateway on the same database
    try:
        owner, key, secret = await _funded_key(gateway)
        limit = 10 * CHARGE  # room for 10 calls' charges, or 5 calls' reservations at once
        await _limit(gateway, LimitRule("key", key, daily_credits_micros=limit))
        halves = await asyncio.gather(
            _chats(gateway.port, secret, 25, "openai/slow"), _chats(replica.port, secret, 25, "openai/slow")
        )
        split = [_served(half) for half in halves]
        burst, refused = sum(s[0] for s in split), [e for s in split for e in s[1]]
        assert 1 <= burst <= 5 and len(refused) == 50 - burst, "the reservations alone stop the burst"
        error = refused[0]
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert dict(error_info(error).metadata) == {
            "scope": "key",
            "limit_kind": "daily_credits",
            "limit": "21",
            "window": "day",
            "window_seconds": "86400",
            "model": "*",
            "resets_at": "2024-12-01T00:00:00Z",
            "openai_type": "rate_limit_error",
        }
        assert dict(error.trailing_metadata() or ())["retry-after"] == "90", "the real wait until midnight UTC"
        assert "21 credits per UTC day on this key" in (error.details() or "")
        # One at a time, the window fills to within one reservation of its limit, never past it.
        one_by_one = await _until_refused(gateway.port, secret)
        served = burst + one_by_one
        window = CreditWindow("key", key, "*", "daily_credits", limit)
        spend = await _spend(gateway.accounts.db, window, LATE)
        assert spend.reserved_micros == 0 and spend.spent_micros == served * CHARGE
        assert limit - 4 * CREDIT < spend.spent_micros <= limit
        records = await gateway.accounts.ledger.records(key_id=key)
        assert sum(r.credits_micros for r in records) == spend.spent_micros, "the window counts what the ledger charged"
        outcomes = Counter((r.outcome, r.error_reason) for r in records)
        assert outcomes == {("ok", None): served, ("error", "RATE_LIMITED"): 50 - burst + 1}, "each refusal once"
        balance = await gateway.accounts.credits.balance(owner)
        assert (balance.balance_micros, balance.reserved_micros) == (1000 * CREDIT - spend.spent_micros, 0)
    finally:
        await replica.stop(0.5)
        await gateway.stop(0.5)


async def test_an_owner_window_holds_across_its_keys_and_a_glob_narrows_it(
    database_url: str,  # noqa: F811
    upstream: FakeOpenAI,
) -> None:
    gateway = await _gateway(database_url, upstream)
    try:
        owner, _, first = await _funded_key(gateway)
        _, _, second = await _funded_key(gateway, owner)
        limit = 11 * CREDIT
        await _limit(gateway, LimitRule("owner", owner, "openai/gpt-4o-mini", monthly_credits_micros=limit))
        served = 0
        for secret in (first, second, first, second, first, second):
            served += _served(await _chats(gateway.port, secret, 1))[0]
        assert served == 4, "four charges in all for the owner's two keys"
        refused = _served(await _chats(gateway.port, second, 1))[1]
        info = error_info(refused[0])
        assert (info.metadata["scope"], info.metadata["limit_kind"], info.metadata["window"]) == (
            "owner",
            "monthly_credits",
            "month",
        )
        assert info.metadata["model"] == "openai/gpt-4o-mini" and info.metadata["window_seconds"] == str(30 * 86400)
        assert _served(await _chats(gateway.port, first, 3, "openai/gpt-4o"))[0] == 3, "outside the glob: not limited"
        window = CreditWindow("owner", owner, "openai/gpt-4o-mini", "monthly_credits", limit)
        assert await _spend(gateway.accounts.db, window, NOON) == WindowSpend(4 * CHARGE, 0)
    finally:
        await gateway.stop(0.5)


async def test_windows_reset_at_midnight_utc_and_on_the_first_of_the_month(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = await _gateway(f"sqlite:///{tmp_path / 'hub.db'}", upstream, now=LATE)
    credits = gateway.accounts.credits
    try:
        _, key, secret = await _funded_key(gateway)
        await _limit(gateway, LimitRule("key", key, daily_credits_micros=7 * CREDIT, monthly_credits_micros=9 * CREDIT))
        assert await _until_refused(gateway.port, secret) == 2, "the daily limit is the tighter"
        credits.clock = _at(LATE + timedelta(seconds=89))  # 23:59:59: still the same day
        assert _served(await _chats(gateway.port, secret, 1))[0] == 0
        credits.clock = _at(datetime(2024, 12, 1, tzinfo=UTC))
        assert await _until_refused(gateway.port, secret) == 2, "a new day (and month), new windows"
        credits.clock = _at(datetime(2024, 12, 2, tzinfo=UTC))
        assert await _until_refused(gateway.port, secret) == 1, "2 charged on the 1st, of 3 for December"
        [error] = _served(await _chats(gateway.port, secret, 1))[1]
        assert error_info(error).metadata["limit_kind"] == "monthly_credits"
        assert dict(error.trailing_metadata() or ())["retry-after"] == str(30 * 86400), "until January 1st"
        credits.clock = _at(datetime(2025, 1, 1, 0, 0, 1, tzinfo=UTC))
        assert await _until_refused(gateway.port, secret) == 2, "January: the daily limit is the tighter again"
    finally:
        await gateway.stop(0.5)


async def test_a_limit_set_mid_day_counts_what_the_ledger_charged_that_day(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = await _gateway(f"sqlite:///{tmp_path / 'hub.db'}", upstream)
    gateway.accounts.credits.clock = utcnow  # the ledger's records carry the real time
    try:
        _, key, secret = await _funded_key(gateway)
        assert _served(await _chats(gateway.port, secret, 2))[0] == 2, "no limit yet: 4.2 credits charged"
        await _limit(gateway, LimitRule("key", key, "anthropic/*", daily_credits_micros=7 * CREDIT))
        assert _served(await _chats(gateway.port, secret, 1))[0] == 1, "another glob's window starts empty"
        await _limit(gateway, LimitRule("key", key, "openai/*", daily_credits_micros=9 * CREDIT))
        assert await _until_refused(gateway.port, secret) == 0, "6.3 charged today: no room for 4 more"
        window = CreditWindow("key", key, "openai/*", "daily_credits", 9 * CREDIT)
        assert await _spend(gateway.accounts.db, window, utcnow()) == WindowSpend(3 * CHARGE, 0)
    finally:
        await gateway.stop(0.5)


async def test_errors_cut_streams_and_shutdown_release_their_holds(upstream: FakeOpenAI, tmp_path: Path) -> None:
    gateway = await _gateway(f"sqlite:///{tmp_path / 'hub.db'}", upstream)
    stopped = False
    try:
        _, key, secret = await _funded_key(gateway)
        limit = 100 * CREDIT
        await _limit(gateway, LimitRule("key", key, daily_credits_micros=limit))
        window = CreditWindow("key", key, "*", "daily_credits", limit)
        [failed] = _served(await _chats(gateway.port, secret, 1, "openai/error-500"))[1]
        assert failed.code() != grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await _spend(gateway.accounts.db, window, NOON) == WindowSpend(0, 0), "a failed call costs nothing"

        upstream.chunk_delay = 0.3
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(secret)
        ) as channel:
            stream = chat_grpc.ChatServiceStub(channel).StreamChatCompletion(
                chat_request("openai/stream-slow", "one two three four five six", max_tokens=50)
            )
            await stream.read()
            assert (await _spend(gateway.accounts.db, window, NOON)).reserved_micros > 0, "held while it streams"
            stream.cancel()
        await _eventually(lambda: _spend(gateway.accounts.db, window, NOON), lambda s: s.reserved_micros == 0)
        records = await gateway.accounts.ledger.records(key_id=key)
        cut = next(r for r in records if r.outcome == "cancelled")
        assert 0 < cut.credits_micros == (await _spend(gateway.accounts.db, window, NOON)).spent_micros

        upstream.slow_seconds = 30.0
        pending = asyncio.ensure_future(_chats(gateway.port, secret, 2, "openai/slow"))
        await _eventually(lambda: _spend(gateway.accounts.db, window, NOON), lambda s: s.reserved_micros > 0)
        await gateway.stop(0.5)  # the calls in flight are ended by the shutdown
        stopped = True
        await asyncio.wait_for(pending, 30)
        reopened = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}", migrate=False)
        try:
            spend = await _spend(reopened, window, NOON)
            records = await Ledger(reopened).records(key_id=key)
        finally:
            await reopened.close()
        ended = [r.outcome for r in records if r.model == "openai/slow"]
        assert len(records) == 4 and len(ended) == 2 and "ok" not in ended, "both ended by the shutdown"
        assert spend.reserved_micros == 0, "nothing left held"
        assert spend.spent_micros == sum(r.credits_micros for r in records), "cut calls pay for their prompt"
    finally:
        upstream.chunk_delay = 0.0
        upstream.slow_seconds = 1.0
        if not stopped:
            await gateway.stop(0.5)


async def _eventually(read: Callable[[], Awaitable[WindowSpend]], check: Callable[[WindowSpend], bool]) -> None:
    deadline = asyncio.get_running_loop().time() + 20
    while not check(spend := await read()):
        assert asyncio.get_running_loop().time() < deadline, spend
        await asyncio.sleep(0.05)


async def test_the_openai_sdk_raises_rate_limit_error_with_the_wait_until_midnight(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    gateway = await _gateway(f"sqlite:///{tmp_path / 'hub.db'}", upstream, now=LATE)
    bridge: Bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        _, key, secret = await _funded_key(gateway)
        await _limit(gateway, LimitRule("key", key, daily_credits_micros=5 * CREDIT))
        client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0)
        messages: Any = [{"role": "user", "content": "hello"}]
        first = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=messages, max_tokens=2)
        assert first.choices[0].message.content
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="openai/gpt-4o-mini", messages=messages, max_tokens=2)
        assert caught.value.status_code == 429
        assert caught.value.response.headers["retry-after"] == "90"
        body: Any = caught.value.body
        assert body["code"] == "RATE_LIMITED" and body["type"] == "rate_limit_error"
        assert "credits per UTC day" in body["message"] and "2024-12-01T00:00:00Z" in body["message"]
        await client.close()
        records = await gateway.accounts.ledger.records(key_id=key)
        assert sorted((r.outcome, r.error_reason or "") for r in records) == [("error", "RATE_LIMITED"), ("ok", "")]
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"
ADMIN_TOKEN = "admin-" + "w" * 32


async def _cli(env: dict[str, str], *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout.decode(), stderr.decode()


async def test_spend_is_shown_beside_the_limit_and_bad_amounts_change_nothing(
    upstream: FakeOpenAI, tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    gateway = await start_gateway(
        Settings(grpc_port=0, database_url=url, billing_enabled=True, admin_token=ADMIN_TOKEN),
        gateway_config(upstream.base_url),
    )
    await gateway.accounts.credits.set_rate(RATE)
    bridge: Bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        _, key, secret = await _funded_key(gateway)
        assert _served(await _chats(gateway.port, secret, 2))[0] == 2
        async with httpx.AsyncClient(base_url=bridge.rest_url, headers=headers) as admin:
            answer = await admin.post("/admin/limits", json={"limit": {"key_id": key, "daily_credits": "9"}})
            assert answer.status_code == 200, answer.text
            shown = answer.json()["limit"]
            assert (shown["daily_credits"], shown["daily_credits_spent"], shown["daily_credits_held"]) == (
                "9.000000",
                "4.200000",
                "0.000000",
            ), "the day's charges so far, beside the limit"
            assert "monthly_credits_spent" not in shown or shown["monthly_credits_spent"] == ""
            bad = {
                "negative": "-1",
                "zero": "0",
                "not a number": "abc",
                "not finite": "NaN",
                "below a micro-credit": "0.0000001",
                "too large": "1e400",
            }
            for case, amount in bad.items():
                refused = await admin.post("/admin/limits", json={"limit": {"key_id": key, "daily_credits": amount}})
                assert refused.status_code == 400, (case, refused.text)
                message = refused.json()["error"]["message"]
                assert "daily_credits" in message and len(message) < 200, (case, message)
            [listed] = (await admin.get("/admin/limits", params={"key_id": key})).json()["limits"]
            assert listed["daily_credits"] == "9.000000" and listed["daily_credits_spent"] == "4.200000"

        env = {**os.environ, "AIGNE_HUB_DATABASE_URL": url}
        for amount in ("-1", "abc", "0"):
            code, _, stderr = await _cli(env, "limits", "set", "--key", key, "--daily-credits", amount)
            assert code != 0 and "--daily-credits" in stderr, (amount, stderr)
        code, stdout, stderr = await _cli(env, "limits", "show", "--key", key, "--json")
        assert code == 0, stderr
        [row] = json.loads(stdout)
        assert (row["daily_credits"], row["daily_spent"], row["daily_credits_held"]) == (
            "9.000000",
            "4.200000",
            "0.000000",
        )
        code, stdout, _ = await _cli(env, "limits", "show", "--key", key)
        header, line = stdout.splitlines()
        assert "daily_spent" in header.split() and "4.200000" in line.split()
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)
