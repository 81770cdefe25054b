"""The storage engine: one async SQLAlchemy engine over SQLite or PostgreSQL.

`Database.read()` and `Database.write()` hand out a connection inside a transaction
that commits when the block ends (and rolls back on an exception).

SQLite: WAL (readers never block the writer), `busy_timeout`, foreign keys on and
`synchronous=FULL` by default (a committed ledger record survives a power cut; each
commit waits for the disk). `AIGNE_HUB_SQLITE_SYNCHRONOUS=normal` trades that for
latency: a commit survives the process's crash (`kill -9`) but the commits since the
last checkpoint may be lost to a power cut or an OS crash; it took about 1.4 ms off a
chat call at one connection on the test VM (README). Writers are
serialised: in-process by an asyncio lock (no busy-polling among our own coroutines),
across processes by `BEGIN IMMEDIATE`, which takes the write lock up front so a
read-then-write transaction can never be overtaken — that is what makes a
reservation's check-and-update atomic.

PostgreSQL: READ COMMITTED; every balance change is a single conditional UPDATE, which
re-checks its WHERE clause against the latest row version after waiting for a
concurrent writer, so check-and-update is atomic without explicit locks.

Outages: every way in is bounded, and a database that cannot be used is one error.
`read()`, `write()`, `write_in_thread()`, `write_grouped()` and `write_alone_in_thread()` turn driver,
connection and timeout failures into `server.errors.StorageUnavailable` (503, retry hint) once, here, so every
caller (authentication, reservations, ledger, admin API) reports an outage the same
way; the detail goes to the log (URL with its password masked, SQL parameters hidden;
one warning per 10 s with a count, not one per call), never to the client. Constraint
violations and SQL errors (bugs) pass through as they are.
- Connecting: asyncpg's `timeout` (TCP connect plus start-up) and the pool's checkout
  wait are both the connect timeout.
- Statements: PostgreSQL's own `statement_timeout` cancels a slow statement cleanly;
  asyncpg's `command_timeout` (one second later) gives up on a server that does not
  answer at all (frozen, or a network that drops packets).
- After a client-side timeout asyncpg waits, unbounded, for the server to confirm the
  cancel before it runs anything else on that connection (the rollback when the block
  ends would hang), and SQLAlchemy's invalidation tries a graceful close (2 s more).
  So a connection whose command timed out or was cancelled has its socket closed at
  once (a `handle_error` hook), and as the bound where no driver has one, a whole
  transaction is cut at connect + 2 * (statement timeout + 1 s).
- Migrations run on an engine of their own without statement timeouts.
- Dead pooled connections: no `pool_pre_ping`, which costs a BEGIN/ping/ROLLBACK (three
  round trips) on every checkout (on loopback +0.1 ms CPU and +0.1-0.3 ms per read
  transaction, about +35 %; a network hop adds three round trips). Instead a checkout drops a connection whose socket
  the driver already knows is closed (no I/O), and a failed connection is dropped on
  its own (not the whole pool, SQLAlchemy's default: closing idle connections
  gracefully would wait on a frozen server). The gateway recovers without a restart.
- SQLite: the busy timeout bounds waiting for another process's lock; waiting for
  this process's write lock is bounded by it too. A full disk or I/O error is an outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, TypeVar, cast

from sqlalchemy import Table, event
from sqlalchemy import create_engine as sa_create_engine
from sqlalchemy import exc as sa_exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Dialect, Engine, ExceptionContext, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import ConnectionPoolEntry, PoolProxiedConnection
from sqlalchemy.sql.dml import Insert

from server.errors import StorageUnavailable
from server.storage.inline import Executor, InlineConnection, run_inline
from server.storage.settings import SqliteSynchronous, StorageSettings
from server.storage.write_lock import WriterLock

Backend = Literal["sqlite", "postgresql"]
T = TypeVar("T")

_BEGIN_MODE = "aigne_begin_mode"
log = logging.getLogger(__name__)
# SQLSTATE classes that mean "the server cannot serve now", not "the SQL is wrong":
# connection exception, insufficient resources (disk full, too many connections),
# operator intervention (statement timeout, shutdown, starting up), system error (I/O).
_UNAVAILABLE_SQLSTATE_CLASSES = frozenset({"08", "53", "57", "58"})
_QUERY_CANCELED = "57014"  # PostgreSQL's statement_timeout
OUTAGE_LOG_INTERVAL_S = 10.0


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


@dataclass(frozen=True, slots=True)
class Timeouts:
    """How long the gateway waits for its database (see the module docstring).
    `statement_s` None: statements are not bounded (migrations, which may build an
    index on a large table or wait for another replica's migration lock)."""

    connect_s: float = 5.0
    statement_s: float | None = 10.0
    sqlite_busy_ms: int = 10_000

    @property
    def command_s(self) -> float | None:
        """The client-side bound of one statement: after the server's own."""
        return None if self.statement_s is None else self.statement_s + 1.0

    @property
    def transaction_s(self) -> float | None:
        """The bound on a whole read()/write() block, for what no driver bounds."""
        return None if self.command_s is None else self.connect_s + 2 * self.command_s


def create_engine(
    url: str | URL,
    *,
    sqlite_busy_timeout_ms: int = 10_000,
    sqlite_synchronous: SqliteSynchronous = "full",
    pool_size: int = 10,
    max_overflow: int = 20,
    timeouts: Timeouts | None = None,
) -> AsyncEngine:
    """An engine for `url`, with the SQLite pragmas and BEGIN handling installed."""
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        engine = create_async_engine(parsed, pool_size=pool_size, max_overflow=max_overflow, hide_parameters=True)
        _install_sqlite_pragmas(engine.sync_engine, sqlite_busy_timeout_ms, sqlite_synchronous)
        return engine
    timeouts = timeouts or Timeouts()
    engine = create_async_engine(
        parsed,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_timeout=timeouts.connect_s,
        # SQL parameters (key hashes, sealed credentials) stay out of error messages.
        hide_parameters=True,
        connect_args={
            "timeout": timeouts.connect_s,
            "command_timeout": timeouts.command_s,
            "server_settings": {
                "timezone": "UTC",
                "application_name": "aigne-hub",
                "statement_timeout": str(round((timeouts.statement_s or 0) * 1000)),  # 0: none
            },
        },
    )
    _install_postgresql_hooks(engine.sync_engine)
    return engine


def _install_postgresql_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "checkout")
    def _on_checkout(dbapi_connection: Any, _record: ConnectionPoolEntry, _proxy: PoolProxiedConnection) -> None:
        # The socket is known closed (server restarted, proxy reset): take another.
        if dbapi_connection.driver_connection.is_closed():
            raise sa_exc.DisconnectionError("the pooled connection was closed by the server")

    @event.listens_for(engine, "handle_error")
    def _on_error(context: ExceptionContext) -> None:
        # Not every pooled connection is dropped on one failure (SQLAlchemy's default):
        # closing them would wait on a frozen server; the checkout check above catches
        # those the server closed, and a failed one is dropped on its own.
        context.invalidate_pool_on_disconnect = False
        if not isinstance(context.original_exception, (TimeoutError, asyncio.CancelledError)):
            return
        # The client gave up mid-command: asyncpg would wait, unbounded, for the server
        # to confirm the cancel before the rollback, and SQLAlchemy's invalidation tries
        # a graceful close first (2 s more on a frozen server). Close the socket now.
        context.is_disconnect = True
        if context.connection is not None and not context.connection.invalidated:
            driver = context.connection.connection.driver_connection
            if driver is not None:
                driver.terminate()


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


