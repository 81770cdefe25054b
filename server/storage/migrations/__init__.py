"""Alembic migrations of the storage schema; `server.storage.migrate` runs them."""
