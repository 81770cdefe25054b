"""The usage ledger: one durable record per call, and totals that match it exactly.

`Ledger.record` returns only after the record is committed, so awaiting it before a
response completes makes the response's record durable. Concurrent records are
committed together (group commit): while one transaction is in flight, new records
queue up and the next transaction takes all of them, so under load the number of
commits (and fsyncs) per record falls instead of the latency rising.

The request id is unique and the insert is `ON CONFLICT DO NOTHING`: recording a call
twice (a retry, a bug, two replicas) leaves one record and charges once.

A record may carry the call's credit `Reservation`: it is settled in the same
transaction as the record is written, so a charge never exists without its record or
a record without its charge, and `credits_micros` in the ledger is exactly what left
the balance. `cost_micros` is the call's price at the rates even with billing off.
On PostgreSQL such a batch is one call of the database function
`aigne_hub_record_usage` (migration 0007): `_write_in`'s steps in one statement, where
they were six round trips for one record.

When the database write fails, a ledger with a `Spool` appends the batch's records to
it (fsynced) and answers its callers as if committed: the records are durable and are
replayed into the database later (see server.accounts.spool). A failed batch is spooled
whole rather than retried record by record: in an outage every retry would wait for the
database again, and one bad record no longer sinks the others (the replay sets aside a
record the database refuses on its own). When the spool fails too, the callers get
STORAGE_UNAVAILABLE and `writable` turns False until a record can be written again
(the meter refuses new calls meanwhile, before any provider is called).

Outcomes: "ok"; "error" (the call failed, `error_reason` says why); "cancelled" (the
client went away); "interrupted" (the gateway ended the call itself while shutting
down, `error_reason` SHUTTING_DOWN). The outcome column has no CHECK constraint, so a
new value needs no migration; `errors` in the totals counts every outcome but "ok".

`on_commit` (metrics) is told how long each group commit took; `queue_depth` is the
number of records waiting for the next one.

Once a record's transaction commits, or finally fails, the ledger tells the
`CreditService` to stop renewing the reservation's lease (`forget`): settled, or left
to lapse and be swept. A spooled record's
reservation stays held (renewed by this process) until the replay settles it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING, Any, Literal, get_args

import orjson
from sqlalchemy import ColumnElement, case, func, select, text, tuple_

from server.accounts.credits import (
    CreditService,
    HeldReservation,
    Reservation,
    apply_settlements,
    charge_for,
    take_reservations,
    undraw,
)
from server.accounts.errors import format_credits
from server.errors import StorageUnavailable
from server.storage.database import Database
from server.storage.inline import ROWS_PER_STATEMENT, Executor, InlineConnection, insert_alone
from server.storage.schema import usage_records, utcnow

if TYPE_CHECKING:
    from server.accounts.spool import Spool, SpooledRecord

log = logging.getLogger(__name__)

Outcome = Literal["ok", "error", "cancelled", "interrupted"]
GroupBy = Literal["key", "owner", "provider", "model", "day"]
# Rows per multi-row INSERT: 21 columns each stays under both backends' bind limits.
_ROWS_PER_INSERT = 1000
# Rows in SQLite's one-statement group commit (server.storage.inline).
_SQLITE_ROWS_PER_STATEMENT = ROWS_PER_STATEMENT
# PostgreSQL: a batch that settles credits, written by one call of migration 0007's function.
_RECORD_USAGE = text(
    "SELECT recorded, charged, lost_block FROM aigne_hub_record_usage("
    "CAST(:request_ids AS TEXT[]), CAST(:reservation_ids AS TEXT[]), CAST(:drawn AS BOOLEAN[]),"
    " CAST(:charges AS BIGINT[]), CAST(:new_rows AS JSONB), CAST(:row_of AS INTEGER[]))"
)
_COUNTERS = (
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "image_count",
    "audio_ms",
    "characters",
    "cost_micros",
)


@dataclass(frozen=True, slots=True)
class UsageRecord:
    """One call. Token counts follow OpenAI's semantics (`input_tokens` includes
    `cached_tokens`); non-token work is counted in images, audio milliseconds or
    characters. Strings longer than their column are truncated, negatives clamped."""

    request_id: str
    provider: str
    model: str
    outcome: Outcome = "ok"
    key_id: str | None = None
    owner_id: str | None = None
    # "chat", "embedding", "image", "speech", "transcription", ...
    operation: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    image_count: int = 0
    audio_ms: int = 0
    characters: int = 0
    cost_micros: int = 0
    latency_ms: int = 0
    ttft_ms: int | None = None
    error_reason: str | None = None
    # Upstream attempts (retries and fallbacks included); 0: no provider was called.
    attempts: int = 1
    created_at: datetime = field(default_factory=utcnow)
    # The id of the stored provider credential that served the call (never its secret);
    # None for the configured key or when no provider was called.
    credential_id: str | None = None

    def __post_init__(self) -> None:
        if not self.request_id:
            raise ValueError("a usage record needs a request id")
        if self.outcome not in get_args(Outcome):
            raise ValueError(f"outcome must be one of {get_args(Outcome)}, not {self.outcome!r}")


@dataclass(frozen=True, slots=True)
class StoredUsage(UsageRecord):
    """A record as stored: with what was actually charged."""

    credits_micros: int = 0


@dataclass(frozen=True, slots=True)
class Recorded:
    """What `Ledger.record` did: `inserted` is False for a request id already recorded;
    `spooled` is True when the record went to the spool (nothing charged yet)."""

    inserted: bool
    credits_micros: int
    spooled: bool = False


@dataclass(frozen=True, slots=True)
class UsageTotals:
    """Sums over the records of one group; the grouping fields not asked for are None."""

    key_id: str | None = None
    owner_id: str | None = None
    provider: str | None = None
    model: str | None = None
    day: date | None = None
    calls: int = 0
    errors: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    image_count: int = 0
    audio_ms: int = 0
    characters: int = 0
    cost_micros: int = 0
    credits_micros: int = 0


@dataclass(slots=True)
class _Pending:
    usage: UsageRecord
    reservation: Reservation | None
    done: asyncio.Future[Recorded]


class Ledger:
    """Records usage (group-committed) and answers totals."""

    def __init__(
        self, db: Database, *, max_batch: int = 500, spool: Spool | None = None, credits: CreditService | None = None
    ) -> None:
        self._db = db
        self._max_batch = max_batch
        self._spool = spool
        # Told when a record's reservation no longer needs its lease renewed.
        self._credits = credits
        self._queue: list[_Pending] = []
        self._worker: asyncio.Task[None] | None = None
        self._closed = False
        self._writable = True
        self.commits = 0  # transactions committed (for tests and metrics)
        # Told how long each group commit took, in seconds (metrics).
        self.on_commit: Callable[[float], None] | None = None

    @property
    def queue_depth(self) -> int:
        """Records waiting for the next group commit."""
        return len(self._queue)

    @property
    def writable(self) -> bool:
        """False after a record could be written neither to the database nor to the
        spool, until one can be again (a write succeeds, or `mark_writable`)."""
        return self._writable

    def mark_writable(self) -> None:
        if not self._writable:
            log.warning("usage records can be written again: taking calls")
        self._writable = True

    async def record(self, usage: UsageRecord, *, reservation: Reservation | None = None) -> Recorded:
        """Writes `usage` (settling `reservation` with `usage.cost_micros`) and returns
        once it is committed. Cancelling the caller does not cancel the write."""
        if self._closed:
            raise RuntimeError("the ledger is closed")
        pending = _Pending(usage, reservation, asyncio.get_running_loop().create_future())
        self._queue.append(pending)
        if self._worker is None:
            self._worker = asyncio.create_task(self._drain(), name="ledger-group-commit")
        return await asyncio.shield(pending.done)

    async def close(self) -> None:
        """Waits for queued records to be committed; no new ones are accepted."""
        self._closed = True
        if self._worker is not None:
            await asyncio.shield(self._worker)

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch = self._queue[: self._max_batch]
                del self._queue[: self._max_batch]
                await self._commit(batch)
        finally:
            self._worker = None

    async def _commit(self, batch: list[_Pending]) -> None:
        started = time.perf_counter()
        try:
            results = await self._write(batch)
        except Exception as exc:  # noqa: BLE001 - every failure must reach the waiting callers
            if self._spool is not None:
                await self._spool_batch(batch, exc)
                return
            if len(batch) == 1:
                log.error("could not record usage of request %s: %s", batch[0].usage.request_id, exc)
                self._end_leases(batch)
                _resolve(batch[0].done, exc)
                return
            # One bad record must not sink the others: retry them one by one.
            log.warning("group commit of %d usage records failed (%s); retrying one by one", len(batch), exc)
            for pending in batch:
                await self._commit([pending])
            return
        if self.on_commit is not None:
            self.on_commit(time.perf_counter() - started)
        self.mark_writable()
        self._end_leases(batch, results)
        for pending, result in zip(batch, results, strict=True):
            _resolve(pending.done, result)

    async def _spool_batch(self, batch: list[_Pending], db_error: Exception) -> None:
        assert self._spool is not None
        log.error("could not write %d usage records to the database (%s); spooling them", len(batch), db_error)
        items = [(p.usage, p.reservation) for p in batch]
        try:
            await asyncio.to_thread(self._spool.append, items)
        except Exception as exc:  # noqa: BLE001 - the callers must learn their record is lost
            log.error(
                "could not spool %d usage records either (%s): refusing calls until they can be kept", len(batch), exc
            )
            self._writable = False
            self._end_leases(batch)
            for pending in batch:
                _resolve(pending.done, StorageUnavailable("the gateway cannot record usage right now; retry later"))
            return
        self.mark_writable()
        # The reservations stay held (their leases renewed) until the replay settles them.
        for pending in batch:
            _resolve(pending.done, Recorded(inserted=True, credits_micros=0, spooled=True))

    async def replay(self, items: Sequence[SpooledRecord]) -> list[Recorded]:
        """Writes spooled records (settling their reservations) in one transaction;
        raises when the database fails (they stay spooled). Idempotent."""
        batch = [_Pending(item.usage, item.reservation(), _ignored_future()) for item in items]
        results = await self._write(batch)
        self.mark_writable()
        self._end_leases(batch, results)
        return results

    async def probe_database(self) -> None:
        """Raises unless a write transaction can be opened on the database."""
        async with self._db.write() as conn:
            await conn.execute(select(1))

    def _end_leases(self, batch: Sequence[_Pending], results: Sequence[Recorded] | None = None) -> None:
        """Tells the credit service the batch's reservations are done with: settled
        with what `results` charged, or (None: the records were not written) not."""
        if self._credits is None:
            return
        for index, pending in enumerate(batch):
            if pending.reservation is not None:
                self._credits.finished(pending.reservation, results[index].credits_micros if results else 0)

    async def _write(self, batch: Sequence[_Pending]) -> list[Recorded]:
        settles_nothing = all(p.reservation is None for p in batch)
        sqlite = self._db.backend == "sqlite"
        if sqlite and settles_nothing and len(batch) <= _SQLITE_ROWS_PER_STATEMENT:
            results = await self._write_alone(batch)
        elif not sqlite and any(p.reservation is not None and p.reservation.id is not None for p in batch):
            async with self._db.write_one_statement() as conn:
                results = await self._write_settling_in_one_statement(conn, batch)
        elif not sqlite and settles_nothing and len(batch) == 1:
            # One record, nothing to settle: one INSERT committed on its own, without
            # BEGIN and COMMIT. Only one: batches of several written that way cost the
            # gateway 1.2x CPU per call and 0.85x calls per second at 16 connections
            # against a transaction (paired A/B; again 1.24x and 0.86x with the database's
            # backends counted); a single record gains a little.
            async with self._db.write_one_statement() as conn:
                results = await self._write_in(conn, batch)
        else:
            results = await self._db.write_with(lambda conn: self._write_in(conn, batch))
        self.commits += 1
        return results

    async def _write_alone(self, batch: Sequence[_Pending]) -> list[Recorded]:
        """SQLite, nothing to settle: the batch is one INSERT committed on its own
        (why in `Database.write_alone_in_thread`)."""
        rows, owner_of_row = _unique_rows(batch, [0] * len(batch))
        dialect = self._db.sqlite_dialect
        values = list(rows.values())
        inserted = await self._db.write_alone_in_thread(
            lambda cursor: insert_alone(cursor, dialect, usage_records, "request_id", values)
        )
        return [
            Recorded(_inserted_here(pending, index, inserted, owner_of_row), 0) for index, pending in enumerate(batch)
        ]

    async def _write_settling_in_one_statement(self, conn: Executor, batch: Sequence[_Pending]) -> list[Recorded]:
        """PostgreSQL: `_write_in`'s work done by the database's function
        `aigne_hub_record_usage` (migration 0007), one statement in autocommit: one
        round trip where `_write_in` makes six for a record (BEGIN, the credit
        block's row, the record, the balance, the key, COMMIT). The records go in
        request id order, as `_write_in` takes them."""
        order = _by_request_id(batch)
        position = {index: place for place, index in enumerate(order)}
        columns: dict[str, list[Any]] = {"request_ids": [], "reservation_ids": [], "drawn": [], "charges": []}
        for index in order:
            pending = batch[index]
            reservation = pending.reservation if pending.reservation and pending.reservation.id else None
            cost = max(pending.usage.cost_micros, 0)
            columns["request_ids"].append(_clip(pending.usage.request_id, "request_id"))
            columns["reservation_ids"].append(reservation.id if reservation else None)
            columns["drawn"].append(bool(reservation and reservation.drawn))
            # A draw: at most what it drew (a warning when the call cost more); a call's
            # own reservation: the function caps the charge at what its row holds.
            columns["charges"].append(
                charge_for(_as_held(reservation), cost) if reservation and reservation.drawn else cost
            )
        rows, owner_of_row = _unique_rows(batch, [0] * len(batch))
        new_rows = orjson.dumps([_json_row(row) for row in rows.values()]).decode()
        row_of = [position[owner_of_row[request_id]] + 1 for request_id in rows]
        found = (await conn.execute(_RECORD_USAGE, {**columns, "new_rows": new_rows, "row_of": row_of})).all()
        results: list[Recorded] = [Recorded(False, 0)] * len(batch)
        for place, (recorded, charged, lost_block) in enumerate(found):
            index = order[place]
            reservation = batch[index].reservation
            if lost_block and reservation is not None and reservation.id is not None:
                self._block_lost(reservation.id)
            cost = columns["charges"][place]
            if recorded and reservation is not None and reservation.id and not reservation.drawn and charged < cost:
                log.warning(
                    "call cost %s credits but only %s were reserved; charging the reservation",
                    format_credits(cost),
                    format_credits(charged),
                )
            results[index] = Recorded(bool(recorded), int(charged))
        return results

    async def _write_in(self, conn: Executor, batch: Sequence[_Pending]) -> list[Recorded]:
        # Lock order (see server.accounts.credits): reservations, usage, balances, keys.
        held, charges = await self._take_holds(conn, batch)
        rows, owner_of_row = _unique_rows(batch, charges)
        inserted = await self._insert(conn, list(rows.values()))
        results: list[Recorded] = []
        settlements: list[tuple[HeldReservation, int]] = []
        refunds: dict[str, int] = {}
        for index, pending in enumerate(batch):
            was_inserted = _inserted_here(pending, index, inserted, owner_of_row)
            # A request already recorded (and charged): only release the hold.
            charge = charges[index] if was_inserted else 0
            hold = held[index]
            if hold is not None and _is_draw(pending) and not was_inserted:
                # The block's row gave this draw's charge: it goes back to the row.
                refunds[hold.id] = refunds.get(hold.id, 0) + charges[index]
            elif hold is not None:
                settlements.append((hold, charge))
            results.append(Recorded(was_inserted, charge))
        await undraw(conn, refunds)
        await apply_settlements(conn, settlements)
        return results

    async def _take_holds(
        self, conn: Executor, batch: Sequence[_Pending]
    ) -> tuple[list[HeldReservation | None], list[int]]:
        """Takes the batch's reservations (a draw: its charge out of its credit block's
        row); returns what each record settles (a draw: as a hold of its charge) and
        its charge."""
        draws = [0] * len(batch)  # each draw's charge, known before its block is touched
        by_block: dict[str, int] = {}
        for index, pending in enumerate(batch):
            reservation = pending.reservation
            if reservation is not None and reservation.id is not None and reservation.drawn:
                draws[index] = charge_for(_as_held(reservation), pending.usage.cost_micros)
                by_block[reservation.id] = by_block.get(reservation.id, 0) + draws[index]
        own = [p.reservation.id for p in batch if p.reservation is not None and p.reservation.id and not _is_draw(p)]
        taken = await take_reservations(conn, own, by_block)
        held: list[HeldReservation | None] = [None] * len(batch)
        charges = [0] * len(batch)
        for index in _by_request_id(batch):
            pending = batch[index]
            reservation = pending.reservation
            if reservation is None or reservation.id is None:
                continue
            if reservation.drawn:
                block = taken.get(reservation.id)
                if block is None:
                    self._block_lost(reservation.id)
                else:
                    held[index] = replace(block, amount_micros=draws[index])
                    charges[index] = draws[index]
                continue
            hold = held[index] = taken.pop(reservation.id, None)
            charges[index] = charge_for(hold, pending.usage.cost_micros) if hold is not None else 0
        return held, charges

    def _block_lost(self, block_id: str) -> None:
        log.warning("credit block %s is gone (its lease lapsed): its draws are recorded uncharged", block_id)
        if self._credits is not None and self._credits.blocks is not None:
            self._credits.blocks.lost(block_id)

    async def _insert(self, conn: Executor, values: list[dict[str, Any]]) -> set[str]:
        """Inserts the rows whose request id is new; returns those request ids."""
        if isinstance(conn, InlineConnection):  # SQLite's writer thread: the cursor itself
            return conn.insert_new(usage_records, "request_id", values)
        inserted: set[str] = set()
        # One statement with the rows as parameters ("insertmanyvalues"): compiled
        # once and cached, where .values(rows) compiled a new statement per batch
        # (about 0.7 ms of CPU per call).
        insert = self._db.insert_ignoring_conflicts(usage_records, "request_id").returning(usage_records.c.request_id)
        for start in range(0, len(values), _ROWS_PER_INSERT):
            done = await conn.execute(insert, values[start : start + _ROWS_PER_INSERT])
            inserted.update(done.scalars())
        return inserted

    # -- queries -------------------------------------------------------------------------

    async def get(self, request_id: str) -> StoredUsage | None:
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(usage_records).where(usage_records.c.request_id == request_id))
            ).one_or_none()
        return None if row is None else _stored(row._mapping)

    async def records(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        key_id: str | None = None,
        owner_id: str | None = None,
        limit: int = 1000,
    ) -> list[StoredUsage]:
        """Records in [since, until), oldest first."""
        query = (
            select(usage_records)
            .where(*_filters(since, until, key_id, owner_id))
            .order_by(usage_records.c.created_at, usage_records.c.id)
            .limit(limit)
        )
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_stored(row._mapping) for row in rows]

    async def recent(
        self,
        *,
        key_id: str | None = None,
        owner_id: str | None = None,
        before: tuple[datetime, int] | None = None,
        limit: int = 100,
    ) -> list[tuple[int, StoredUsage]]:
        """Records newest first, with their row ids (the cursor of the next page: pass
        the last one's (created_at, id) as `before`)."""
        order = (usage_records.c.created_at, usage_records.c.id)
        query = (
            select(usage_records)
            .where(*_filters(None, None, key_id, owner_id))
            .order_by(*(column.desc() for column in order))
            .limit(limit)
        )
        if before is not None:
            query = query.where(tuple_(*order) < tuple_(*before))
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [(int(row._mapping["id"]), _stored(row._mapping)) for row in rows]

    async def totals(
        self,
        group_by: GroupBy | Sequence[GroupBy] = (),
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        key_id: str | None = None,
        owner_id: str | None = None,
        upstream_only: bool = False,
    ) -> list[UsageTotals]:
        """Sums of the records in [since, until) per group (days are UTC days); with
        `upstream_only`, of the calls that reached a provider (not those the gateway
        refused itself: allow-list, credits, rate limits)."""
        groups: Sequence[GroupBy] = (group_by,) if isinstance(group_by, str) else tuple(group_by)
        columns: dict[GroupBy, tuple[str, ColumnElement[Any]]] = {
            "key": ("key_id", usage_records.c.key_id),
            "owner": ("owner_id", usage_records.c.owner_id),
            "provider": ("provider", usage_records.c.provider),
            "model": ("model", usage_records.c.model),
            "day": ("day", func.date(usage_records.c.created_at)),
        }
        unknown = set(groups) - columns.keys()
        if unknown:
            raise ValueError(f"cannot group by {sorted(unknown)}; choose from {sorted(columns)}")
        keys = [columns[g] for g in groups]
        sums = [
            func.count().label("calls"),
            func.coalesce(func.sum(case((usage_records.c.outcome != "ok", 1), else_=0)), 0).label("errors"),
            *(func.coalesce(func.sum(usage_records.c[name]), 0).label(name) for name in _COUNTERS),
            func.coalesce(func.sum(usage_records.c.credits_micros), 0).label("credits_micros"),
        ]
        conditions = _filters(since, until, key_id, owner_id)
        if upstream_only:
            conditions.append(usage_records.c.attempts > 0)
        query = select(*(expr.label(name) for name, expr in keys), *sums).where(*conditions)
        if keys:
            exprs = [expr for _, expr in keys]
            query = query.group_by(*exprs).order_by(*exprs)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        totals = []
        for row in rows:
            values: dict[str, Any] = {name: int(row._mapping[name]) for name in ("calls", "errors", *_COUNTERS)}
            values["credits_micros"] = int(row._mapping["credits_micros"])
            for name, _ in keys:
                value = row._mapping[name]
                values[name] = _as_date(value) if name == "day" else value
            if values["calls"] or not keys:
                totals.append(UsageTotals(**values))
        return totals


def _ignored_future() -> asyncio.Future[Recorded]:
    return asyncio.get_running_loop().create_future()


def _resolve(future: asyncio.Future[Recorded], outcome: Recorded | BaseException) -> None:
    if future.done():
        return
    if isinstance(outcome, BaseException):
        future.set_exception(outcome)
    else:
        future.set_result(outcome)


def _filters(
    since: datetime | None, until: datetime | None, key_id: str | None, owner_id: str | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if since is not None:
        conditions.append(usage_records.c.created_at >= since)
    if until is not None:
        conditions.append(usage_records.c.created_at < until)
    if key_id is not None:
        conditions.append(usage_records.c.key_id == key_id)
    if owner_id is not None:
        conditions.append(usage_records.c.owner_id == owner_id)
    return conditions


def _is_draw(pending: _Pending) -> bool:
    return pending.reservation is not None and pending.reservation.drawn


def _as_held(reservation: Reservation) -> HeldReservation:
    return HeldReservation(reservation.id or "", reservation.owner_id, reservation.key_id, reservation.amount_micros)


def _unique_rows(batch: Sequence[_Pending], charges: Sequence[int]) -> tuple[dict[str, dict[str, Any]], dict[str, int]]:
    """The rows to insert, by request id (the first of a batch's duplicates in request
    id order), and the index in `batch` of the record each row came from."""
    rows: dict[str, dict[str, Any]] = {}
    owner_of_row: dict[str, int] = {}
    for index in _by_request_id(batch):
        row = _row(batch[index].usage, charges[index])
        if row["request_id"] not in rows:
            rows[row["request_id"]] = row
            owner_of_row[row["request_id"]] = index
    return rows, owner_of_row


def _by_request_id(batch: Sequence[_Pending]) -> list[int]:
    """The batch's indexes in request id order (the order rows are locked in)."""
    return sorted(range(len(batch)), key=lambda i: batch[i].usage.request_id)


def _inserted_here(pending: _Pending, index: int, inserted: set[str], owner_of_row: dict[str, int]) -> bool:
    """Whether the row inserted for this record's request id was this record's own."""
    request_id = _clip(pending.usage.request_id, "request_id")
    return request_id in inserted and owner_of_row.get(request_id or "") == index


def _clip(value: str | None, column: str) -> str | None:
    if value is None:
        return None
    length = getattr(usage_records.c[column].type, "length", None)
    return value[:length] if length else value


def _row(usage: UsageRecord, credits_micros: int) -> dict[str, Any]:
    row: dict[str, Any] = {
        "request_id": _clip(usage.request_id, "request_id"),
        "created_at": usage.created_at,
        "key_id": _clip(usage.key_id, "key_id"),
        "owner_id": _clip(usage.owner_id, "owner_id"),
        "provider": _clip(usage.provider, "provider"),
        "model": _clip(usage.model, "model"),
        "operation": _clip(usage.operation, "operation"),
        "credits_micros": credits_micros,
        "latency_ms": max(usage.latency_ms, 0),
        "ttft_ms": None if usage.ttft_ms is None else max(usage.ttft_ms, 0),
        "attempts": max(usage.attempts, 0),
        "outcome": usage.outcome,
        "error_reason": _clip(usage.error_reason, "error_reason"),
        "credential_id": _clip(usage.credential_id, "credential_id"),
    }
    for name in _COUNTERS:
        row[name] = max(int(getattr(usage, name)), 0)
    return row


def _json_row(row: dict[str, Any]) -> dict[str, Any]:
    """A usage row for `aigne_hub_record_usage`: without `credits_micros` (the function
    works it out), `created_at` as the naive UTC timestamp the column stores."""
    values = {name: value for name, value in row.items() if name != "credits_micros"}
    created_at: datetime = values["created_at"]
    if created_at.tzinfo is None:  # as the column's type refuses it on the other paths
        raise ValueError("naive datetime given; storage needs aware (UTC) datetimes")
    values["created_at"] = created_at.astimezone(UTC).replace(tzinfo=None).isoformat()
    return values


def _stored(row: Any) -> StoredUsage:
    names = [f for f in StoredUsage.__dataclass_fields__ if f in row]
    return StoredUsage(**{name: row[name] for name in names})


def _as_date(value: object) -> date | None:
    if value is None or isinstance(value, date):
        return value if not isinstance(value, datetime) else value.date()
    return date.fromisoformat(str(value))