def _install_sqlite_pragmas(engine: Engine, busy_timeout_ms: int, synchronous: SqliteSynchronous) -> None:
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
            cursor.execute(f"PRAGMA synchronous={'FULL' if synchronous == 'full' else 'NORMAL'}")
        finally:
            cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        mode = conn.get_execution_options().get(_BEGIN_MODE, "DEFERRED")
        if mode is not None:  # None: the caller has begun it (Database._run_write)
            conn.exec_driver_sql(f"BEGIN {mode}")


class Database:
    """The gateway's database: an engine plus the transaction discipline above."""

    def __init__(
        self,
        engine: AsyncEngine,
        sqlite_busy_timeout_ms: int = 10_000,
        timeouts: Timeouts | None = None,
        sqlite_synchronous: SqliteSynchronous = "full",
    ) -> None:
        self.engine = engine
        self.backend: Backend = backend_of(engine.url)
        self.timeouts = timeouts or Timeouts(sqlite_busy_ms=sqlite_busy_timeout_ms)
        self._shown_url = engine.url.render_as_string(hide_password=True)
        self._outage_logged_at = -OUTAGE_LOG_INTERVAL_S
        self._outages_unlogged = 0
        self._write_lock = asyncio.Lock() if self.backend == "sqlite" else None
        self._synchronous = sqlite_synchronous
        # SQLite's hot write (the ledger's group commit) runs whole in one thread on a
        # plain sqlite3 connection: through aiosqlite every statement is a thread hop,
        # about 18 per record and 2 ms of CPU; here a transaction is one hop.
        self._sync_engine: Engine | None = None
        self._writer: ThreadPoolExecutor | None = None
        if self.backend == "sqlite":
            self._sync_engine = sa_create_engine(
                # The writer thread holds two between writes (`_alone`, `_held`), the
                # event loop's thread one (`_here`).
                engine.url.set(drivername="sqlite+pysqlite"),
                pool_size=3,
                hide_parameters=True,
            )
            _install_sqlite_pragmas(self._sync_engine, self.timeouts.sqlite_busy_ms, sqlite_synchronous)
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sqlite-writer")
        # The writer threads of every process on this SQLite file, one at a time.
        self._across_processes: WriterLock | None = None
        if self.backend == "sqlite" and engine.url.database not in (None, "", ":memory:"):
            database_file = Path(str(engine.url.database))
            self._across_processes = WriterLock(database_file, self.timeouts.sqlite_busy_ms / 1000)
        # The writer thread's connections, held between writes: for `write_alone_in_thread`
        # (a raw one) and for the transactions (`_writer_connection`).
        self._alone: PoolProxiedConnection | None = None
        self._held: Connection | None = None
        # The event loop's thread's own connection, for `write_grouped`'s writes that find
        # the writer idle (`_write_here`); None until the first, False where unusable.
        self._here: Connection | bool | None = None
        # Transactions run in the writer thread, and on the event loop's thread
        # (`_write_here`), so far (tests count them).
        self.writer_transactions = 0
        self.here_transactions = 0
        # `write_grouped`'s waiting writes, and the task writing them.
        self._grouped: list[_Grouped] = []
        self._grouping: asyncio.Task[None] | None = None

    @classmethod
    async def open_with(cls, settings: StorageSettings, *, migrate: bool | None = None) -> Database:
        """`open` with the URL, pool and timeouts of `settings`."""
        return await cls.open(
            settings.resolved_database_url(),
            migrate=migrate,
            sqlite_busy_timeout_ms=settings.sqlite_busy_timeout_ms,
            sqlite_synchronous=settings.sqlite_synchronous,
            pool_size=settings.database_pool_size,
            max_overflow=settings.database_max_overflow,
            connect_timeout_s=settings.database_connect_timeout_s,
            statement_timeout_s=settings.database_statement_timeout_s,
        )

    @classmethod
    async def open(
        cls,
        url: str | URL,
        *,
        migrate: bool | None = None,
        sqlite_busy_timeout_ms: int = 10_000,
        sqlite_synchronous: SqliteSynchronous = "full",
        pool_size: int = 10,
        max_overflow: int = 20,
        connect_timeout_s: float = 5.0,
        statement_timeout_s: float = 10.0,
    ) -> Database:
        """Connects to `url`. Migrates it to the latest schema when `migrate` is true
        (default: for SQLite only); otherwise checks that it is up to date."""
        from server.storage.schema_version import check_current

        timeouts = Timeouts(connect_timeout_s, statement_timeout_s, sqlite_busy_timeout_ms)
        engine = create_engine(
            url,
            sqlite_busy_timeout_ms=sqlite_busy_timeout_ms,
            sqlite_synchronous=sqlite_synchronous,
            pool_size=pool_size,
            max_overflow=max_overflow,
            timeouts=timeouts,
        )
        db = cls(engine, sqlite_busy_timeout_ms, timeouts, sqlite_synchronous)
        try:
            if migrate if migrate is not None else db.backend == "sqlite":
                await _migrate(url, replace(timeouts, statement_s=None))
            else:
                await check_current(engine)
        except (sa_exc.SQLAlchemyError, OSError) as exc:
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
        async with self._transaction() as conn:
            yield conn

    @asynccontextmanager
    async def write(self) -> AsyncIterator[AsyncConnection]:
        """A write transaction; on SQLite the only one running in this process."""
        if self._write_lock is None:
            async with self._transaction() as conn:
                yield conn
            return
        async with self._write_lock_held(), self._transaction(**{_BEGIN_MODE: "IMMEDIATE"}) as conn:
            yield conn

    @asynccontextmanager
    async def write_one_statement(self) -> AsyncIterator[AsyncConnection]:
        """PostgreSQL: a connection for a write that is one statement, which commits on
        its own (autocommit): one round trip instead of BEGIN, the statement, COMMIT."""
        if self.backend != "postgresql":
            raise RuntimeError("write_one_statement is for PostgreSQL only")
        async with self._transaction(isolation_level="AUTOCOMMIT") as conn:
            yield conn

    async def write_in_thread(self, work: Callable[[Connection], T], *, synced: bool = True) -> T:
        """Runs `work` in one SQLite write transaction (BEGIN IMMEDIATE) in the writer
        thread; only for SQLite, serialised with `write()`. `synced=False`: see
        `write_with`."""
        if self._sync_engine is None or self._writer is None or self._write_lock is None:
            raise RuntimeError("write_in_thread is for SQLite only")
        run = functools.partial(self._run_write, work, synced)
        async with self._write_lock_held():
            try:
                return await asyncio.get_running_loop().run_in_executor(self._writer, run)
            except Exception as exc:
                self._raise_if_outage(exc)
                raise

    def _run_write(self, work: Callable[[Connection], T], synced: bool = True) -> T:
        self.writer_transactions += 1
        with self._writer_turn():
            return self._run_write_now(work, synced)

    def _writer_turn(self) -> contextlib.AbstractContextManager[None]:
        """This process's writer thread's turn among every process's (`WriterLock`)."""
        return self._across_processes.held() if self._across_processes is not None else contextlib.nullcontext()

    def _run_write_now(self, work: Callable[[Connection], T], synced: bool) -> T:
        conn = self._writer_connection()
        lazy = not synced and self._synchronous == "full"
        driver: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        try:
            if lazy:
                driver.execute("PRAGMA synchronous=NORMAL")
            try:
                # BEGIN and COMMIT straight on sqlite3: through SQLAlchemy's transaction
                # (its begin event, a statement execution) they cost more than a small
                # transaction's own statements. SQLAlchemy's bookkeeping begins only
                # when a statement goes through it (the begin event then emits nothing).
                driver.execute("BEGIN IMMEDIATE")
                try:
                    result = work(conn)
                except BaseException:
                    _end_transaction(conn, driver, commit=False)
                    raise
                _end_transaction(conn, driver, commit=True)
                return result
            finally:
                if lazy:
                    self._restore_synced(conn, driver)
        except (sqlite3.Error, sa_exc.DBAPIError):
            # The connection may be unusable (an I/O error): the next write opens another.
            self._release_held()
            raise

    def _writer_connection(self) -> Connection:
        """The writer thread's SQLAlchemy connection, kept between transactions: a
        pool checkout and return (with its reset) per transaction cost more than a
        small transaction's statements."""
        assert self._sync_engine is not None
        if self._held is not None and (self._held.invalidated or self._held.closed):
            self._release_held()  # set back to FULL failed (`_restore_synced`)
        if self._held is None:
            # No BEGIN from the begin event: `_run_write` has begun the transaction.
            self._held = self._sync_engine.connect().execution_options(**{_BEGIN_MODE: None})
        return self._held

    def _release_held(self) -> None:
        if self._held is not None:
            held, self._held = self._held, None
            with contextlib.suppress(Exception):
                held.invalidate()
            held.close()

    def _restore_synced(self, conn: Connection, driver: Any) -> None:
        """Back to FULL after a `synced=False` transaction; a connection that cannot be
        set back is dropped, never reused unsynced."""
        try:
            driver.execute("PRAGMA synchronous=FULL")
        except sqlite3.Error:
            conn.invalidate()

    async def write_with(self, work: Callable[[Executor], Coroutine[Any, Any, T]], *, synced: bool = True) -> T:
        """Runs `work` (transaction code written once, over `Executor`) in one write
        transaction: on SQLite whole in the writer thread (`write_in_thread`: one
        hand-off, where aiosqlite makes every statement one), on PostgreSQL in `write()`.

        `synced=False` (SQLite with `synchronous=FULL`): the commit waits for the OS,
        not the disk (`synchronous=NORMAL` for this transaction only). For a write whose
        loss in a power cut is harmless until a later synced commit, as a credit
        reservation's: the WAL is one file written in order, so the fsync of any later
        commit (the call's ledger record, which settles the reservation) makes this one
        durable too; a power cut before that loses the hold together with the call it
        was for, which never got its answer. `kill -9` loses nothing either way."""
        if self.backend == "sqlite":
            return await self.write_in_thread(lambda conn: run_inline(work(InlineConnection(conn))), synced=synced)
        async with self.write() as conn:
            return await work(conn)

    async def write_grouped(self, work: Callable[[Executor], Coroutine[Any, Any, T]], *, synced: bool = True) -> T:
        """`write_with` for a small write that many calls make at once (a credit
        reservation): on SQLite the calls that come while the writer thread is busy
        share one transaction, each in a SAVEPOINT of its own, so one raising rolls
        back its own work only and the others still commit. The group is synced when
        any of its writes is. On PostgreSQL, which runs transactions side by side, it
        is `write_with`.

        Why: each transaction is BEGIN, its statements, COMMIT and the synchronous
        switch, each a hand-back of the GIL to and from the event loop's thread; the
        writer thread is serial, so that overhead capped the calls per second with
        billing on. When the writer is idle a write goes straight to `write_with`; those
        that come while it is busy wait for the next group. A caller cancelled before
        its group starts is left out of it; once started, its work commits or fails
        with the group, as `write_with`'s does. An unsynced write that finds the writer
        idle is done on the event loop's thread when it can be (`_write_here`)."""
        assert self._write_lock is not None or self.backend != "sqlite"
        if self._write_lock is None or (self._grouping is None and not self._write_lock.locked()):
            # PostgreSQL; or SQLite's writer is idle: no group to wait for. An unsynced
            # write is then done right here, without the writer thread, where it can be.
            if self._write_lock is not None and not synced:
                written, here = self._write_here(work)
                if written:
                    return cast(T, here)
            return await self.write_with(work, synced=synced)
        loop = asyncio.get_running_loop()
        item = _Grouped(work, synced, loop.create_future())
        self._grouped.append(item)
        if self._grouping is None:
            self._grouping = loop.create_task(self._write_groups(), name="sqlite-grouped-writes")
        result: T = await item.future
        return result

    async def _write_groups(self) -> None:
        """Writes the waiting groups, one transaction each, until none waits."""
        group: list[_Grouped] = []
        try:
            while self._grouped:
                async with self._write_lock_held():
                    group, self._grouped = [item for item in self._grouped if not item.future.done()], []
                    if group:
                        await self._write_group(group)
        except BaseException as exc:
            # The write lock's wait timed out (an outage), or this task was cancelled
            # (shutdown): no caller is left waiting for ever.
            failure = exc if isinstance(exc, Exception) else StorageUnavailable("the gateway is shutting down")
            for item in (*group, *self._grouped):
                if not item.future.done():
                    item.future.set_exception(failure)
            self._grouped = []
            if not isinstance(exc, Exception):
                raise
        finally:
            self._grouping = None

    async def _write_group(self, group: list[_Grouped]) -> None:
        synced = any(item.synced for item in group)
        run = functools.partial(self._run_write, functools.partial(_run_group, group), synced)
        try:
            outcomes = await asyncio.get_running_loop().run_in_executor(self._writer, run)
        except Exception as exc:  # noqa: BLE001 - BEGIN or COMMIT failed: none of the group was written, each caller learns why
            outcomes = [exc] * len(group)
        for item, outcome in zip(group, outcomes, strict=True):
            if item.future.done():  # its caller was cancelled meanwhile
                continue
            if isinstance(outcome, _Failed):
                outcome = outcome.error
            if isinstance(outcome, Exception):
                try:
                    self._raise_if_outage(outcome)
                except StorageUnavailable as unavailable:
                    outcome = unavailable
                item.future.set_exception(outcome)
            else:
                item.future.set_result(outcome)

    def _write_here(self, work: Callable[[Executor], Coroutine[Any, Any, T]]) -> tuple[bool, T | None]:
        """An unsynced SQLite write on the event loop's thread, when nothing else of this
        process writes: (True, its result), or (False, None) where it cannot be done
        without waiting (another process writes), which leaves it to the writer thread.

        Why: a hand-off to the writer thread and back costs two thread wake-ups, the GIL
        passed over twice and the loop woken by the result; without it a billed chat
        call took about 4 % less CPU (at 1 and at 16 connections). It never waits: the
        workers' lock is only tried, and this connection's busy timeout is 0 (SQLite's
        lock held elsewhere fails BEGIN at once). Its commit waits for the OS, not the
        disk (`synced=False`), and it never checkpoints the WAL (`wal_autocheckpoint=0`:
        the writer thread's commits do), so it does no disk wait on the loop's thread."""
        conn = self._here_connection()
        if conn is None:
            return False, None
        driver: sqlite3.Connection = conn.connection.dbapi_connection  # type: ignore[assignment]
        turn = self._across_processes.tried() if self._across_processes is not None else contextlib.nullcontext(True)
        try:
            with turn as ours:
                if not ours:
                    return False, None
                try:
                    driver.execute("BEGIN IMMEDIATE")
                except sqlite3.OperationalError:
                    return False, None  # another process holds SQLite's write lock
                self.here_transactions += 1
                try:
                    result = run_inline(work(InlineConnection(conn)))
                except BaseException:
                    _end_transaction(conn, driver, commit=False)
                    raise
                _end_transaction(conn, driver, commit=True)
                return True, result
        except (sqlite3.Error, sa_exc.DBAPIError) as exc:
            self._drop_here()
            self._raise_if_outage(exc)
            raise

    def _here_connection(self) -> Connection | None:
        if self._here is None and self._sync_engine is not None:
            try:
                conn = self._sync_engine.connect().execution_options(**{_BEGIN_MODE: None})
                conn.exec_driver_sql("PRAGMA busy_timeout=0")
                conn.exec_driver_sql("PRAGMA synchronous=NORMAL")
                conn.exec_driver_sql("PRAGMA wal_autocheckpoint=0")
                conn.commit()
                self._here = conn
            except (sqlite3.Error, sa_exc.DBAPIError):
                self._here = False
        return self._here if isinstance(self._here, Connection) else None

    def _drop_here(self) -> None:
        if isinstance(self._here, Connection):
            here, self._here = self._here, None
            with contextlib.suppress(Exception):
                here.invalidate()
            here.close()

    async def write_alone_in_thread(self, work: Callable[[sqlite3.Cursor], T]) -> T:
        """Runs `work` in the writer thread on a cursor in autocommit mode, for a write
        that is one statement: SQLite commits it on its own, serialised with `write()`
        and `write_in_thread()`; only for SQLite.

        Why not a transaction: the sqlite3 module lets go of the GIL around every step
        of SQLite, and under load the writer thread then waits for the event loop's
        thread to give it back, up to the switch interval each time. BEGIN, one INSERT
        per row and COMMIT were six such waits per group commit of four records (about
        8 ms of its latency at 16 connections); one statement is one. SQLAlchemy's
        connection and transaction (about 0.25 ms of CPU per commit) are skipped too:
        the cursor is the writer's own pooled connection, kept between writes."""
        if self._sync_engine is None or self._writer is None or self._write_lock is None:
            raise RuntimeError("write_alone_in_thread is for SQLite only")
        async with self._write_lock_held():
            try:
                return await asyncio.get_running_loop().run_in_executor(self._writer, self._run_alone, work)
            except Exception as exc:
                self._raise_if_outage(exc)
                raise

    @property
    def sqlite_dialect(self) -> Dialect:
        """The dialect of the writer thread's connections (for bind processors)."""
        if self._sync_engine is None:
            raise RuntimeError("sqlite_dialect is for SQLite only")
        return self._sync_engine.dialect

    def _release_writer_connections(self) -> None:
        if self._alone is not None:
            self._alone.close()
            self._alone = None
        if self._held is not None:
            self._held.close()
            self._held = None

    def _run_alone(self, work: Callable[[sqlite3.Cursor], T]) -> T:
        with self._writer_turn():
            return self._run_alone_now(work)

    def _run_alone_now(self, work: Callable[[sqlite3.Cursor], T]) -> T:
        assert self._sync_engine is not None
        if self._alone is None:
            self._alone = self._sync_engine.raw_connection()
        try:
            cursor: sqlite3.Cursor = self._alone.driver_connection.cursor()  # type: ignore[union-attr]
            try:
                return work(cursor)
            finally:
                cursor.close()
        except sqlite3.Error:
            # The connection may be unusable (an I/O error): the next write opens another.
            self._alone.invalidate()
            self._alone = None
            raise

    @asynccontextmanager
    async def _write_lock_held(self) -> AsyncIterator[None]:
        """This process's SQLite write lock, waited for no longer than the busy timeout."""
        assert self._write_lock is not None
        try:
            async with asyncio.timeout(self.timeouts.sqlite_busy_ms / 1000):
                await self._write_lock.acquire()
        except TimeoutError as exc:
            self._raise_if_outage(exc)
            raise
        try:
            yield
        finally:
            self._write_lock.release()

    @asynccontextmanager
    async def _transaction(self, **options: Any) -> AsyncIterator[AsyncConnection]:
        """A connection in a transaction; a failure to use the database comes out as
        StorageUnavailable, after the connection was dropped when it may be unusable."""
        # aiosqlite runs in a thread that cannot be cut short; its busy timeout bounds it.
        bound = self.timeouts.transaction_s if self.backend == "postgresql" else None
        try:
            async with asyncio.timeout(bound), self.engine.connect() as conn:
                if options:
                    conn = await conn.execution_options(**options)
                async with conn.begin():
                    yield conn
        except Exception as exc:
            self._raise_if_outage(exc)
            raise

    def _raise_if_outage(self, exc: Exception) -> None:
        """Raises the client-facing StorageUnavailable for `exc` when it is an outage
        (logging the detail); returns for any other failure."""
        what = _outage_kind(exc)
        if what is None or isinstance(exc, StorageUnavailable):
            return
        self._log_outage(what, exc)
        raise StorageUnavailable(
            f"the gateway's database {what}; retry later", retry_after_seconds=max(1.0, self.timeouts.connect_s)
        ) from exc

    def _log_outage(self, what: str, exc: Exception) -> None:
        """One warning per `OUTAGE_LOG_INTERVAL_S` during an outage, not one per call."""
        now = time.monotonic()
        if now - self._outage_logged_at < OUTAGE_LOG_INTERVAL_S:
            self._outages_unlogged += 1
            return
        also = f" ({self._outages_unlogged} more failures since the last report)" if self._outages_unlogged else ""
        log.warning("database %s %s: %s%s", self._shown_url, what, _describe(exc), also)
        self._outage_logged_at, self._outages_unlogged = now, 0

    def insert_ignoring_conflicts(self, table: Table, *index_elements: str) -> Insert:
        """`INSERT ... ON CONFLICT (index_elements) DO NOTHING` in this backend's dialect."""
        if self.backend == "sqlite":
            return sqlite.insert(table).on_conflict_do_nothing(index_elements=list(index_elements))
        return postgresql.insert(table).on_conflict_do_nothing(index_elements=list(index_elements))

    async def close(self) -> None:
        if self._grouping is not None:
            with contextlib.suppress(Exception):
                await self._grouping
        await self.engine.dispose()
        self._drop_here()
        if self._writer is not None:
            if self._alone is not None or self._held is not None:
                # Returned to the pool in its own thread (sqlite3 checks the thread).
                await asyncio.get_running_loop().run_in_executor(self._writer, self._release_writer_connections)
            self._writer.shutdown(wait=True)
        if self._sync_engine is not None:
            self._sync_engine.dispose()
        if self._across_processes is not None:
            self._across_processes.close()


