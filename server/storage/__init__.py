"""Storage: one schema over an embedded SQLite file (default) or PostgreSQL.

    db = await Database.open(StorageSettings().resolved_database_url())
    async with db.write() as conn: ...
    async with db.read() as conn: ...

`server.storage.migrate.upgrade(url)` runs the versioned migrations (on start for
SQLite, by command for PostgreSQL); `server.storage.schema` holds the tables.
"""

from server.storage.database import Backend, Database, StorageError, create_engine, normalize_url
from server.storage.migrate import SchemaOutOfDate, check_current, upgrade, upgrade_engine
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
    "upgrade",
    "upgrade_engine",
]
