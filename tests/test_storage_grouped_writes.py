"""Writes that share a transaction (`Database.write_grouped`) and statements run straight
on the sqlite3 cursor (`server.storage.inline.prebuilt`): each grouped write commits or
fails on its own, and what a prebuilt statement stores and returns is what SQLAlchemy's
own execution stores and returns."""

from __future__ import annotations

import asyncio
import secrets
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import bindparam, select, update
from sqlalchemy.sql.dml import Insert

from server.accounts import CreditService, InsufficientCredits, KeyStore, SpendingCapReached, ensure_owner
from server.accounts.credits import _INSERT_RESERVATION, _SETTLE_BALANCE, _TAKE
from server.errors import StorageUnavailable
from server.storage import Database
from server.storage.inline import Executor, prebuilt
from server.storage.schema import balances, owners, reservations, utcnow
from tests.storage_fixtures import another_process_writing, count_queries, database_url, db  # noqa: F401 - the fixtures

CREDIT = 1_000_000


def _new_owner(name: str) -> Insert:
    return owners.insert().values(id=f"user:{name}", kind="user", name=name, created_at=utcnow())


async def _owner_ids(database: Database) -> set[str]:
    async with database.read() as conn:
        return set((await conn.execute(select(owners.c.id))).scalars())


async def test_a_grouped_write_that_raises_rolls_back_its_own_work_only(db: Database) -> None:  # noqa: F811
    async def adds(name: str, then_fails: bool = False) -> str:
        async def work(conn: Executor) -> str:
            await conn.execute(_new_owner(name))
            if then_fails:
                raise ValueError(f"{name} changed its mind")
            return name

        return await db.write_grouped(work)

    outcomes = await asyncio.gather(adds("ann"), adds("bob", then_fails=True), adds("cy"), return_exceptions=True)
    assert outcomes[0] == "ann" and outcomes[2] == "cy"
    assert isinstance(outcomes[1], ValueError) and "bob changed its mind" in str(outcomes[1])
    assert await _owner_ids(db) >= {"user:ann", "user:cy"}
    assert "user:bob" not in await _owner_ids(db)


async def test_concurrent_reservations_on_sqlite_share_one_transaction(tmp_path: Path) -> None:
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        owner = (await ensure_owner(database, "project", "grouped")).id
        key, _ = await KeyStore(database).create_key(owner, "capped", spend_cap_micros=3 * CREDIT)
        credits = CreditService(database, billing_enabled=True)
        await credits.grant(owner, 5 * CREDIT)
        poor = (await ensure_owner(database, "project", "poor")).id

        async def reserve(who: str, key_id: str | None) -> object:
            try:
                return await credits.reserve(who, CREDIT, key_id=key_id)
            except (InsufficientCredits, SpendingCapReached) as exc:
                return exc

        calls = [reserve(owner, key.id) for _ in range(5)] + [reserve(poor, None)] + [reserve(owner, None)]
        before = database.writer_transactions
        # A write keeps the writer thread busy; the seven that come meanwhile commit together.
        busy = asyncio.create_task(database.write_in_thread(lambda conn: time.sleep(0.2)))
        await asyncio.sleep(0.05)
        results = await asyncio.gather(*calls)
        await busy
        assert database.writer_transactions - before == 2 and database.here_transactions == 0
        assert [type(r).__name__ for r in results] == ["Reservation"] * 3 + ["SpendingCapReached"] * 2 + [
            "InsufficientCredits",
            "Reservation",
        ]
        # The capped calls' balance holds were rolled back with their savepoints.
        assert (await credits.balance(owner)).reserved_micros == 4 * CREDIT
        async with database.read() as conn:
            assert await conn.scalar(select(reservations.c.id).where(reservations.c.owner_id == poor)) is None
    finally:
        await database.close()