def _end_transaction(conn: Connection, driver: sqlite3.Connection, *, commit: bool) -> None:
    """Ends the writer's transaction begun on `driver`: through SQLAlchemy when a
    statement went through it (so that its bookkeeping ends too; it commits or rolls
    back the same sqlite3 transaction), else straight."""
    if conn.in_transaction():
        if commit:
            conn.commit()
        else:
            conn.rollback()
    elif driver.in_transaction:
        driver.execute("COMMIT" if commit else "ROLLBACK")


@dataclass(frozen=True)
class _Grouped:
    """One `write_grouped` call waiting for its group."""

    work: Callable[[Executor], Coroutine[Any, Any, Any]]
    synced: bool
    future: asyncio.Future[Any]


@dataclass(frozen=True)
class _Failed:
    """A grouped write that raised (its savepoint rolled back)."""

    error: Exception


def _run_group(group: list[_Grouped], conn: Connection) -> list[Any]:
    """The group's writes in `conn`'s transaction, in the writer thread; each one's
    result, or `_Failed`. A lone write needs no savepoint: what it raises rolls back
    the transaction, which is its own, and reaches its caller. A savepoint that cannot be rolled back to (the
    connection failed) raises, and the whole group fails with it."""
    if len(group) == 1:
        return [run_inline(group[0].work(InlineConnection(conn)))]
    driver: sqlite3.Connection = conn.connection.driver_connection  # type: ignore[assignment]
    outcomes: list[Any] = []
    for item in group:
        driver.execute("SAVEPOINT grouped_write")
        try:
            outcomes.append(run_inline(item.work(InlineConnection(conn))))
        except Exception as exc:  # noqa: BLE001 - its caller gets it; the group goes on
            driver.execute("ROLLBACK TO grouped_write")
            outcomes.append(_Failed(exc))
        driver.execute("RELEASE grouped_write")
    return outcomes


