"""Credit blocks (server.accounts.credit_blocks): calls draw from a block their process
holds instead of reserving each on its own; the books stay exact, nothing overdraws,
and near the end of a balance calls reserve one by one again, with exact refusals.

On SQLite and PostgreSQL (tests/storage_fixtures.py); two engines on one database
stand for two replicas.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from server.accounts import (
    CreditService,
    InsufficientCredits,
    KeyStore,
    Ledger,
    SpendingCapReached,
    UsageRecord,
    credit_blocks,
    ensure_owner,
)
from server.accounts.spool import SpooledRecord, decode, encode
from server.storage import Database
from server.storage.schema import api_keys, credit_grants, reservations, utcnow
from tests.storage_fixtures import count_queries, database_url, db, open_replica  # noqa: F401 - the fixtures

CREDIT = 1_000_000


async def _owner(db: Database, name: str = "acme") -> str:  # noqa: F811
    return (await ensure_owner(db, "project", name)).id


def _blocks(db: Database, block_calls: int = 4) -> tuple[CreditService, Ledger]:  # noqa: F811
    credits = CreditService(db, billing_enabled=True)
    credits.use_blocks(block_calls)
    return credits, Ledger(db, credits=credits)


async def _call(
    credits: CreditService, ledger: Ledger, owner: str, request_id: str, worst: int, cost: int, **kw: object
) -> int:
    """One billed call: reserve `worst`, record `cost`; returns what it was charged."""
    held = await credits.reserve(owner, worst, request_id=request_id, **kw)  # type: ignore[arg-type]
    usage = UsageRecord(request_id, "openai", "openai/x", owner_id=owner, key_id=held.key_id, cost_micros=cost)
    return (await ledger.record(usage, reservation=held)).credits_micros


async def _rows(db: Database) -> list[tuple[str, int, str | None]]:  # noqa: F811
    async with db.read() as conn:
        found = await conn.execute(select(reservations.c.id, reservations.c.amount_micros, reservations.c.request_id))
        return [tuple(row) for row in found.all()]  # type: ignore[misc]


async def test_calls_on_two_replicas_draw_from_blocks_and_the_books_stay_exact(
    database_url: str,  # noqa: F811
    db: Database,  # noqa: F811
) -> None:
    owner = await _owner(db)
    key, _ = await KeyStore(db).create_key(owner, "k")
    await CreditService(db).grant(owner, 1000 * CREDIT)
    replica = await open_replica(database_url)
    try:
        here, there = _blocks(db), _blocks(replica)

        async def call(i: int) -> int:
            credits, ledger = here if i % 2 else there
            await asyncio.sleep(0.001 * (i % 7))
            return await _call(credits, ledger, owner, f"c{i}", CREDIT, i * 7919 % CREDIT, key_id=key.id)

        charged = await asyncio.gather(*(call(i) for i in range(200)))
        assert charged == [i * 7919 % CREDIT for i in range(200)]
        # Two blocks (one a replica) served 200 calls with a handful of transactions.
        transactions = sum(credits.blocks.transactions for credits, _ in (here, there))  # type: ignore[union-attr]
        assert 2 <= transactions <= 40, transactions
        async with db.read() as conn:
            rows = (await conn.execute(select(reservations.c.request_id))).scalars().all()
        assert rows and all(request_id is None for request_id in rows)  # blocks only, no call of its own
        while_held = await here[0].balance(owner)
        assert while_held.reserved_micros == sum(amount for _, amount, _ in await _rows(db))
        for credits, ledger in (here, there):
            await ledger.close()
            await credits.blocks.give_back_all()  # type: ignore[union-attr]
    finally:
        await replica.close()
    balance = await here[0].balance(owner)
    (total,) = await here[1].totals(owner_id=owner)
    assert total.credits_micros == sum(charged)
    assert (balance.balance_micros, balance.reserved_micros) == (1000 * CREDIT - sum(charged), 0)
    async with db.read() as conn:
        spent, reserved = (await conn.execute(select(api_keys.c.spent_micros, api_keys.c.reserved_micros))).one()
        granted = (await conn.execute(select(func.sum(credit_grants.c.amount_micros)))).scalar_one()
    assert (spent, reserved) == (sum(charged), 0)
    assert int(granted) - total.credits_micros == balance.balance_micros
    assert await _rows(db) == []


async def test_near_the_end_of_a_balance_calls_reserve_their_own_and_exactly_what_is_left_is_spent(
    db: Database,  # noqa: F811
) -> None:
    owner = await _owner(db)
    credits, ledger = _blocks(db, block_calls=4)
    await credits.grant(owner, 40 * CREDIT)
    # Each call may cost 1 credit and does. A block of 4 needs 32 free: the first
    # calls draw from blocks, then each reserves its own; the 41st is refused.
    for i in range(40):
        assert await _call(credits, ledger, owner, f"c{i}", CREDIT, CREDIT) == CREDIT
    with pytest.raises(InsufficientCredits) as refused:
        await credits.reserve(owner, CREDIT, request_id="c40")
    assert "0.000000 available" in refused.value.message
    assert credits.blocks is not None and credits.blocks.transactions >= 1
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (0, 0)
    assert await _rows(db) == []


async def test_concurrent_calls_never_overdraw_with_blocks_on_two_replicas(
    database_url: str,  # noqa: F811
    db: Database,  # noqa: F811
) -> None:
    owner = await _owner(db)
    await CreditService(db).grant(owner, 50 * CREDIT)
    replica = await open_replica(database_url)
    try:
        sides = [_blocks(db, block_calls=2), _blocks(replica, block_calls=2)]

        async def call(i: int) -> int:
            credits, ledger = sides[i % 2]
            try:
                return await _call(credits, ledger, owner, f"c{i}", CREDIT, CREDIT)
            except InsufficientCredits:
                return 0

        charged = await asyncio.gather(*(call(i) for i in range(120)))
        for credits, ledger in sides:
            await ledger.close()
            await credits.blocks.give_back_all()  # type: ignore[union-attr]
    finally:
        await replica.close()
    balance = await sides[0][0].balance(owner)
    assert balance.balance_micros >= 0 and balance.reserved_micros == 0
    assert sum(charged) == 50 * CREDIT - balance.balance_micros
    # Every credit was spent: refusals came only once the balance ran out.
    assert sum(charged) == 50 * CREDIT


async def test_a_keys_cap_is_never_passed_with_blocks(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    key, _ = await KeyStore(db).create_key(owner, "capped", spend_cap_micros=20 * CREDIT)
    credits, ledger = _blocks(db, block_calls=4)
    await credits.grant(owner, 1000 * CREDIT)
    charged = 0
    for i in range(25):
        try:
            charged += await _call(credits, ledger, owner, f"c{i}", CREDIT, CREDIT, key_id=key.id)
        except SpendingCapReached:
            break
    assert charged == 20 * CREDIT
    async with db.read() as conn:
        spent, reserved = (await conn.execute(select(api_keys.c.spent_micros, api_keys.c.reserved_micros))).one()
    assert (spent, reserved) == (20 * CREDIT, 0)


async def test_an_idle_block_is_given_back(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    monkeypatch.setattr(credit_blocks, "IDLE_S", 0.2)
    owner = await _owner(db)
    credits, ledger = _blocks(db)
    await credits.grant(owner, 100 * CREDIT)
    assert await _call(credits, ledger, owner, "c1", CREDIT, 300_000) == 300_000
    held = await credits.balance(owner)
    assert held.reserved_micros == 4 * CREDIT - 300_000  # what the block holds for the next calls
    assert [request_id for _, _, request_id in await _rows(db)] == [None]
    for _ in range(100):
        if (await credits.balance(owner)).reserved_micros == 0:
            break
        await asyncio.sleep(0.05)
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (100 * CREDIT - 300_000, 0)
    assert await _rows(db) == [] and credits.held == frozenset()
    # The next call takes a new block.
    assert await _call(credits, ledger, owner, "c2", CREDIT, 1) == 1


async def test_a_duplicate_record_gives_its_draw_back_to_the_block(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits, ledger = _blocks(db)
    await credits.grant(owner, 100 * CREDIT)
    assert await _call(credits, ledger, owner, "same", CREDIT, 600_000) == 600_000
    [(_, after_first, _)] = await _rows(db)
    assert await _call(credits, ledger, owner, "same", CREDIT, 600_000) == 0  # a retry: recorded once, charged once
    assert [amount for _, amount, _ in await _rows(db)] == [after_first]
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (100 * CREDIT - 600_000, after_first)


async def test_a_block_the_sweeper_released_is_replaced(
    database_url: str,  # noqa: F811
    db: Database,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    owner = await _owner(db)
    credits, ledger = _blocks(db)
    await credits.grant(owner, 100 * CREDIT)
    held = await credits.reserve(owner, CREDIT, request_id="c1")
    assert held.drawn
    # Another replica's sweeper, in an hour: this process stalled past its lease.
    replica = await open_replica(database_url)
    try:
        assert await CreditService(replica, billing_enabled=True).release_expired(utcnow() + timedelta(hours=1)) == 1
    finally:
        await replica.close()
    usage = UsageRecord("c1", "openai", "openai/x", owner_id=owner, cost_micros=500_000)
    with caplog.at_level(logging.WARNING):
        assert (await ledger.record(usage, reservation=held)).credits_micros == 0  # recorded, uncharged
    assert "credit block" in caplog.text and "lease lapsed" in caplog.text
    again = await credits.reserve(owner, CREDIT, request_id="c2")
    assert again.drawn and again.id != held.id
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (100 * CREDIT, 4 * CREDIT)


async def test_a_spooled_draw_is_settled_by_its_replay(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits, ledger = _blocks(db)
    await credits.grant(owner, 100 * CREDIT)
    held = await credits.reserve(owner, CREDIT, request_id="c1")
    usage = UsageRecord("c1", "openai", "openai/x", owner_id=owner, cost_micros=700_000)
    # As the spool keeps it, and reads it back.
    spooled = decode(encode(SpooledRecord.of(usage, held)))
    assert (spooled.reservation_id, spooled.drawn_micros) == (held.id, CREDIT)
    [recorded] = await ledger.replay([spooled])
    assert recorded.credits_micros == 700_000
    # The draw is free again in the block: 4 calls' worth less the charge.
    assert credits.blocks is not None and credits.blocks.draw(owner, None, 4 * CREDIT - 700_000, "c2") is not None
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (100 * CREDIT - 700_000, 4 * CREDIT - 700_000)
    # A spool line without a draw (as written before blocks existed) settles a reservation of its own.
    own = decode(encode(SpooledRecord(usage, "r1"))).reservation()
    assert own is not None and (own.id, own.drawn) == ("r1", False)


async def test_a_call_that_can_cost_nothing_reserves_its_own(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits, _ = _blocks(db)
    await credits.grant(owner, 100 * CREDIT)
    free = await credits.reserve(owner, 0, request_id="z")
    assert not free.drawn
    assert [request_id for _, _, request_id in await _rows(db)] == ["z"]


async def test_holders_refused_a_block_are_forgotten_once_their_wait_is_over(
    db: Database,  # noqa: F811
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(credit_blocks, "IDLE_S", 0.0)  # a refusal's wait is over at once
    monkeypatch.setattr(credit_blocks, "REFUSED_KEPT", 3)
    credits, ledger = _blocks(db)
    for name in ("a", "b", "c", "d", "e"):
        owner = await _owner(db, name)
        await credits.grant(owner, 2 * CREDIT)  # too little for a block of 4: each call reserves its own
        assert await _call(credits, ledger, owner, f"{name}1", CREDIT, CREDIT) == CREDIT
    assert credits.blocks is not None and len(credits.blocks._refused_until) <= 3


async def test_one_group_commit_settles_draws_holds_duplicates_and_a_lost_block_exactly(
    database_url: str,  # noqa: F811
    db: Database,  # noqa: F811
) -> None:
    """Every case a settling batch can hold, in one group commit (on PostgreSQL one call
    of the database function `aigne_hub_record_usage`, on SQLite the writer thread's
    transaction): each record is charged what the rules say and the books stay exact."""
    owner, other = await _owner(db), await _owner(db, "other")
    key, _ = await KeyStore(db).create_key(owner, "k", spend_cap_micros=50 * CREDIT)
    credits, ledger = _blocks(db)
    own_holds = CreditService(db, billing_enabled=True)  # no blocks: each call reserves its own
    for name in (owner, other):
        await credits.grant(name, 100 * CREDIT)
    assert (await ledger.record(UsageRecord("stored", "openai", "openai/x", owner_id=owner))).inserted

    lost = await credits.reserve(other, CREDIT, request_id="lost")  # a draw from other's block...
    sweeper = CreditService(db, billing_enabled=True)
    assert await sweeper.release_expired(utcnow() + timedelta(hours=1)) == 1  # ...whose row is swept

    def draw(request_id: str) -> object:
        return credits.reserve(owner, CREDIT, key_id=key.id, request_id=request_id)

    def hold(request_id: str, amount: int) -> object:
        return own_holds.reserve(owner, amount, key_id=key.id, request_id=request_id)

    created = utcnow() - timedelta(seconds=3)
    # (request id, reservation, cost, expected (inserted, charged))
    calls = [
        ("a", await draw("a"), 300_000, (True, 300_000)),
        ("twice", await draw("twice"), 200_000, (True, 200_000)),
        ("twice", await draw("twice"), 200_000, (False, 0)),  # its draw goes back to the block
        ("c", await hold("c", 2 * CREDIT), 500_000, (True, 500_000)),
        ("stored", await hold("stored", CREDIT), 500_000, (False, 0)),  # its hold is released
        ("stored", await draw("stored"), 400_000, (False, 0)),
        ("over", await hold("over", 100_000), 500_000, (True, 100_000)),  # never more than held
        ("lost", lost, 400_000, (True, 0)),  # its block is gone: recorded, uncharged
    ]
    usages = [
        UsageRecord(
            request_id,
            "openai",
            "openai/x",
            owner_id=reservation.owner_id,
            key_id=reservation.key_id,  # type: ignore[attr-defined]
            cost_micros=cost,
            input_tokens=7,
            latency_ms=12,
            created_at=created,
        )
        for request_id, reservation, cost, _ in calls
    ]
    commits = ledger.commits
    with count_queries(db) as statements:
        results = await asyncio.gather(
            *(ledger.record(usage, reservation=call[1]) for usage, call in zip(usages, calls, strict=True))  # type: ignore[arg-type]
        )
    assert ledger.commits == commits + 1, "one group commit"
    assert [(r.inserted, r.credits_micros) for r in results] == [expected for *_, expected in calls]
    if database_url.startswith("postgresql"):
        assert len(statements) == 1 and "aigne_hub_record_usage" in statements[0], statements

    charged = 300_000 + 200_000 + 500_000 + 100_000
    balance = await credits.balance(owner)
    held_rows = sum(amount for _, amount, _ in await _rows(db))
    assert balance.balance_micros == 100 * CREDIT - charged
    assert balance.reserved_micros == held_rows, "what the balance holds is what the rows hold"
    assert (await credits.balance(other)).balance_micros == 100 * CREDIT
    async with db.read() as conn:
        spent, reserved = (
            await conn.execute(
                select(api_keys.c.spent_micros, api_keys.c.reserved_micros).where(api_keys.c.id == key.id)
            )
        ).one()
    assert (spent, reserved) == (charged, held_rows)
    (total,) = await ledger.totals(owner_id=owner)
    assert total.credits_micros == charged
    stored = await ledger.get("a")
    assert stored is not None and stored.created_at == created and stored.ttft_ms is None
    assert (stored.input_tokens, stored.latency_ms, stored.key_id, stored.credits_micros) == (7, 12, key.id, 300_000)
