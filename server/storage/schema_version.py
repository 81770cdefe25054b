"""Which schema revision a database is at, read without Alembic.

Every gRPC worker checks the schema before it serves (`serve` migrated it once);
importing Alembic and parsing the migration scripts for that cost each worker
4-6 MB. The head revision is a constant here instead; a test checks it against
Alembic's own head (`server.storage.migrate.head_revision`), so a new migration
without it fails the suite.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncEngine

from server.storage.database import StorageError

# Alembic's version table, renamed so that it cannot clash with an application's own.
VERSION_TABLE = "aigne_hub_schema_version"
# The newest migration in server/storage/migrations/versions (update with each one).
HEAD_REVISION = "0007"


class SchemaOutOfDate(StorageError):
    """The database's schema is older (or newer) than this gateway's."""


async def current_revision(engine: AsyncEngine) -> str | None:
    """The revision the database is at; None for a database never migrated."""
    async with engine.connect() as conn:
        try:
            rows = (await conn.execute(text(f"SELECT version_num FROM {VERSION_TABLE}"))).scalars().all()
        except DBAPIError as exc:
            if _no_such_table(exc):
                return None
            raise
    if len(rows) > 1:
        raise SchemaOutOfDate(f"the database records several schema revisions ({', '.join(sorted(rows))})")
    return rows[0] if rows else None


def _no_such_table(exc: DBAPIError) -> bool:
    # PostgreSQL's SQLSTATE for an undefined table; SQLite has only its message.
    return getattr(exc.orig, "sqlstate", None) == "42P01" or "no such table" in str(exc.orig).lower()


async def check_current(engine: AsyncEngine) -> None:
    """Raises SchemaOutOfDate unless the database is at this gateway's revision."""
    current = await current_revision(engine)
    if current != HEAD_REVISION:
        raise SchemaOutOfDate(
            f"the database schema is at {current or 'nothing (empty database)'}, this gateway needs "
            f"{HEAD_REVISION}; run the migrations (`aigne-hub migrate`, or start one `aigne-hub serve` "
            "on a SQLite file) first"
        )
