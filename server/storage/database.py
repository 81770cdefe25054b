"""The storage engine: one async SQLAlchemy engine over SQLite or PostgreSQL.

`Database.read()` and `Database.write()` hand out a connection inside a transaction
that commits when the block ends (and rolls back on an exception).

SQLite: WAL (readers never block the writer), `busy_timeout`, foreign keys on and
`synchronous=FULL` (a committed ledger record survives a power cut). Writers are
serialised: in-process by an asyncio lock (no busy-polling among our own coroutines),
across processes by `BEGIN IMMEDIATE`, which takes the write lock up front so a
read-then-write transaction can never be overtaken — that is what makes a
reservation's check-and-update atomic.

PostgreSQL: READ COMMITTED; every balance change is a single conditional UPDATE, which
re-checks its WHERE clause against the latest row version after waiting for a
concurrent writer, so check-and-update is atomic without explicit locks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

from sqlalchemy import Table, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql.dml import Insert

Backend = Literal["sqlite", "postgresql"]
T = TypeVar("T")

_BEGIN_MODE = "aigne_begin_mode"


class StorageError(Exception):
    """The database is unusable: bad URL, schema out of date, unreachable."""


def normalize_url(url: str | URL) -> URL:
    """`url` with an async driver: sqlite:// → sqlite+aiosqlite://, postgresql:// → +asyncpg."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.get_driver_name() != "aiosqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database in (None, "", ":memory:"):
            raise StorageError("an in-memory SQLite database cannot be shared; give a file path")
    elif backend in ("postgresql", "postgres"):
        if parsed.get_driver_name() != "asyncpg":
            parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise StorageError(f"unsupported database {backend!r}: use sqlite:///path or postgresql://...")
    return parsed


def backend_of(url: str | URL) -> Backend:
    return "sqlite" if make_url(url).get_backend_name() == "sqlite" else "postgresql"


def create_engine(
    url: str | URL,
    *,
    sqlite_busy_timeout_ms: int = 10_000,
    pool_size: int = 10,
    max_overflow: int = 20,
) -> AsyncEngine:
    """An engine for `url`, with the SQLite pragmas and BEGIN handling installed."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, pool_size=pool_size, max_overflow=max_overflow)
        _install_sqlite_hooks(engine, sqlite_busy_timeout_ms)
        return engine
    return create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        connect_args={"server_settings": {"timezone": "UTC", "application_name": "aigne-hub"}},
    )


def _switch_to_wal(cursor: Any, busy_timeout_ms: int) -> None:
    """WAL mode (it stays set in the file). Switching a new file takes a lock that
    connections opening it at once contend for, and SQLite answers "locked" at once
    instead of waiting (the busy handler is not used there): retry for the busy timeout.
    Only ever contended on a database's very first opening."""
    deadline = time.monotonic() + busy_timeout_ms / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except Exception as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


def _install_sqlite_hooks(engine: AsyncEngine, busy_timeout_ms: int) -> None:
    _install_sqlite_pragmas(engine.sync_engine, busy_timeout_ms)


def _install_sqlite_pragmas(engine: Engine, busy_timeout_ms: int) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: ConnectionPoolEntry) -> None:
        # Take over transaction control from the sqlite3 module (see SQLAlchemy's
        # "sqlite_transactions" notes) so that BEGIN is emitted by `_on_begin`.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            _switch_to_wal(cursor, busy_timeout_ms)
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA synchronous=FULL")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The gateway's database: an engine plus the transaction discipline above."""

    def __init__(self, engine: AsyncEngine, sqlite_busy_timeout_ms: int = 10_000) -> None:
        self.engine = engine
        self.backend: Backend = backend_of(engine.url)
        self._write_lock = asyncio.Lock() if self.backend == "sqlite" else None
        # SQLite's hot write (the ledger's group commit) runs whole in one thread on a
        # plain sqlite3 connection: through aiosqlite every statement is a thread hop,
        # about 18 per record and 2 ms of CPU; here a transaction is one hop.
        self._sync_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        if self.backend == "sqlite":
            self._sync_engine = sa_create_engine(engine.url.set(drivername="sqlite+pysqlite"), pool_size=1)
            _install_sqlite_pragmas(self._sync_engine, sqlite_busy_timeout_ms)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")

    @classmethod
    async def open(
        cls,
        url: str | URL,
        *,
        migrate: bool | None = None,
        sqlite_busy_timeout_ms: int = 10_000,
        pool_size: int = 10,
        max_overflow: int = 20,
    ) -> Database:
        """Connects to `url`. Migrates it to the latest schema when `migrate` is true
        (default: for SQLite only); otherwise checks that it is up to date."""
        from server.storage.migrate import check_current, upgrade_engine

        engine = create_engine(
            url, sqlite_busy_timeout_ms=sqlite_busy_timeout_ms, pool_size=pool_size, max_overflow=max_overflow
        )
        db = cls(engine, sqlite_busy_timeout_ms)
        try:
            if migrate if migrate is not None else db.backend == "sqlite":
                await upgrade_engine(engine)
            else:
                await check_current(engine)
        except (SQLAlchemyError, OSError) as exc:
            await engine.dispose()
            shown = engine.url.render_as_string(hide_password=True)
            raise StorageError(f"cannot use the database {shown}: {getattr(exc, 'orig', None) or exc}") from exc
        except BaseException:
            await engine.dispose()
            raise
        return db

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """A read-only transaction (a consistent snapshot; never blocks the writer)."""
        async with self.engine.connect() as conn, conn.begin():
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; on SQLite the only one running in this process."""
        if self._write_lock is None:
            async with self.engine.connect() as conn, conn.begin():
                yield conn
            return
        async with self._write_lock, self.engine.connect() as conn:
            conn = await conn.execution_options(**{_BEGIN_MODE: "IMMEDIATE"})
            async with conn.begin():
                yield conn

    async def write_in_thread(self, work: Callable[[Connection], T]) -> T:
        """Runs `work` in one SQLite write transaction (BEGIN IMMEDIATE) in the writer
        thread; only for SQLite, serialised with `write()`."""
        if self._sync_engine is None or self._writer is None or self._write_lock is None:
            raise RuntimeError("write_in_thread is for SQLite only")
        async with self._write_lock:
            return await asyncio.get_running_loop().run_in_executor(self._writer, self._run_write, work)

    def _run_write(self, work: Callable[[Connection], T]) -> T:
        assert self._sync_engine is not None
        with self._sync_engine.connect() as conn:
            conn = conn.execution_options(**{_BEGIN_MODE: "IMMEDIATE"})
            with conn.begin():
                return work(conn)

    def insert_ignoring_conflicts(self, table: Table, *index_elements: str) -> Insert:
        """`INSERT ... ON CONFLICT (index_elements) DO NOTHING` in this backend's dialect."""
        if self.backend == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(index_elements))
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(index_elements))

    async def close(self) -> None:
        await self.engine.dispose()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()
