"""Running the storage layer's async transaction code on a plain (sync) connection.

The ledger's group commit is written once, as async code over `Executor`. On
PostgreSQL it runs on an AsyncConnection; on SQLite it runs whole inside the writer
thread (`Database.write_in_thread`) on an `InlineConnection`, whose `execute` never
suspends, so the coroutine is driven to its end with `run_inline` without an event loop.

`insert_alone` writes a batch that settles nothing as one statement on a cursor in
autocommit mode (`Database.write_alone_in_thread`), with no transaction around it.

`insert_new` writes rows through the sqlite3 cursor itself, in the same transaction:
SQLAlchemy's statement execution (cache key, execution context, RETURNING result)
cost about five times what SQLite's insert and commit cost for the ledger's small
batches. The values pass through the columns' own bind processors (the UTC timestamp
type, SQLite's datetime format), so what is stored is what SQLAlchemy would store.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from sqlalchemy import Table
from sqlalchemy.engine import Connection, Dialect

T = TypeVar("T")


class Executor(Protocol):
    """What transaction code needs of a connection: AsyncConnection has it."""

    async def execute(self, statement: Any, parameters: Any = None) -> Any: ...


class InlineConnection:
    """An `Executor` over a sync Connection: awaiting `execute` runs the statement now."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    async def execute(self, statement: Any, parameters: Any = None) -> Any:
        return self._conn.execute(statement, parameters)

    def insert_new(self, table: Table, key: str, rows: Sequence[dict[str, Any]]) -> set[Any]:
        """Inserts `rows` (each with the same columns) into `table` on SQLite,
        skipping those whose `key` is taken; returns the keys of the rows inserted."""
        if not rows:
            return set()
        columns = tuple(rows[0])
        plan = _insert_plan(table, key, columns, self._conn.dialect)
        sql = plan.sql(1)
        cursor = self._conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        inserted: set[Any] = set()
        try:
            for row in rows:
                cursor.execute(sql, [bind(row[name]) for name, bind in zip(columns, plan.binds, strict=True)])
                if cursor.rowcount == 1:
                    inserted.add(row[key])
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
    types = (table.c[name].type.dialect_impl(dialect) for name in columns)
    binds = tuple(kind.bind_processor(dialect) or _unchanged for kind in types)
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
