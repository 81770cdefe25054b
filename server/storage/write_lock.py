"""One SQLite writer at a time across the processes of a `serve --workers N`, without
SQLite's busy handler sleeping.

SQLite serialises writers itself: a BEGIN IMMEDIATE that finds another process
writing waits in its busy handler, which sleeps 1, 2, 5, 10, 15, 20, 25... ms between
tries. Each worker's writer thread commits a group of records or reservations every
millisecond or so under load, so with two workers they collide all the time and each
collision costs the loser a sleep several times longer than the transaction it waited
for: at 16 connections two workers served fewer chat calls than one.

So the writer threads take an exclusive `flock` on a file beside the database around
each transaction (`<database>-writer.lock`): a waiting worker sees the lock free within
a fraction of a millisecond of its release (it polls at most every 0.5 ms), and SQLite's
own lock is then free too. The lock is advisory and only the writer threads take it:
other writers (the CLI, the admin API's transactions) still wait in SQLite's busy
handler, as before. Waiting is bounded by the busy timeout, like SQLite's own wait
(which may follow it, for a writer that does not take this lock: twice that at worst), and
a worker killed while holding the lock releases it (the kernel drops a dead process's
flocks). A separate file, never the database: closing any descriptor of the database
file would drop SQLite's own POSIX locks held by this process.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

# Between tries while another process holds the lock: short at first (a group commit
# takes about a millisecond), then at most this long.
_FIRST_WAIT_S = 0.00005
_LONGEST_WAIT_S = 0.0005


class WriterLock:
    """An exclusive lock over the database's writer threads, in every process."""

    def __init__(self, database_path: Path, timeout_s: float) -> None:
        self.path = database_path.with_name(database_path.name + "-writer.lock")
        self._timeout_s = timeout_s
        self._fd: int | None = None
        self._unusable = False

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Holds the lock for the block; raises sqlite3.OperationalError ("database is
        locked", an outage as SQLite's own would be) after the timeout. Where the lock
        file cannot be opened, the block runs without it (SQLite still serialises)."""
        fd = self._open()
        if fd is None:
            yield
            return
        self._acquire(fd)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    @contextlib.contextmanager
    def tried(self) -> Iterator[bool]:
        """Holds the lock for the block if it is free now (yields True), else yields
        False at once: for a write that must not wait (Database's writes on the event
        loop's thread)."""
        fd = self._open()
        if fd is None:
            yield True
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                raise
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _open(self) -> int | None:
        if self._fd is None and not self._unusable:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except OSError as exc:
                self._unusable = True
                log.warning("cannot open %s (%s); SQLite's busy handler alone serialises writers", self.path, exc)
        return self._fd

    def _acquire(self, fd: int) -> None:
        deadline = time.monotonic() + self._timeout_s
        wait = _FIRST_WAIT_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EINTR):
                    raise
            if time.monotonic() >= deadline:
                raise sqlite3.OperationalError("database is locked (another process's writer holds it)")
            time.sleep(wait)
            wait = min(wait * 2, _LONGEST_WAIT_S)
