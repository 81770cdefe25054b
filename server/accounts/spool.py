"""The ledger's local spool: where usage records go when the database cannot take them.

A record the client is answered for must never be lost. When the ledger's database
write fails (PostgreSQL down, SQLite disk full or locked, ...), the batch's records are
appended to a spool file, one JSON object per line (the record and its credit
reservation id), and fsynced; the callers are then answered as usual because their
records are durable. `SpoolReplayer` moves spooled records into the database when it
works again and removes the file. Replaying is idempotent: the ledger's insert ignores
request ids already recorded, and a reservation is settled only once (settling deletes
it), so a file replayed twice (a crash mid-replay) records and charges each call once.

Files and locks. Each process appends to its own file, `ledger-<pid>-<random>.jsonl`,
and holds an exclusive `flock` on it for as long as it writes there. A file is created
under a temporary name, locked, then renamed, so no replayer ever sees an unlocked
file that is still being written. A replayer takes a file with a non-blocking `flock`:
a file of a dead process (its lock died with it) is replayed by whichever process
finds it first, and two replicas sharing the directory never replay one file at once.
To replay its own records a process first `rotate`s: it stops appending to its file
(the next failure opens a new one) and releases the lock.

A failed append is cut off the file again (its callers are told their records are
lost, so they must not be replayed); a torn last line left by a process that died
inside a write (before the fsync that would have let its callers be answered) is
skipped with a warning. A line the database refuses on
its own while its neighbours are accepted is moved to `<file>.rejected` for an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import secrets
import threading
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from server.accounts.credits import Reservation
from server.accounts.ledger import Ledger, UsageRecord

log = logging.getLogger(__name__)

SPOOL_SUFFIX = ".jsonl"
REJECTED_SUFFIX = ".rejected"
_TEMP_PREFIX = ".new-"
_PROBE_NAME = ".probe"
_RECORD_FIELDS = {f.name for f in fields(UsageRecord)}


@dataclass(frozen=True, slots=True)
class SpooledRecord:
    """One spooled call: its record and the credit reservation its record settles
    (`drawn_micros`: a draw of that many from the credit block `reservation_id`)."""

    usage: UsageRecord
    reservation_id: str | None = None
    drawn_micros: int | None = None

    @classmethod
    def of(cls, usage: UsageRecord, reservation: Reservation | None) -> SpooledRecord:
        if reservation is None or reservation.id is None:
            return cls(usage)
        return cls(usage, reservation.id, reservation.amount_micros if reservation.drawn else None)

    def reservation(self) -> Reservation | None:
        """What the record settles, as far as its settlement needs to know."""
        if self.reservation_id is None:
            return None
        drawn = self.drawn_micros is not None
        return Reservation(self.reservation_id, "", None, self.drawn_micros or 0, drawn=drawn)


def encode(item: SpooledRecord) -> bytes:
    values: dict[str, Any] = asdict(item.usage)
    values["created_at"] = item.usage.created_at.isoformat()
    values["reservation_id"] = item.reservation_id
    if item.drawn_micros is not None:
        values["drawn_micros"] = item.drawn_micros
    return json.dumps(values, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> SpooledRecord:
    """A spooled line as a record; ValueError (or a subclass) when it is not one."""
    values = json.loads(line)
    if not isinstance(values, dict):
        raise ValueError("a spooled record is a JSON object")
    reservation_id = values.pop("reservation_id", None)
    drawn_micros = values.pop("drawn_micros", None)
    if drawn_micros is not None and (type(drawn_micros) is not int or drawn_micros < 0):
        raise ValueError("drawn_micros is a count of credit micros")
    values = {name: value for name, value in values.items() if name in _RECORD_FIELDS}
    values["created_at"] = datetime.fromisoformat(values["created_at"])
    return SpooledRecord(UsageRecord(**values), reservation_id, drawn_micros)


class Spool:
    """This process's spool file in `directory` (blocking I/O: call from a thread)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._file: IO[bytes] | None = None
        self._lock = threading.Lock()  # appends and rotations from several threads

    def append(self, records: Sequence[tuple[UsageRecord, Reservation | None]]) -> None:
        """Appends the records (each with the reservation it settles) and fsyncs them;
        raises OSError when they are not durable."""
        data = b"".join(encode(SpooledRecord.of(usage, reservation)) for usage, reservation in records)
        with self._lock:
            spool = self._file if self._file is not None else self._open()
            size = os.fstat(spool.fileno()).st_size
            try:
                spool.write(data)
                spool.flush()
                os.fsync(spool.fileno())
            except OSError:
                # Their callers learn these records are lost: take back what reached
                # the file (a replay would record calls whose answers were withheld),
                # and never append to it again.
                self._discard_after(spool, size)
                self._close()
                raise

    def rotate(self) -> None:
        """Stops appending to the current file and unlocks it, so it can be replayed."""
        with self._lock:
            self._close()

    def probe(self) -> None:
        """Writes and fsyncs a small file: raises OSError when the spool could not
        keep a record now."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.directory / f"{_PROBE_NAME}-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            with path.open("wb") as probe:
                probe.write(b"{}\n")
                probe.flush()
                os.fsync(probe.fileno())
        finally:
            with contextlib.suppress(OSError):
                path.unlink()

    def _open(self) -> IO[bytes]:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        name = f"ledger-{os.getpid()}-{secrets.token_hex(6)}{SPOOL_SUFFIX}"
        temp = self.directory / f"{_TEMP_PREFIX}{name}"
        spool = temp.open("ab")
        try:
            fcntl.flock(spool.fileno(), fcntl.LOCK_EX)
            os.rename(temp, self.directory / name)
            _fsync_directory(self.directory)
        except OSError:
            spool.close()
            with contextlib.suppress(OSError):
                temp.unlink()
            raise
        log.warning("ledger records are being spooled to %s until the database takes them", self.directory / name)
        self._file = spool
        return spool

    @staticmethod
    def _discard_after(spool: IO[bytes], size: int) -> None:
        try:
            os.ftruncate(spool.fileno(), size)
            os.fsync(spool.fileno())
        except OSError as exc:
            log.error("could not take back a failed append to the spool file %s: %s", spool.name, exc)

    def _close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()  # closing releases the flock
            self._file = None


def spool_files(directory: Path) -> list[Path]:
    """The spool files in `directory`, oldest first (none when it does not exist)."""
    found: list[tuple[float, str, Path]] = []
    try:
        for path in directory.iterdir():
            if path.name.endswith(SPOOL_SUFFIX) and not path.name.startswith("."):
                with contextlib.suppress(FileNotFoundError):  # replayed meanwhile
                    found.append((path.stat().st_mtime, path.name, path))
    except OSError:
        return []
    return [path for _, _, path in sorted(found)]


@contextlib.contextmanager
def taken(path: Path) -> Iterator[IO[bytes] | None]:
    """The spool file at `path` opened and exclusively locked, or None when another
    process holds it (its writer, or another replayer) or it is already gone."""
    try:
        spool = path.open("rb")
    except FileNotFoundError:
        yield None
        return
    with spool:
        try:
            fcntl.flock(spool.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield None
            return
        # Replayed and removed by someone else between our open and our lock?
        if not path.exists() or os.stat(path).st_ino != os.fstat(spool.fileno()).st_ino:
            yield None
            return
        yield spool


def read_records(spool: IO[bytes], path: Path) -> list[SpooledRecord]:
    """The records of a spool file; a torn or unreadable line is logged and skipped."""
    items: list[SpooledRecord] = []
    for number, line in enumerate(spool.read().split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            items.append(decode(line))
        except (ValueError, TypeError, KeyError) as exc:
            log.warning("skipping unreadable line %d of spool file %s: %s", number, path, exc)
    return items


def reject(path: Path, items: Sequence[SpooledRecord]) -> None:
    """Keeps records the database refused in `<path>.rejected` for an operator."""
    with open(f"{path}{REJECTED_SUFFIX}", "ab") as rejected:
        rejected.write(b"".join(encode(item) for item in items))
        rejected.flush()
        os.fsync(rejected.fileno())


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        _fsync_directory(path.parent)


class SpoolReplayer:
    """Moves spooled records into the database when it takes writes again, and turns
    the ledger writable again when a record can be kept (database or spool)."""

    def __init__(self, ledger: Ledger, spool: Spool, *, interval_s: float = 5.0, batch_size: int = 500) -> None:
        self._ledger = ledger
        self._spool = spool
        self._interval_s = interval_s
        self._batch_size = batch_size

    async def run(self) -> None:
        """Replays every `interval_s` until cancelled (at start too: files left by
        processes that died are replayed by the first one to find them)."""
        while True:
            try:
                await self.replay_once()
            except Exception:
                log.exception("replaying the ledger spool failed; retrying in %.0f s", self._interval_s)
            await asyncio.sleep(self._interval_s)

    async def replay_once(self) -> int:
        """One round: returns how many records went into the database."""
        if not self._ledger.writable:
            await self._probe()
        paths = spool_files(self._spool.directory)
        if not paths:
            return 0
        try:
            await self._ledger.probe_database()
        except Exception as exc:  # noqa: BLE001 - still down: try again next round
            log.info("ledger spool waits for the database (%s)", exc)
            return 0
        # Our own file is complete up to here; new failures start a new one.
        await asyncio.to_thread(self._spool.rotate)
        replayed = 0
        for path in paths:
            replayed += await self._replay_file(path)
        return replayed

    async def _probe(self) -> None:
        try:
            await asyncio.to_thread(self._spool.probe)
        except OSError:
            try:
                await self._ledger.probe_database()
            except Exception:  # noqa: BLE001 - neither can keep a record yet
                return
        self._ledger.mark_writable()

    async def _replay_file(self, path: Path) -> int:
        with taken(path) as spool:
            if spool is None:
                return 0
            items = await asyncio.to_thread(read_records, spool, path)
            rejected: list[SpooledRecord] = []
            for start in range(0, len(items), self._batch_size):
                rejected += await self._replay_batch(items[start : start + self._batch_size])
            if rejected:
                log.error(
                    "the database refused %d spooled usage records; kept in %s%s", len(rejected), path, REJECTED_SUFFIX
                )
                await asyncio.to_thread(reject, path, rejected)
            await asyncio.to_thread(remove, path)
        log.warning("replayed %d spooled usage records from %s into the database", len(items) - len(rejected), path)
        return len(items) - len(rejected)

    async def _replay_batch(self, batch: Sequence[SpooledRecord]) -> list[SpooledRecord]:
        """Writes `batch`; returns the records the database refused on their own.
        Raises (the file stays) when the database takes none of them."""
        try:
            await self._ledger.replay(batch)
            return []
        except Exception:
            if len(batch) == 1:
                raise
        refused: list[SpooledRecord] = []
        last_error: Exception | None = None
        for item in batch:
            try:
                await self._ledger.replay([item])
            except Exception as exc:  # noqa: BLE001
                refused.append(item)
                last_error = exc
        if len(refused) == len(batch) and last_error is not None:
            raise last_error
        return refused


def _fsync_directory(directory: Path) -> None:
    """Makes a file's creation, rename or removal in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