async def _migrate(url: str | URL, timeouts: Timeouts) -> None:
    """Runs the migrations on an engine of their own, whose statements are not bounded."""
    from server.storage.migrate import upgrade_engine

    engine = create_engine(url, sqlite_busy_timeout_ms=timeouts.sqlite_busy_ms, pool_size=1, timeouts=timeouts)
    try:
        await upgrade_engine(engine)
    finally:
        await engine.dispose()


def _outage_kind(exc: BaseException) -> str | None:
    """How `exc` shows the database cannot be used now, or None for other failures
    (constraint violations, SQL errors: bugs or the caller's business)."""
    if isinstance(exc, (TimeoutError, sa_exc.TimeoutError)):
        return "did not answer in time"
    if isinstance(exc, sa_exc.DBAPIError):
        sqlstate = getattr(exc.orig, "sqlstate", None)
        if sqlstate == _QUERY_CANCELED:
            return "did not answer in time"
        if isinstance(sqlstate, str) and sqlstate[:2] in _UNAVAILABLE_SQLSTATE_CLASSES:
            return "is unavailable"
        if exc.connection_invalidated or isinstance(exc, (sa_exc.OperationalError, sa_exc.InterfaceError)):
            return "is unavailable"
        return None
    if isinstance(exc, sa_exc.DisconnectionError):
        return "is unreachable"
    if isinstance(exc, sqlite3.OperationalError):  # from a raw cursor: locked, I/O, disk full
        return "is unavailable"
    if isinstance(exc, OSError):
        return "is unreachable"
    return None


def _describe(exc: BaseException) -> str:
    """The driver's own account of `exc` for the log (SQL parameters are hidden)."""
    orig = getattr(exc, "orig", None) or exc
    return f"{type(orig).__name__}: {orig}".strip()
