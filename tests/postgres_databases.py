"""New PostgreSQL databases for one test or one benchmark run.

    async with new_database(server_url, "aigne_test") as url: ...

A database `<prefix>_<random>` on `server_url`'s server, empty, and dropped on exit
(`WITH (FORCE)`: connections left open do not keep it). Shared by the storage tests'
fixture (tests/storage_fixtures.py) and the bench (tests/bench/stack.py); each says in
its own way what to do when the server cannot be reached (asyncpg's or the OS's error
comes out of entering the block).
"""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator

import asyncpg
from sqlalchemy.engine import make_url


@contextlib.asynccontextmanager
async def new_database(server_url: str, prefix: str) -> AsyncIterator[str]:
    """The URL of a new, empty database on `server_url`'s server, dropped on exit."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    admin = await asyncpg.connect(server_url, timeout=5)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield make_url(server_url).set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