async def test_a_reservation_that_finds_the_writer_idle_is_written_on_the_loops_thread(tmp_path: Path) -> None:
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        owner = (await ensure_owner(database, "project", "here")).id
        credits = CreditService(database, billing_enabled=True)
        await credits.grant(owner, 2 * CREDIT)
        in_thread = database.writer_transactions
        held = await credits.reserve(owner, CREDIT)
        with pytest.raises(InsufficientCredits):
            await credits.reserve(owner, 2 * CREDIT)  # refused: its hold is rolled back
        assert database.here_transactions == 2 and database.writer_transactions == in_thread
        assert (await credits.balance(owner)).reserved_micros == CREDIT
        # Committed, and seen by the writer thread's connection and another process's.
        assert held.id is not None
        await credits.settle(held, CREDIT // 2)
        assert (await credits.balance(owner)).balance_micros == 2 * CREDIT - CREDIT // 2
        with sqlite3.connect(tmp_path / "hub.db") as other:
            assert other.execute("SELECT reserved_micros FROM balances").fetchone() == (0,)
    finally:
        await database.close()


async def test_a_reservation_never_waits_on_the_loops_thread_for_another_processs_write(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}", sqlite_busy_timeout_ms=5000)
    try:
        owner = (await ensure_owner(database, "project", "waits")).id
        credits = CreditService(database, billing_enabled=True)
        await credits.grant(owner, 2 * CREDIT)
        ticks = 0

        async def ticking() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        with another_process_writing(path) as other_process:
            ticker = asyncio.create_task(ticking())
            reserving = asyncio.create_task(credits.reserve(owner, CREDIT))
            await asyncio.sleep(0.3)
            assert not reserving.done() and ticks >= 10, "the loop kept running while the reservation waited"
            other_process.execute("ROLLBACK")
        held = await asyncio.wait_for(reserving, 10)
        ticker.cancel()
        assert held.id is not None and database.here_transactions == 0  # the writer thread waited, then wrote it
        assert (await credits.balance(owner)).reserved_micros == CREDIT
    finally:
        await database.close()


async def test_a_group_that_cannot_begin_fails_every_caller_in_it(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}", sqlite_busy_timeout_ms=300)

    async def adds(name: str) -> None:
        async def work(conn: Executor) -> None:
            await conn.execute(_new_owner(name))

        await database.write_grouped(work)

    try:
        with another_process_writing(path):
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(adds(f"u{i}") for i in range(4)), return_exceptions=True), 10
            )
        assert all(isinstance(outcome, StorageUnavailable) for outcome in outcomes), outcomes
        await asyncio.gather(adds("after-1"), adds("after-2"))  # and it works again
        assert {"user:after-1", "user:after-2"} <= await _owner_ids(database)
        assert not any(name.startswith("user:u") for name in await _owner_ids(database))
    finally:
        await database.close()


async def _stored_timestamp(database: Database, owner_id: str) -> str:
    """The balance row's updated_at as SQLite holds it (text)."""
    assert database._sync_engine is not None
    with database._sync_engine.connect() as conn:
        raw = conn.connection.driver_connection.execute(  # type: ignore[union-attr]
            "SELECT updated_at FROM balances WHERE owner_id = ?", (owner_id,)
        )
        value: str = raw.fetchone()[0]
        return value


