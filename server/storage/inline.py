"""Running the storage layer's async transaction code on a plain (sync) connection.

The ledger's group commit is written once, as async code over `Executor`. On
PostgreSQL it runs on an AsyncConnection; on SQLite it runs whole inside the writer
thread (`Database.write_in_thread`) on an `InlineConnection`, whose `execute` never
suspends, so the coroutine is driven to its end with `run_inline` without an event loop.

`insert_alone` writes a batch that settles nothing as one statement on a cursor in
autocommit mode (`Database.write_alone_in_thread`), with no transaction around it.

A statement marked with `prebuilt` (built once, at import) runs on the sqlite3
cursor itself too: compiled once for SQLite, its parameters put in order through the
same bind processors, its RETURNING rows through the same result processors. Through
SQLAlchemy's execution (cache lookup, execution context, result object) the same
UPDATE took about 45 us of the writer thread's CPU; SQLite's own work, about 5.
Listeners of `before_cursor_execute` still see it (tests count statements so).

`insert_new` writes rows through the sqlite3 cursor itself, in the same transaction:
SQLAlchemy's statement execution (cache key, execution context, RETURNING result)
cost about five times what SQLite's insert and commit cost for the ledger's small
batches. The values pass through the columns' own bind processors (the UTC timestamp
type, SQLite's datetime format), so what is stored is what SQLAlchemy would store.
"""

from __future__ import annotations

import collections
import functools
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect
from sqlalchemy.sql.dml import UpdateBase

T = TypeVar("T")
S = TypeVar("S", bound=UpdateBase)

# Rows per multi-row INSERT: SQLite before 3.32 allows 999 parameters per statement,
# later ones 32766 (the ledger's rows have 21 columns).
ROWS_PER_STATEMENT = 1000 if sqlite3.sqlite_version_info >= (3, 32) else 999 // 21


class Executor(Protocol):
    """What transaction code needs of a connection: AsyncConnection has it."""

    async def execute(self, statement: Any, parameters: Any = None) -> Any: ...


