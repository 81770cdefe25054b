"""Credit limits per UTC day and calendar month (issue 10: spend windows), enforced in
the database beside the balance (server.limits.windows).

Library tests run on SQLite and PostgreSQL (tests/storage_fixtures.py); the server
tests run the real gRPC server (and Envoy for REST and the openai SDK) against the fake
OpenAI upstream, on both backends too. "Now" is set through `CreditService.clock`, so a
window resets without waiting a day.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from server.accounts.credits import CreditService
from server.accounts.keys import KeyStore
from server.accounts.ledger import Ledger, UsageRecord
from server.accounts.owners import ensure_owner
from server.errors import RateLimited
from server.limits.rules import LimitRule
from server.limits.windows import CreditWindow, WindowSpend, period_of, spend_of, windows_of
from server.storage import Database
from server.storage.schema import spend_windows
from tests.storage_fixtures import database_url, db  # noqa: F401 - the fixtures

CREDIT = 1_000_000
NOON = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)


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
        assert (row.spent_micros, row.reserved_micros, row.period) == (10 * CREDIT, 0, "day:2026-11-30")
    finally:
        await other.close()
