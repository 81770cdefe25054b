"""Storage fixtures: every storage test runs against SQLite and PostgreSQL.

    from tests.storage_fixtures import database_url, db  # noqa: F401

`database_url` is a fresh, empty database: a SQLite file in `tmp_path`, or a
PostgreSQL database `aigne_test_<random>` created for the test and dropped after it
(server from AIGNE_HUB_TEST_POSTGRES_URL, default postgres@127.0.0.1:5432/test).
`db` is that database opened and migrated. `open_replica` opens a second engine on
the same database, standing in for another gateway replica; `another_process_writing`
holds a SQLite file's write lock as another process would.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import asyncpg
import pytest
import pytest_asyncio
from sqlalchemy import event

from server.storage import Database
from tests.postgres_databases import new_database

POSTGRES_URL = os.environ.get("AIGNE_HUB_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
BACKENDS = ["sqlite", "postgresql"]


def _unreachable(exc: BaseException) -> NoReturn:
    # CI (and `make test`) start PostgreSQL first: there a missing server is a failure.
    if os.environ.get("AIGNE_HUB_REQUIRE_POSTGRES"):
        pytest.fail(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}")
    pytest.skip(f"PostgreSQL is not reachable at {POSTGRES_URL}: {exc}")


async def _admin_connection() -> asyncpg.Connection:
    try:
        return await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, asyncpg.PostgresError) as exc:
        _unreachable(exc)


@pytest_asyncio.fixture(params=BACKENDS)
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub' / 'aigne-hub.db'}"
        return
    async with contextlib.AsyncExitStack() as database:
        try:
            url = await database.enter_async_context(new_database(POSTGRES_URL, "aigne_test"))
        except (OSError, asyncpg.PostgresError) as exc:
            _unreachable(exc)
        yield url


@pytest_asyncio.fixture
async def db(database_url: str) -> AsyncIterator[Database]:
    database = await Database.open(database_url, migrate=True)
    yield database
    await database.close()


async def open_replica(url: str) -> Database:
    """Another engine on the same (already migrated) database: a second replica."""
    return await Database.open(url, migrate=False)


@contextmanager
def another_process_writing(path: Path) -> Iterator[sqlite3.Connection]:
    """A connection of its own to the SQLite file at `path`, as another process's,
    holding SQLite's write lock (BEGIN IMMEDIATE) until the block rolls it back or ends."""
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        yield other
    finally:
        other.close()


@contextmanager
def count_queries(database: Database) -> Iterator[list[str]]:
    """The SQL statements `database` runs inside the block (BEGIN/COMMIT excluded), on
    its async engine and, on SQLite, its writer thread's engine (`write_with`)."""
    statements: list[str] = []

    def on_execute(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if not statement.lstrip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "PRAGMA")):
            statements.append(statement)

    engines = [database.engine.sync_engine, *([database._sync_engine] if database._sync_engine is not None else [])]
    for engine in engines:
        event.listen(engine, "before_cursor_execute", on_execute)
    try:
        yield statements
    finally:
        for engine in engines:
            event.remove(engine, "before_cursor_execute", on_execute)
