"""Alembic environment: runs on the connection `server.storage.migrate` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from server.storage.schema import metadata
from server.storage.schema_version import VERSION_TABLE

connection = context.config.attributes.get("connection")
if not isinstance(connection, Connection):
    raise RuntimeError("run migrations through server.storage.migrate, which provides the connection")

context.configure(
    connection=connection,
    target_metadata=metadata,
    version_table=VERSION_TABLE,
    # SQLite cannot ALTER most things; batch mode rebuilds tables instead.
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
