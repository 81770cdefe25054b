"""Storage: one schema over an embedded SQLite file (default) or PostgreSQL.

    db = await Database.open(StorageSettings().resolved_database_url())
    async with db.write() as conn: ...
    async with db.read() as conn: ...

`server.storage.migrate.upgrade(url)` runs the versioned migrations (on start for
SQLite, by command for PostgreSQL; it imports Alembic, so it is not imported here: a
worker only checks the revision, see `server.storage.schema_version`);
`server.storage.schema` holds the tables.
"""

from server.storage.database import Backend, Database, StorageError, create_engine, normalize_url
from server.storage.schema_version import SchemaOutOfDate, check_current
from server.storage.settings import StorageSettings

__all__ = [
    "Backend",
    "Database",
    "SchemaOutOfDate",
    "StorageError",
    "StorageSettings",
    "check_current",
    "create_engine",
    "normalize_url",
]