async def test_prebuilt_statements_store_and_return_what_sqlalchemy_does(tmp_path: Path) -> None:
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        owner = (await ensure_owner(database, "project", "exact")).id
        credits = CreditService(database, billing_enabled=True)
        await credits.grant(owner, 10 * CREDIT)
        when = datetime(2026, 12, 1, 15, 30, 1, 123456, tzinfo=UTC)
        settle = {"b_owner": owner, "b_charged": 2, "b_held": 0, "b_now": when}

        async with database.write() as conn:  # SQLAlchemy's execution (aiosqlite)
            await conn.execute(_SETTLE_BALANCE, settle)
        through_sqlalchemy = await _stored_timestamp(database, owner)
        with count_queries(database) as statements:
            await database.write_with(lambda conn: conn.execute(_SETTLE_BALANCE, settle))  # the cursor's
        assert await _stored_timestamp(database, owner) == through_sqlalchemy == "2026-12-01 15:30:01.123456"
        assert statements == [statement for statement in statements if statement.startswith("UPDATE balances")]
        assert len(statements) == 1, "listeners still see a prebuilt statement"
        assert (await credits.balance(owner)).balance_micros == 10 * CREDIT - 4

        row: dict[str, Any] = {
            "id": secrets.token_hex(16),
            "owner_id": owner,
            "key_id": None,
            "amount_micros": 7,
            "request_id": "req-1",
            "created_at": when,
            "expires_at": when + timedelta(seconds=120),
            "spend_window_ids": "w1 w2",
        }

        async def insert_and_take(conn: Executor) -> Any:
            await conn.execute(_INSERT_RESERVATION, row)
            async_read = await conn.execute(select(reservations.c.expires_at).where(reservations.c.id == row["id"]))
            expires = async_read.scalar_one()
            taken = (await conn.execute(_TAKE, {"b_id": row["id"]})).one_or_none()
            again = await conn.execute(_TAKE, {"b_id": row["id"]})
            return expires, taken, again.rowcount, again.one_or_none()

        expires, taken, rowcount, nothing = await database.write_with(insert_and_take)
        assert expires == row["expires_at"]  # stored as SQLAlchemy stores it, read back by SQLAlchemy
        assert (taken.owner_id, taken.key_id, taken.amount_micros, taken.spend_window_ids) == (owner, None, 7, "w1 w2")
        assert (rowcount, nothing) == (0, None)
    finally:
        await database.close()


async def test_a_statement_sqlalchemy_must_expand_cannot_be_prebuilt(tmp_path: Path) -> None:
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        expanding = prebuilt(
            update(balances)
            .where(balances.c.owner_id.in_(bindparam("b_owners", expanding=True)))
            .values(reserved_micros=0)
        )
        with pytest.raises(ValueError, match="cannot prebuild"):
            await database.write_with(lambda conn: conn.execute(expanding, {"b_owners": ["a", "b"]}))
    finally:
        await database.close()


@pytest.mark.parametrize("through", ["sqlalchemy", "prebuilt"])
async def test_a_writer_transaction_that_raises_leaves_nothing_and_the_next_one_works(
    tmp_path: Path, through: str
) -> None:
    """SQLite's writer begins and ends its transactions straight on sqlite3; SQLAlchemy's
    own bookkeeping begins only when a statement goes through it. Either way a raise
    rolls back everything the transaction wrote."""
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:
        owner = (await ensure_owner(database, "project", "rolled")).id
        await CreditService(database, billing_enabled=True).grant(owner, 10)
        when = datetime(2026, 12, 1, tzinfo=UTC)

        async def writes_then_raises(conn: Executor) -> None:
            if through == "sqlalchemy":
                await conn.execute(_new_owner("ghost"))
            else:
                await conn.execute(_SETTLE_BALANCE, {"b_owner": owner, "b_charged": 7, "b_held": 0, "b_now": when})
            raise ValueError("changed its mind")

        with pytest.raises(ValueError, match="changed its mind"):
            await database.write_with(writes_then_raises)
        assert "user:ghost" not in await _owner_ids(database)
        assert (await CreditService(database).balance(owner)).balance_micros == 10
        await database.write_with(lambda conn: conn.execute(_new_owner("after")))
        await database.write_with(
            lambda conn: conn.execute(_SETTLE_BALANCE, {"b_owner": owner, "b_charged": 3, "b_held": 0, "b_now": when})
        )
        assert "user:after" in await _owner_ids(database)
        assert (await CreditService(database).balance(owner)).balance_micros == 7
    finally:
        await database.close()