class InlineConnection:
    """An `Executor` over a sync Connection: awaiting `execute` runs the statement now."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._cursor: sqlite3.Cursor | None = None

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        marked = _PREBUILT.get(id(statement))
        if marked is None or not isinstance(parameters, dict):
            return self._conn.execute(statement, parameters)
        plan = marked.plan(self._conn.dialect, parameters)
        if self._cursor is None:
            self._cursor = self._conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        values = plan.values(parameters)
        listeners = self._conn.dispatch.before_cursor_execute
        if listeners:
            listeners(self._conn, self._cursor, plan.sql, values, None, False)
        return plan.run(self._cursor, values)

    def insert_new(self, table: Table, key: str, rows: Sequence[dict[str, Any]]) -> set[Any]:
        """Inserts `rows` (each with the same columns) into `table` on SQLite,
        skipping those whose `key` is taken; returns the keys of the rows inserted.
        One statement per `ROWS_PER_STATEMENT` rows (`insert_alone`), in the transaction."""
        cursor = self._conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        inserted: set[Any] = set()
        try:
            for start in range(0, len(rows), ROWS_PER_STATEMENT):
                chunk = rows[start : start + ROWS_PER_STATEMENT]
                inserted |= insert_alone(cursor, self._conn.dialect, table, key, chunk)
        finally:
            cursor.close()
        return inserted


def insert_alone(
    cursor: sqlite3.Cursor, dialect: Dialect, table: Table, key: str, rows: Sequence[dict[str, Any]]
) -> set[Any]:
    """Inserts `rows` (each with the same columns) into `table` on SQLite in ONE
    statement, skipping those whose `key` is taken; returns the keys of the rows
    inserted. On a cursor in autocommit mode the statement commits on its own.

    Which rows a partly refused statement inserted: SQLite gives a new row the rowid
    after the table's largest (unless that is the largest possible), so this statement's
    rows are the last `rowcount` rowids up to `lastrowid`."""
    if not rows:
        return set()
    columns = tuple(rows[0])
    plan = _insert_plan(table, key, columns, dialect)
    values = [bind(row[name]) for row in rows for name, bind in zip(columns, plan.binds, strict=True)]
    cursor.execute(plan.sql(len(rows)), values)
    count = cursor.rowcount
    if count == len(rows):
        return {row[key] for row in rows}
    if count <= 0 or cursor.lastrowid is None:
        return set()
    last = cursor.lastrowid
    found = cursor.execute(f'SELECT "{key}" FROM "{table.name}" WHERE rowid > ? AND rowid <= ?', (last - count, last))
    return {found_key for (found_key,) in found.fetchall()}


def prebuilt(statement: S) -> S:
    """Marks `statement` (an INSERT, UPDATE or DELETE built once, at import) to run
    straight on the sqlite3 cursor when an `InlineConnection` executes it with a dict
    of parameters; anywhere else it is the same statement. Kept for good: its id stays
    its own."""
    _PREBUILT[id(statement)] = _Prebuilt(statement)
    return statement


class RawResult:
    """What SQLAlchemy's result gives that the prebuilt statements' callers use."""

    def __init__(self, rowcount: int, rows: list[Any]) -> None:
        self.rowcount = rowcount
        self._rows = rows

    def all(self) -> list[Any]:
        return list(self._rows)

    def one_or_none(self) -> Any:
        if len(self._rows) > 1:
            raise ValueError(f"expected at most one row, got {len(self._rows)}")
        return self._rows[0] if self._rows else None


@dataclass(frozen=True)
class _RawPlan:
    """A prebuilt statement compiled for one dialect and one set of parameter names."""

    sql: str
    order: tuple[str, ...]  # parameter names by position (a name may come twice)
    binds: tuple[Callable[[Any], Any], ...]  # by position
    fixed: dict[str, Any]  # the values the statement itself gives (`.values(x=1)`)
    row: Any  # a namedtuple type for RETURNING rows, or None
    results: tuple[Callable[[Any], Any], ...]  # by RETURNING column

    def values(self, parameters: dict[str, Any]) -> list[Any]:
        given = {**self.fixed, **parameters} if self.fixed else parameters
        try:
            return [bind(given[name]) for name, bind in zip(self.order, self.binds, strict=True)]
        except KeyError as missing:
            raise ValueError(f"no value for the parameter {missing} of {self.sql!r}") from None

    def run(self, cursor: sqlite3.Cursor, values: list[Any]) -> RawResult:
        cursor.execute(self.sql, values)
        if self.row is None:
            return RawResult(cursor.rowcount, [])
        rows = [self.row(*(read(v) for read, v in zip(self.results, raw, strict=True))) for raw in cursor.fetchall()]
        return RawResult(cursor.rowcount, rows)


class _Prebuilt:
    def __init__(self, statement: UpdateBase) -> None:
        self.statement = statement
        self._plans: dict[tuple[Dialect, frozenset[str]], _RawPlan] = {}

    def plan(self, dialect: Dialect, parameters: dict[str, Any]) -> _RawPlan:
        # An INSERT without VALUES takes its columns from the parameters' names.
        key = (dialect, frozenset(parameters))
        found = self._plans.get(key)
        if found is None:
            found = self._plans[key] = self._compile(dialect, list(parameters))
        return found

    def _compile(self, dialect: Dialect, names: list[str]) -> _RawPlan:
        compiled = self.statement.compile(dialect=dialect, column_keys=names)
        order = tuple(compiled.positiontup or ())
        if len(order) != compiled.string.count("?") or any(b.expanding for b in compiled.binds.values()):
            raise ValueError(f"cannot prebuild {compiled.string!r}: it needs SQLAlchemy's own execution")
        binds = tuple(_processor(compiled.binds[name].type, dialect) for name in order)
        fixed = {name: compiled.binds[name].effective_value for name in order if not compiled.binds[name].required}
        columns = list(self.statement.exported_columns)
        row = collections.namedtuple("Row", [column.name for column in columns]) if columns else None
        results = tuple(
            column.type.dialect_impl(dialect).result_processor(dialect, None) or _unchanged for column in columns
        )
        return _RawPlan(compiled.string, order, binds, fixed, row, results)


_PREBUILT: dict[int, _Prebuilt] = {}


def _processor(kind: Any, dialect: Dialect) -> Callable[[Any], Any]:
    processor: Callable[[Any], Any] | None = kind.dialect_impl(dialect).bind_processor(dialect)
    return processor or _unchanged


def _unchanged(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class _InsertPlan:
    """`INSERT ... ON CONFLICT (key) DO NOTHING` in SQLite's words, for any number of
    rows, and each column's bind processor."""

    head: str
    row: str
    tail: str
    binds: tuple[Callable[[Any], Any], ...]

    def sql(self, rows: int) -> str:
        return f"{self.head} VALUES {', '.join([self.row] * rows)} {self.tail}"


@functools.cache
def _insert_plan(table: Table, key: str, columns: tuple[str, ...], dialect: Dialect) -> _InsertPlan:
    names = ", ".join(f'"{name}"' for name in columns)
    row = f"({', '.join('?' for _ in columns)})"
    binds = tuple(_processor(table.c[name].type, dialect) for name in columns)
    return _InsertPlan(f'INSERT INTO "{table.name}" ({names})', row, f'ON CONFLICT ("{key}") DO NOTHING', binds)


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends (its only awaits are InlineConnection's)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("inline transaction code tried to wait for something")
