"""SQLite's writer threads take turns across processes through a file lock
(`server.storage.write_lock`), without SQLite's busy handler sleeping between tries."""

from __future__ import annotations

import asyncio
import fcntl
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.errors import StorageUnavailable
from server.storage import Database
from server.storage.inline import Executor
from server.storage.schema import owners, utcnow

MARGIN_S = 2.0  # a shared, noisy machine


async def _add_owner(database: Database, *, grouped: bool = False) -> None:
    """One owner written by the writer thread (`write_with`), or as a credit reservation
    is (`write_grouped`, unsynced: on the event loop's thread when it can be)."""
    name = secrets.token_hex(4)

    async def work(conn: Executor) -> None:
        await conn.execute(owners.insert().values(id=f"user:{name}", kind="user", name=name, created_at=utcnow()))

    if grouped:
        await database.write_grouped(work, synced=False)
    else:
        await database.write_with(work)


async def _owner_count(database: Database) -> int:
    async with database.read() as conn:
        return len((await conn.execute(owners.select())).all())


def _hold_lock_in_another_process(lock_file: Path, seconds: float) -> subprocess.Popen[bytes]:
    """Another process holding the writers' lock for `seconds`; returns once it holds it."""
    script = (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(lock_file)!r}, os.O_RDWR | os.O_CREAT)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "print('held', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert process.stdout is not None and process.stdout.readline() == b"held\n"
    return process


async def test_a_writer_waits_for_another_processes_writer_and_goes_right_after(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}")
    try:
        lock_file = path.with_name("hub.db-writer.lock")
        holder = _hold_lock_in_another_process(lock_file, 0.6)
        started = time.monotonic()
        await asyncio.gather(_add_owner(database), _add_owner(database))
        waited = time.monotonic() - started
        holder.wait()
        assert waited > 0.3, "the writers waited for the other process's turn"
        assert waited < 0.6 + MARGIN_S
        assert await _owner_count(database) == 2
    finally:
        await database.close()


async def test_a_write_on_the_loops_thread_yields_to_another_processes_writer(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}")
    try:
        holder = _hold_lock_in_another_process(path.with_name("hub.db-writer.lock"), 0.6)
        started = time.monotonic()
        await asyncio.gather(_add_owner(database, grouped=True), _add_owner(database, grouped=True))
        waited = time.monotonic() - started
        holder.wait()
        assert waited > 0.3, "the writes waited for the other process's turn"
        assert database.here_transactions == 0, "not on the loop's thread: that would have blocked it"
        await _add_owner(database, grouped=True)  # the lock free: on the loop's thread
        assert database.here_transactions == 1
        assert await _owner_count(database) == 3
    finally:
        await database.close()


async def test_two_databases_on_one_file_take_turns_and_lose_nothing(tmp_path: Path) -> None:
    """Two engines on one file stand in for two workers: each holds the lock through
    its own descriptor, so they exclude each other as two processes do; half the
    writes go as reservations do (on the loop's thread when they can)."""
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    first = await Database.open(url)
    second = await Database.open(url, migrate=False)
    try:
        await asyncio.gather(*(_add_owner(first if i % 2 else second, grouped=i % 4 < 2) for i in range(80)))
        assert await _owner_count(first) == 80
    finally:
        await second.close()
        await first.close()


async def test_waiting_for_the_lock_is_bounded_by_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}", sqlite_busy_timeout_ms=300)
    lock_file = path.with_name("hub.db-writer.lock")
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer that never lets go
        started = time.monotonic()
        with pytest.raises(StorageUnavailable):
            await _add_owner(database)
        assert 0.25 < time.monotonic() - started < 0.3 + MARGIN_S
        fcntl.flock(fd, fcntl.LOCK_UN)
        await _add_owner(database)  # and it works again
        assert await _owner_count(database) == 1
    finally:
        os.close(fd)
        await database.close()
