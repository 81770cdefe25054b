"""Running the storage layer's async transaction code on a plain (sync) connection.

The ledger's group commit is written once, as async code over `Executor`. On
PostgreSQL it runs on an AsyncConnection; on SQLite it runs whole inside the writer
thread (`Database.write_in_thread`) on an `InlineConnection`, whose `execute` never
suspends, so the coroutine is driven to its end with `run_inline` without an event loop.
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, Protocol, TypeVar

from sqlalchemy.engine import Connection

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


def run_inline(coro: Coroutine[Any, Any, T]) -> T:
    """Runs a coroutine that never suspends (its only awaits are InlineConnection's)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("inline transaction code tried to wait for something")
