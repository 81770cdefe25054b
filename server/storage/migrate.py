"""Versioned schema migrations (Alembic), run programmatically.

    upgrade(url)                 from a command (blocking; `aigne-hub migrate` later)
    await upgrade_engine(engine) on start (SQLite) or from async code
    await check_current(engine)  refuses to start on an out-of-date schema
                                 (server.storage.schema_version: no Alembic needed)

Migrations run in one transaction (both backends have transactional DDL), so a
failed migration leaves the database as it was. On PostgreSQL an advisory lock
serialises replicas that start (or migrate) at the same time.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncEngine

from server.storage.database import _BEGIN_MODE, Timeouts, create_engine
from server.storage.schema_version import VERSION_TABLE, SchemaOutOfDate, check_current, current_revision

__all__ = [
    "MIGRATIONS_DIR",
    "VERSION_TABLE",
    "SchemaOutOfDate",
    "check_current",
    "current_revision",
    "head_revision",
    "upgrade",
    "upgrade_engine",
]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# pg_advisory_xact_lock key: any fixed 64-bit number ("aigne-hub" in ASCII, truncated).
_PG_LOCK_KEY = 0x616967_6E6568_75


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    return config


def head_revision() -> str:
    """The newest revision as Alembic reads it from the scripts (schema_version's
    HEAD_REVISION must equal it)."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None
    return head


def upgrade(database_url: str | URL, revision: str = "head") -> None:
    """Migrates the database at `database_url` to `revision` (blocking)."""

    async def run() -> None:
        engine = create_engine(database_url, timeouts=Timeouts(statement_s=None))
        try:
            await upgrade_engine(engine, revision)
        finally:
            await engine.dispose()

    asyncio.run(run())


async def upgrade_engine(engine: AsyncEngine, revision: str = "head") -> None:
    async with engine.connect() as conn:
        if engine.dialect.name == "sqlite":
            conn = await conn.execution_options(**{_BEGIN_MODE: "IMMEDIATE"})
        async with conn.begin():
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _PG_LOCK_KEY})
            await conn.run_sync(_upgrade_sync, revision)


def _upgrade_sync(connection: Connection, revision: str) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, revision)
