"""Migrations: from empty, idempotent, matching the schema, safe to run concurrently."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Connection, text

from server.storage import Database, SchemaOutOfDate, StorageError, StorageSettings, normalize_url
from server.storage.database import create_engine
from server.storage.migrate import (
    VERSION_TABLE,
    check_current,
    current_revision,
    head_revision,
    upgrade,
    upgrade_engine,
)
from server.storage.schema import metadata
from server.storage.schema_version import HEAD_REVISION
from tests.storage_fixtures import database_url  # noqa: F401


def _schema_diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True, "version_table": VERSION_TABLE})
    return list(compare_metadata(context, metadata))


async def test_migrations_apply_from_empty_and_are_idempotent(database_url: str) -> None:  # noqa: F811
    engine = create_engine(database_url)
    try:
        assert await current_revision(engine) is None
        with pytest.raises(SchemaOutOfDate, match="empty database"):
            await check_current(engine)

        # The blocking entry point a CLI command will call (it runs its own event loop).
        await asyncio.to_thread(upgrade, database_url)
        assert await current_revision(engine) == head_revision()
        await asyncio.to_thread(upgrade, database_url)  # again: nothing to do, no error
        await upgrade_engine(engine)
        assert await current_revision(engine) == head_revision()
        await check_current(engine)

        async with engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
    finally:
        await engine.dispose()


def test_the_head_revision_constant_is_alembics_head() -> None:
    # Workers check the schema against the constant without Alembic: a new migration
    # must update it.
    assert head_revision() == HEAD_REVISION


async def test_an_older_schema_is_refused_with_both_revisions_named(database_url: str) -> None:  # noqa: F811
    engine = create_engine(database_url)
    try:
        await upgrade_engine(engine, "0005")
        assert await current_revision(engine) == "0005"
        with pytest.raises(SchemaOutOfDate, match=f"at 0005, this gateway needs {HEAD_REVISION}"):
            await check_current(engine)
        await upgrade_engine(engine)
        await check_current(engine)
    finally:
        await engine.dispose()


async def test_checking_the_schema_does_not_import_alembic(tmp_path: Path) -> None:
    # What a worker does (serve migrated the database once): open it without migrating.
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    await asyncio.to_thread(upgrade, url)
    script = (
        "import asyncio, sys\n"
        "import server.app\n"
        "from server.storage import Database\n"
        f"db = asyncio.run(Database.open({url!r}, migrate=False))\n"
        "asyncio.run(db.close())\n"
        "print(sorted(name for name in sys.modules if name.split('.')[0] == 'alembic'))\n"
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()
    assert stdout.decode().strip() == "[]"


async def test_concurrent_upgrades_are_serialised(database_url: str) -> None:  # noqa: F811
    engines = [create_engine(database_url) for _ in range(3)]
    try:
        await asyncio.gather(*(upgrade_engine(engine) for engine in engines))
        for engine in engines:
            assert await current_revision(engine) == head_revision()
    finally:
        for engine in engines:
            await engine.dispose()


async def test_open_migrates_sqlite_but_only_checks_postgresql(database_url: str) -> None:  # noqa: F811
    if database_url.startswith("sqlite"):
        db = await Database.open(database_url)  # SQLite: migrated on start
        await db.close()
    else:
        with pytest.raises(SchemaOutOfDate, match="run the migrations"):
            await Database.open(database_url)
        db = await Database.open(database_url, migrate=True)
        await db.close()
        db = await Database.open(database_url)  # now up to date
        await db.close()


async def test_sqlite_default_file_in_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGNE_HUB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("AIGNE_HUB_DATABASE_URL", raising=False)
    url = StorageSettings().resolved_database_url()
    assert url == f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}"
    db = await Database.open(url)
    try:
        assert (tmp_path / "data" / "aigne-hub.db").is_file()
        async with db.read() as conn:
            assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
            assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
            assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 10_000
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 2  # FULL: survives a power cut
    finally:
        await db.close()


async def test_sqlite_synchronous_normal_is_set_on_every_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AIGNE_HUB_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("AIGNE_HUB_SQLITE_SYNCHRONOUS", "normal")
    monkeypatch.delenv("AIGNE_HUB_DATABASE_URL", raising=False)
    db = await Database.open_with(StorageSettings())
    try:
        async with db.read() as conn:
            assert (await conn.execute(text("PRAGMA synchronous"))).scalar() == 1  # NORMAL
        # The ledger's writer thread has its own connection: the same setting.
        seen = await db.write_in_thread(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar())
        assert seen == 1
    finally:
        await db.close()


async def test_an_unsynced_write_runs_under_normal_and_the_writer_goes_back_to_full(tmp_path: Path) -> None:
    """A credit reservation's commit waits for the OS, not the disk (Database.write_with);
    every other write on the same writer connection stays synced."""
    db = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}")
    try:

        async def synchronous(conn: Any) -> int:
            return int((await conn.execute(text("PRAGMA synchronous"))).scalar())

        assert await db.write_with(synchronous, synced=False) == 1  # NORMAL, for this transaction
        assert await db.write_with(synchronous) == 2  # FULL again, on the same connection
        assert await db.write_in_thread(lambda conn: conn.exec_driver_sql("PRAGMA synchronous").scalar()) == 2
    finally:
        await db.close()


def test_database_url_selects_the_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AIGNE_HUB_DATABASE_URL", "postgresql://hub@db.internal/hub")
    assert StorageSettings().resolved_database_url() == "postgresql://hub@db.internal/hub"
    assert normalize_url("postgresql://hub@db/hub").drivername == "postgresql+asyncpg"
    assert normalize_url("sqlite:///x.db").drivername == "sqlite+aiosqlite"
    with pytest.raises(StorageError, match="in-memory"):
        normalize_url("sqlite://")
    with pytest.raises(StorageError, match="unsupported"):
        normalize_url("mysql://x/y")
