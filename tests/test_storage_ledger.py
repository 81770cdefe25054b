"""The usage ledger: exactly-once records, group commit, totals that match to the unit."""

from __future__ import annotations

import asyncio
import random
from collections import defaultdict
from datetime import UTC, date, datetime, timedelta

import pytest
from sqlalchemy import String, func, select

from server.accounts import CreditService, KeyStore, Ledger, UsageRecord, ensure_owner
from server.accounts.ledger import _row
from server.storage import Database
from server.storage.schema import usage_records
from tests.storage_fixtures import database_url, db, open_replica  # noqa: F401

DAY0 = datetime(2026, 3, 1, 23, 30, tzinfo=UTC)


async def _count(db: Database) -> int:  # noqa: F811
    async with db.read() as conn:
        return int((await conn.execute(select(func.count()).select_from(usage_records))).scalar_one())


def _usage(request_id: str, **fields: object) -> UsageRecord:
    values: dict[str, object] = {"provider": "openai", "model": "openai/gpt-4o", **fields}
    return UsageRecord(request_id=request_id, **values)  # type: ignore[arg-type]


async def test_concurrent_records_land_exactly_once_in_few_commits(db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    results = await asyncio.gather(*(ledger.record(_usage(f"req-{i}", input_tokens=i)) for i in range(300)))
    assert all(r.inserted for r in results)
    assert await _count(db) == 300
    assert ledger.commits < 300 / 5  # group commit: many records per transaction
    stored = await ledger.get("req-42")
    assert stored is not None and stored.input_tokens == 42 and stored.outcome == "ok"
    await ledger.close()


async def test_duplicate_request_id_is_ignored(database_url: str, db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    first = await ledger.record(_usage("dup", output_tokens=7))
    again = await ledger.record(_usage("dup", output_tokens=999))
    assert first.inserted and not again.inserted
    # Concurrently, in one batch and from another replica at the same time.
    replica = await open_replica(database_url)
    try:
        other = Ledger(replica)
        results = await asyncio.gather(
            *(ledger.record(_usage("race")) for _ in range(10)),
            *(other.record(_usage("race")) for _ in range(10)),
        )
        assert sum(r.inserted for r in results) == 1
    finally:
        await replica.close()
    assert await _count(db) == 2
    stored = await ledger.get("dup")
    assert stored is not None and stored.output_tokens == 7


async def test_a_batch_partly_recorded_before_says_which_records_are_new(db: Database) -> None:  # noqa: F811
    """One group commit with new and already recorded request ids (and a duplicate
    within the batch): each caller learns whether its own record was the one stored.
    On SQLite such a batch is one statement; which rows it inserted comes from rowids."""
    ledger = Ledger(db)
    for request_id in ("old-b", "old-d"):
        assert (await ledger.record(_usage(request_id, output_tokens=1))).inserted
    ids = ["new-a", "old-b", "new-c", "old-d", "new-e", "new-c"]
    commits = ledger.commits
    results = await asyncio.gather(*(ledger.record(_usage(r, output_tokens=2)) for r in ids))
    assert ledger.commits == commits + 1  # one group commit
    assert [r.inserted for r in results] == [True, False, True, False, True, False]
    for request_id, tokens in (("new-a", 2), ("old-b", 1), ("new-c", 2), ("old-d", 1), ("new-e", 2)):
        stored = await ledger.get(request_id)
        assert stored is not None and stored.output_tokens == tokens
    again = await asyncio.gather(*(ledger.record(_usage(r)) for r in ("new-a", "old-b")))
    assert not any(r.inserted for r in again)  # a batch where nothing is new
    assert await _count(db) == 5


async def test_record_is_committed_when_record_returns(database_url: str, db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    await ledger.record(_usage("durable", latency_ms=12, ttft_ms=3))
    replica = await open_replica(database_url)  # a separate engine sees it at once
    try:
        stored = await Ledger(replica).get("durable")
        assert stored is not None and stored.latency_ms == 12 and stored.ttft_ms == 3
    finally:
        await replica.close()


async def test_cancelled_caller_still_records(db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    task = asyncio.create_task(ledger.record(_usage("cancelled-caller")))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await ledger.close()
    assert await ledger.get("cancelled-caller") is not None
    with pytest.raises(RuntimeError):
        await ledger.record(_usage("after-close"))


async def test_a_bad_record_does_not_sink_its_batch(db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    good = [ledger.record(_usage(f"ok-{i}")) for i in range(5)]
    bad = ledger.record(_usage("bad", input_tokens=2**70))  # out of BIGINT range
    results = await asyncio.gather(*good, bad, return_exceptions=True)
    assert all(not isinstance(r, BaseException) and r.inserted for r in results[:5])
    assert isinstance(results[5], Exception)
    assert await _count(db) == 5


async def test_a_bad_record_does_not_sink_a_settling_batch(db: Database) -> None:  # noqa: F811
    """The same for records that settle reservations (on PostgreSQL one statement for
    the batch, which the bad record fails whole): the others are charged, the bad one's
    hold stays until its lease lapses."""
    owner = (await ensure_owner(db, "project", "bad-batch")).id
    credits = CreditService(db, billing_enabled=True)
    ledger = Ledger(db, credits=credits)
    await credits.grant(owner, 100_000_000)
    holds = [await credits.reserve(owner, 2_000_000, request_id=f"r{i}") for i in range(6)]
    usages = [_usage(f"ok-{i}", owner_id=owner, cost_micros=1_000_000) for i in range(5)]
    usages.append(_usage("bad", owner_id=owner, cost_micros=1_000_000, input_tokens=2**70))
    results = await asyncio.gather(
        *(ledger.record(u, reservation=h) for u, h in zip(usages, holds, strict=True)), return_exceptions=True
    )
    assert [(r.inserted, r.credits_micros) for r in results[:5]] == [(True, 1_000_000)] * 5  # type: ignore[union-attr]
    assert isinstance(results[5], Exception)
    assert await _count(db) == 5
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (95_000_000, 2_000_000)


async def test_long_strings_are_clipped_and_errors_kept(db: Database) -> None:  # noqa: F811
    ledger = Ledger(db)
    await ledger.record(_usage("err", model="m" * 500, outcome="error", error_reason="UPSTREAM_TIMEOUT", latency_ms=-5))
    stored = await ledger.get("err")
    assert stored is not None
    assert stored.model == "m" * 200 and stored.outcome == "error" and stored.error_reason == "UPSTREAM_TIMEOUT"
    assert stored.latency_ms == 0
    with pytest.raises(ValueError):
        _usage("x", outcome="weird")


async def test_totals_match_the_records_to_the_unit(db: Database) -> None:  # noqa: F811
    rng = random.Random(7)
    ledger = Ledger(db)
    records = []
    for i in range(400):
        provider = rng.choice(["openai", "anthropic"])
        records.append(
            _usage(
                f"r{i}",
                key_id=rng.choice(["k1", "k2", "k3"]),
                owner_id=rng.choice(["user:a", "project:b"]),
                provider=provider,
                model=f"{provider}/{rng.choice(['small', 'large'])}",
                input_tokens=rng.randrange(0, 10**9),
                output_tokens=rng.randrange(0, 10**6),
                cached_tokens=rng.randrange(0, 1000),
                image_count=rng.randrange(0, 3),
                audio_ms=rng.randrange(0, 100_000),
                characters=rng.randrange(0, 5000),
                cost_micros=rng.randrange(0, 10**12),
                outcome=rng.choice(["ok", "ok", "ok", "error"]),
                created_at=DAY0 + timedelta(minutes=rng.randrange(0, 3 * 24 * 60)),
            )
        )
    await asyncio.gather(*(ledger.record(r) for r in records))

    fields = ("input_tokens", "output_tokens", "cached_tokens", "image_count", "audio_ms", "characters", "cost_micros")
    attribute = {"key": "key_id", "owner": "owner_id", "provider": "provider", "model": "model"}

    def group_key(record: UsageRecord, groups: tuple[str, ...]) -> tuple[object, ...]:
        return tuple(record.created_at.date() if g == "day" else getattr(record, attribute[g]) for g in groups)

    for groups in [(), ("key",), ("owner",), ("model",), ("day",), ("owner", "day"), ("key", "model", "day")]:
        expected: dict[tuple[object, ...], dict[str, int]] = defaultdict(lambda: defaultdict(int))
        for record in records:
            sums = expected[group_key(record, groups)]
            sums["calls"] += 1
            sums["errors"] += record.outcome != "ok"
            for name in fields:
                sums[name] += getattr(record, name)
        totals = await ledger.totals(groups)  # type: ignore[arg-type]
        got = {
            tuple(getattr(t, "day" if g == "day" else attribute[g]) for g in groups): {
                name: getattr(t, name) for name in ("calls", "errors", *fields)
            }
            for t in totals
        }
        assert got == {k: dict(v) for k, v in expected.items()}, groups

    days = await ledger.totals("day")
    assert [t.day for t in days] == [date(2026, 3, 1), date(2026, 3, 2), date(2026, 3, 3), date(2026, 3, 4)]

    since, until = DAY0 + timedelta(hours=5), DAY0 + timedelta(hours=30)
    window = [r for r in records if since <= r.created_at < until and r.key_id == "k2"]
    (total,) = await ledger.totals(since=since, until=until, key_id="k2")
    assert total.calls == len(window)
    assert total.input_tokens == sum(r.input_tokens for r in window)
    assert total.cost_micros == sum(r.cost_micros for r in window)
    listed = await ledger.records(since=since, until=until, key_id="k2")
    assert [r.request_id for r in listed] == [r.request_id for r in sorted(window, key=lambda r: r.created_at)]


async def test_a_settling_batch_partly_recorded_before_charges_only_the_new_records(
    db: Database,  # noqa: F811
) -> None:
    """The same with reservations to settle (the batch's transaction path; on SQLite its
    records are one INSERT there too): a record already stored releases its hold and
    charges nothing, each new one charges its cost."""
    owner = (await ensure_owner(db, "project", "partly")).id
    credits = CreditService(db, billing_enabled=True)
    ledger = Ledger(db, credits=credits)
    await credits.grant(owner, 100_000_000)
    for request_id in ("old-b", "old-d"):
        assert (await ledger.record(_usage(request_id, owner_id=owner, cost_micros=1))).inserted
    ids = ["new-a", "old-b", "new-c", "old-d", "new-e", "new-c"]
    holds = [await credits.reserve(owner, 5_000_000, request_id=r) for r in ids]
    commits = ledger.commits
    results = await asyncio.gather(
        *(
            ledger.record(_usage(r, owner_id=owner, cost_micros=1_000_000), reservation=hold)
            for r, hold in zip(ids, holds, strict=True)
        )
    )
    assert ledger.commits == commits + 1  # one group commit
    assert [(r.inserted, r.credits_micros) for r in results] == [
        (True, 1_000_000),
        (False, 0),
        (True, 1_000_000),
        (False, 0),
        (True, 1_000_000),
        (False, 0),
    ]
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (100_000_000 - 3_000_000, 0)
    assert await _count(db) == 5


async def test_record_settles_its_reservation_in_the_same_transaction(db: Database) -> None:  # noqa: F811
    owner = (await ensure_owner(db, "project", "billing")).id
    key, _ = await KeyStore(db).create_key(owner, "k", spend_cap_micros=100_000_000)
    credits = CreditService(db, billing_enabled=True)
    ledger = Ledger(db)
    await credits.grant(owner, 10_000_000)

    held = await credits.reserve(owner, 3_000_000, key_id=key.id, request_id="a")
    recorded = await ledger.record(_usage("a", key_id=key.id, owner_id=owner, cost_micros=1_250_000), reservation=held)
    assert recorded.inserted and recorded.credits_micros == 1_250_000
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (8_750_000, 0)

    # A duplicate record with a new reservation: nothing charged, the hold released.
    held = await credits.reserve(owner, 3_000_000, key_id=key.id, request_id="a")
    again = await ledger.record(_usage("a", key_id=key.id, owner_id=owner, cost_micros=1_250_000), reservation=held)
    assert not again.inserted and again.credits_micros == 0
    assert (await credits.balance(owner)).available_micros == 8_750_000

    # More than reserved: only the reservation is charged (never an overdraft).
    held = await credits.reserve(owner, 1_000_000, key_id=key.id)
    over = await ledger.record(_usage("b", owner_id=owner, cost_micros=5_000_000), reservation=held)
    assert over.credits_micros == 1_000_000
    stored = await ledger.get("b")
    assert stored is not None and stored.cost_micros == 5_000_000 and stored.credits_micros == 1_000_000

    (total,) = await ledger.totals(owner_id=owner)
    assert total.credits_micros == 10_000_000 - (await credits.balance(owner)).balance_micros
    refreshed = await KeyStore(db).get_key(key.id)
    assert refreshed is not None


async def test_group_commit_stores_what_sqlalchemy_stores(db: Database) -> None:  # noqa: F811
    """On SQLite the group commit inserts through the sqlite3 cursor: the stored row is
    the one SQLAlchemy's own insert of the same record stores (timestamp format included)."""
    ledger = Ledger(db)
    fields: dict[str, object] = {
        "created_at": DAY0.replace(microsecond=0),
        "key_id": "k1",
        "ttft_ms": None,
        "input_tokens": 5,
        "error_reason": "x" * 100,
    }
    await ledger.record(_usage("by-ledger", **fields))
    twin = await ledger.get("by-ledger")
    assert twin is not None
    row = {name: getattr(twin, name) for name in twin.__dataclass_fields__ if name in usage_records.c}
    async with db.write() as conn:
        await conn.execute(usage_records.insert().values({**row, "request_id": "by-sqlalchemy"}))
    async with db.read() as conn:
        stored = (await conn.execute(select(usage_records).order_by(usage_records.c.request_id))).all()
    by_ledger, by_sqlalchemy = (
        tuple(r._mapping[c.name] for c in usage_records.c if c.name not in ("id", "request_id")) for r in stored
    )
    assert by_ledger == by_sqlalchemy
    assert by_ledger[0] == DAY0.replace(microsecond=0)
    async with db.read() as conn:  # the same text in the column (range queries compare it)
        texts = (await conn.execute(select(func.cast(usage_records.c.created_at, String)))).scalars().all()
    assert len(set(texts)) == 1
    await ledger.close()


def test_a_stored_row_names_every_column_of_the_table() -> None:
    """PostgreSQL's `aigne_hub_record_usage` builds its rows with jsonb_populate_record,
    where a column the ledger's row leaves out is NULL, not the column's default: a new
    column of usage_records must be in `_row` too."""
    assert set(_row(_usage("r"), 0)) | {"id"} == set(usage_records.c.keys())
