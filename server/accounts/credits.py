"""Credits: per-model rates, per-owner balances, reservations and settlement.

Amounts are integer micro-credits (1 credit = 1_000_000 micros).

A call first `reserve`s its worst-case cost, then settles the actual cost when it
ends: `charged = min(actual, reserved)` leaves the balance, the rest of the hold is
released. Both steps are single transactions built from conditional UPDATEs:

    UPDATE balances SET reserved = reserved + :x
     WHERE owner_id = :o AND balance - reserved >= :x          -- the owner's credits
    UPDATE api_keys SET reserved = reserved + :x
     WHERE id = :k AND (cap IS NULL OR cap - spent - reserved >= :x)   -- the key's cap

PostgreSQL re-evaluates the WHERE clause on the newest row version after waiting for
a concurrent writer, and SQLite runs one writer at a time (BEGIN IMMEDIATE), so any
number of concurrent calls on any number of replicas can never overdraw a balance or
a cap; CHECK constraints back this up. Every transaction takes its row locks in one
global order — reservations, usage records, balances (by owner), keys (by id) — so
batches on different replicas cannot deadlock.

Each reservation is a row: settling deletes it (so a settlement is idempotent).

Cost per call: on SQLite a reservation's and a settlement's transaction run whole in
the writer thread (`Database.write_with`), with their statements built once and run
straight on the sqlite3 cursor (`server.storage.inline.prebuilt`); the reservations
of concurrent calls share one transaction, a SAVEPOINT each, so a refusal rolls back
its own holds only (`Database.write_grouped`), and one that finds the writer idle is
written on the event loop's thread, without a hand-off (never waiting there: another
process's write sends it to the writer thread); a reservation's commit waits for the
OS, not the disk (`synced=False`: the call's ledger record, which settles it, is
synced and makes it durable too).

Reservations are leases. A reservation expires `reservation_lease_s` (default 120 s)
after it is made, and the process that made it renews the lease of every reservation
it still holds (`hold` / `forget`, an in-memory set) every lease/3, in one UPDATE per
500 ids. A
sweeper on every replica (in one worker of a `serve --workers N`: the others' expired
holds are in the same database) releases expired reservations at start and every
lease/3 (jittered); two sweepers never release one twice because taking a reservation
deletes its row, and a sweeper only deletes a row that is still expired (a renewal
that wins the race keeps it). So the holds of a process killed mid-call come back
within about one lease, however long calls take, and a live call's hold never lapses
unless its process cannot reach the database for a whole lease while another replica
can (then the call is recorded but charged nothing, and a warning says so); a sweeper
never releases what its own process holds. On PostgreSQL lease times are
the database server's clock, so replicas with skewed clocks agree on what expired;
SQLite is one machine's file, so its clock is the process's. Both background loops
(`start_lease_keeping`) log a database failure and try again next round.

With credit blocks on (`use_blocks`; serve's default, AIGNE_HUB_CREDIT_BLOCK_CALLS), a
call without credit windows draws its hold from a reservation its process holds for
many calls (server.accounts.credit_blocks), with no transaction of its own; its record
settles the draw by shrinking the block's row. Near the end of a balance, calls
reserve their own again.

With billing off (the default) nothing is reserved or charged: `reserve` returns an
empty reservation without touching the database, and usage is still recorded.

Spend windows (credits per UTC day / calendar month, server.limits.windows): `reserve`
also holds the amount against each window the call falls under, in the same
transaction (after the key, so the lock order holds: ..., keys, spend windows by id),
and the reservation row lists the windows it holds; settling (here, in the ledger's
group commit, or by the sweeper) moves the charge into them with the balance. The
period a call falls in is read from `clock` (the process's UTC clock; tests set it).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Interval,
    Row,
    bindparam,
    delete,
    func,
    literal,
    select,
    tuple_,
    update,
)
from sqlalchemy.ext.asyncio import AsyncConnection

from server.accounts.errors import (
    MICROS_PER_CREDIT,
    InsufficientCredits,
    ModelNotAllowed,
    SpendingCapReached,
    format_credits,
)
from server.limits.windows import CreditWindow, ledger_spend, period_of, refusal, spend_of
from server.storage.database import Database
from server.storage.inline import Executor, prebuilt
from server.storage.schema import (
    api_keys,
    balances,
    credit_grants,
    model_rates,
    reservations,
    spend_windows,
    utcnow,
)

if TYPE_CHECKING:
    from server.accounts.credit_blocks import CreditBlocks

log = logging.getLogger(__name__)

# Reservation ids per lease-renewing UPDATE: far under both backends' bind limits.
_IDS_PER_RENEWAL = 500
# How much the sweeper's period varies, so replicas started together spread out.
_SWEEP_JITTER = 0.2
# How long a spend window untouched and holding nothing is kept: past any month.
_WINDOW_KEPT = timedelta(days=62)


def credits_to_micros(credits: Decimal | float | int | str) -> int:
    """12.5 → 12_500_000 (rounded to the micro-credit; use strings for exact input)."""
    return int((Decimal(str(credits)) * MICROS_PER_CREDIT).to_integral_value())


@dataclass(frozen=True, slots=True)
class Rate:
    """What a model costs, in micro-credits. `model` may be a glob ("openai/*", "*")."""

    model: str
    input_per_million_micros: int = 0
    output_per_million_micros: int = 0
    # Cached input tokens are billed at this rate instead of the input rate.
    cached_input_per_million_micros: int = 0
    per_image_micros: int = 0
    per_audio_second_micros: int = 0
    per_character_micros: int = 0


# The Rate fields as people write them: credits, not micro-credits.
RATE_AMOUNTS = (
    "input_per_million",
    "output_per_million",
    "cached_input_per_million",
    "per_image",
    "per_audio_second",
    "per_character",
)


class RateAmountError(ValueError):
    """A rate amount that is not a decimal number of credits; `field` names it."""

    def __init__(self, field: str, value: object) -> None:
        super().__init__(f"{field} must be a decimal number of credits, not {value!r}")
        self.field = field


def rate_from_credits(model: str, amounts: Mapping[str, Decimal | int | str]) -> Rate:
    """A Rate from amounts in credits keyed by `RATE_AMOUNTS` names (missing: 0), as
    the config file, the admin API and the CLI give them."""
    micros: dict[str, int] = {}
    for name in RATE_AMOUNTS:
        value = amounts.get(name) or 0
        try:
            micros[f"{name}_micros"] = credits_to_micros(value)
        except (InvalidOperation, ValueError) as exc:
            raise RateAmountError(name, value) from exc
    return Rate(model=model, **micros)


@dataclass(frozen=True, slots=True)
class Usage:
    """What a call consumed. `input_tokens` includes `cached_tokens` (OpenAI's usage
    semantics: cached tokens are the part of the prompt served from the cache)."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    images: int = 0
    audio_ms: int = 0
    characters: int = 0


def cost_of(rate: Rate, usage: Usage) -> int:
    """The cost in micro-credits, rounded up to the micro-credit once per unit kind."""
    cached = min(max(usage.cached_tokens, 0), max(usage.input_tokens, 0))
    uncached = max(usage.input_tokens, 0) - cached
    token_micros = (
        uncached * rate.input_per_million_micros
        + cached * rate.cached_input_per_million_micros
        + max(usage.output_tokens, 0) * rate.output_per_million_micros
    )
    return (
        _ceil_div(token_micros, 1_000_000)
        + max(usage.images, 0) * rate.per_image_micros
        + _ceil_div(max(usage.audio_ms, 0) * rate.per_audio_second_micros, 1000)
        + max(usage.characters, 0) * rate.per_character_micros
    )


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True, slots=True)
class Balance:
    owner_id: str
    balance_micros: int
    reserved_micros: int

    @property
    def available_micros(self) -> int:
        return self.balance_micros - self.reserved_micros


# The ids of credit blocks' rows (server.accounts.credit_blocks) start with this; a
# call's reservation id is 32 hex digits, so it never does.
BLOCK_ID_PREFIX = "blk_"


@dataclass(frozen=True, slots=True)
class Reservation:
    """Credits held for one call. `id` is None when nothing was reserved (billing off).

    A draw (`drawn`) is `amount_micros` of this process's credit block `id`
    (server.accounts.credit_blocks): its settlement shrinks the block's row by the
    charge instead of deleting it."""

    id: str | None
    owner_id: str
    key_id: str | None
    amount_micros: int
    request_id: str | None = None
    created_at: datetime = field(default_factory=utcnow)
    # When the hold lapses (None: not stored, billing off).
    expires_at: datetime | None = None
    drawn: bool = False

    @property
    def is_block(self) -> bool:
        """Whether this is a credit block's row rather than one call's hold."""
        return self.id is not None and self.id.startswith(BLOCK_ID_PREFIX)


class CreditService:
    """Rates, balances, reservations. `billing_enabled=False` charges nothing."""

    def __init__(
        self,
        db: Database,
        *,
        billing_enabled: bool = False,
        reservation_lease_s: float = 120.0,
        rates_cache_ttl_s: float = 5.0,
    ) -> None:
        self._db = db
        self.billing_enabled = billing_enabled
        self.lease_s = reservation_lease_s
        self._held: set[str] = set()
        self._lease_tasks: list[asyncio.Task[None]] = []
        self._rates_ttl = rates_cache_ttl_s
        self._rates: tuple[dict[str, Rate], list[Rate]] | None = None
        self._rates_fresh_until = 0.0
        # "Now" for spend windows: which UTC day and month a call counts in.
        self.clock: Callable[[], datetime] = utcnow
        # This process's credit blocks (`use_blocks`); None: every call reserves its own.
        self.blocks: CreditBlocks | None = None

    def use_blocks(self, block_calls: int) -> None:
        """Calls draw from credit blocks of `block_calls` calls' worst cases
        (server.accounts.credit_blocks); 0 leaves every call to reserve its own."""
        if block_calls > 0:
            from server.accounts.credit_blocks import CreditBlocks  # it builds on this module

            self.blocks = CreditBlocks(
                self._db,
                block_calls,
                insert_row=self._insert_reservation,
                hold=self.hold,
                forget=self.forget,
                release=self.release,
            )

    # -- rates ---------------------------------------------------------------------------

    async def set_rate(self, rate: Rate) -> None:
        prices = {
            "input_per_million_micros": rate.input_per_million_micros,
            "output_per_million_micros": rate.output_per_million_micros,
            "cached_input_per_million_micros": rate.cached_input_per_million_micros,
            "per_image_micros": rate.per_image_micros,
            "per_audio_second_micros": rate.per_audio_second_micros,
            "per_character_micros": rate.per_character_micros,
        }
        if not rate.model or any(price < 0 for price in prices.values()):
            raise ValueError("a rate needs a model and non-negative prices")
        now = utcnow()
        async with self._db.write() as conn:
            done = await conn.execute(
                update(model_rates).where(model_rates.c.model == rate.model).values(**prices, updated_at=now)
            )
            if done.rowcount == 0:
                await conn.execute(model_rates.insert().values(model=rate.model, **prices, updated_at=now))
        self._rates = None

    async def delete_rate(self, model: str) -> bool:
        async with self._db.write() as conn:
            done = await conn.execute(delete(model_rates).where(model_rates.c.model == model))
        self._rates = None
        return done.rowcount > 0

    async def list_rates(self, *, after: str | None = None, limit: int | None = None) -> list[Rate]:
        """Rates by model; a page of `limit` of them after the model `after`."""
        query = select(model_rates).order_by(model_rates.c.model).limit(limit)
        if after is not None:
            query = query.where(model_rates.c.model > after)
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_rate(row) for row in rows]

    async def rate_for(self, model: str) -> Rate | None:
        """The exact rate of `model`, else the longest matching glob's, else None."""
        now = time.monotonic()
        if self._rates is None or now >= self._rates_fresh_until:
            rates = await self.list_rates()
            exact = {r.model: r for r in rates if not _is_glob(r.model)}
            globs = sorted((r for r in rates if _is_glob(r.model)), key=lambda r: (-len(r.model), r.model))
            self._rates = (exact, globs)
            self._rates_fresh_until = now + self._rates_ttl
        exact, globs = self._rates
        if model in exact:
            return exact[model]
        return next((r for r in globs if fnmatchcase(model, r.model)), None)

    async def price(self, model: str, usage: Usage) -> int:
        """What `usage` of `model` costs. With billing on, a model without a rate is
        refused (MODEL_NOT_ALLOWED) rather than served for free."""
        rate = await self.rate_for(model)
        if rate is None:
            if self.billing_enabled:
                raise ModelNotAllowed(
                    f"model {model!r} has no price, so it cannot be used while billing is on",
                    metadata={"model": model},
                )
            return 0
        return cost_of(rate, usage)

    # -- balances ------------------------------------------------------------------------

    async def balance(self, owner_id: str) -> Balance:
        async with self._db.read() as conn:
            row = (await conn.execute(select(balances).where(balances.c.owner_id == owner_id))).one_or_none()
        if row is None:
            return Balance(owner_id, 0, 0)
        return Balance(owner_id, row.balance_micros, row.reserved_micros)

    async def grant(self, owner_id: str, amount_micros: int, note: str = "") -> Balance:
        """Adds (or, when negative, takes away) credits; a debit never takes more than
        is available. Every grant is kept in `credit_grants`."""
        now = utcnow()
        async with self._db.write() as conn:
            insert = self._db.insert_ignoring_conflicts(balances, "owner_id").values(
                owner_id=owner_id, balance_micros=0, reserved_micros=0, updated_at=now
            )
            await conn.execute(insert)
            done = await conn.execute(
                update(balances)
                .where(
                    balances.c.owner_id == owner_id,
                    balances.c.balance_micros - balances.c.reserved_micros + amount_micros >= 0,
                )
                .values(balance_micros=balances.c.balance_micros + amount_micros, updated_at=now)
                .returning(balances.c.balance_micros, balances.c.reserved_micros)
            )
            row = done.one_or_none()
            if row is None:
                current = await _available(conn, owner_id)
                raise InsufficientCredits(
                    f"cannot debit {format_credits(-amount_micros)} credits from {owner_id}: "
                    f"only {format_credits(current)} available",
                    available_micros=current,
                    needed_micros=-amount_micros,
                )
            await conn.execute(
                credit_grants.insert().values(owner_id=owner_id, amount_micros=amount_micros, note=note, created_at=now)
            )
        return Balance(owner_id, row.balance_micros, row.reserved_micros)

    # -- reservations --------------------------------------------------------------------

    async def reserve(
        self,
        owner_id: str,
        amount_micros: int,
        *,
        key_id: str | None = None,
        request_id: str | None = None,
        windows: Sequence[CreditWindow] = (),
    ) -> Reservation:
        """Holds `amount_micros` of the owner's credits, of the key's cap and of each
        spend window's current period, or raises INSUFFICIENT_CREDITS /
        SPENDING_CAP_REACHED / RATE_LIMITED (a window) saying what is left and what
        was needed; a refusal holds nothing."""
        if amount_micros < 0:
            raise ValueError("a reservation cannot be negative")
        if not self.billing_enabled:
            return Reservation(None, owner_id, key_id, 0, request_id)
        blocks = self.blocks
        if blocks is not None and not windows and amount_micros > 0:
            drawn = blocks.draw(owner_id, key_id, amount_micros, request_id) or await blocks.take(
                owner_id, key_id, amount_micros, request_id
            )
            if drawn is not None:
                return drawn
        reservation_id = uuid.uuid4().hex
        reservation = Reservation(reservation_id, owner_id, key_id, amount_micros, request_id)
        # Unsynced: the call's ledger record, which settles it, is synced (see write_with).
        # Grouped: on SQLite, concurrent calls' reservations share a transaction.
        await self._db.write_grouped(lambda conn: self._reserve_in(conn, reservation, windows), synced=False)
        # No await from here to the caller: a reservation held is always returned.
        self.hold(reservation_id)
        return reservation

    async def _reserve_in(self, conn: Executor, reservation: Reservation, windows: Sequence[CreditWindow]) -> None:
        """The reservation's holds and row, inside `conn`'s write transaction (a refusal
        raises, which rolls them all back)."""
        owner_id, key_id, amount_micros = reservation.owner_id, reservation.key_id, reservation.amount_micros
        held = await conn.execute(
            HOLD_BALANCE,
            {"b_owner": owner_id, "b_amount": amount_micros, "b_need": amount_micros, "b_now": reservation.created_at},
        )
        if held.rowcount != 1:
            available = await _available(conn, owner_id)
            raise InsufficientCredits(
                f"insufficient credits: {format_credits(available)} available to {owner_id}, "
                f"this call needs up to {format_credits(amount_micros)}",
                available_micros=available,
                needed_micros=amount_micros,
            )
        if key_id is not None:
            capped = await conn.execute(HOLD_KEY, {"b_key": key_id, "b_amount": amount_micros, "b_need": amount_micros})
            if capped.rowcount != 1:
                left = await _cap_left(conn, key_id)
                # Raising rolls the balance hold back too.
                raise SpendingCapReached(
                    f"the API key's spending cap leaves {format_credits(left)} credits, "
                    f"this call needs up to {format_credits(amount_micros)}",
                    available_micros=left,
                    needed_micros=amount_micros,
                )
        window_ids = await self._hold_windows(conn, windows, amount_micros)
        await self._insert_reservation(conn, reservation, window_ids)

    async def _insert_reservation(
        self, conn: Executor, reservation: Reservation, window_ids: Sequence[str] = ()
    ) -> None:
        """The reservation's row, with its lease (its holds are the caller's)."""
        row = {
            "id": reservation.id,
            "owner_id": reservation.owner_id,
            "key_id": reservation.key_id,
            "amount_micros": reservation.amount_micros,
            "request_id": reservation.request_id,
            "created_at": reservation.created_at,
            "spend_window_ids": " ".join(window_ids) or None,
        }
        expires = self._lease_end()
        if isinstance(expires, datetime):
            await conn.execute(_INSERT_RESERVATION, {**row, "expires_at": expires})
        else:  # the database's own clock (an expression): a statement of its own
            await conn.execute(reservations.insert().values(**row, expires_at=expires))

    async def _hold_windows(self, conn: Executor, windows: Sequence[CreditWindow], amount_micros: int) -> list[str]:
        """Adds `amount_micros` to each window's reserved credits unless that would take
        it past its limit (then RATE_LIMITED, and the caller's transaction rolls back);
        returns the window rows held, in id (lock) order. One UPDATE per window once
        its period's row exists."""
        now = self.clock()
        by_id = {window.row_id(period_of(window.kind, now)): window for window in windows}
        for row_id in sorted(by_id):
            window = by_id[row_id]
            if not await _add_to_window(conn, row_id, window.limit_micros, amount_micros):
                # The period's first call: create its row from what the ledger charged
                # so far (a concurrent creator wins harmlessly), then try again.
                period = period_of(window.kind, now)
                await conn.execute(
                    self._db.insert_ignoring_conflicts(spend_windows, "id").values(
                        id=row_id,
                        scope=window.scope,
                        subject=window.subject,
                        model=window.model,
                        period=period.key,
                        spent_micros=await ledger_spend(conn, window, period),
                        reserved_micros=0,
                        updated_at=utcnow(),
                    )
                )
                if not await _add_to_window(conn, row_id, window.limit_micros, amount_micros):
                    spend = (await spend_of(conn, [window], now))[window]
                    raise refusal(window, spend, amount_micros, now)
        return sorted(by_id)

    async def settle(self, reservation: Reservation, actual_micros: int) -> int:
        """Charges `min(actual, reserved)` and releases the rest; returns the charge.
        Idempotent: a reservation already settled or released charges nothing."""
        if reservation.id is None:
            return 0
        if reservation.drawn:
            raise ValueError("a draw from a credit block is settled by its ledger record")
        settled = {reservation.id: actual_micros}
        charged = await self._db.write_with(lambda conn: settle_in(conn, settled))
        self.forget(reservation.id)
        return charged.get(reservation.id, 0)

    async def release(self, reservation: Reservation) -> None:
        """Gives the whole hold back (the call failed before it cost anything)."""
        if reservation.drawn:
            self.finished(reservation, 0)
        else:
            await self.settle(reservation, 0)

    def finished(self, reservation: Reservation, charged: int = 0) -> None:
        """The reservation's call is done with it: its ledger record charged `charged`
        of it, or no record will (a reservation of its own is then left to lapse and
        be swept; a draw's credits go back to its block)."""
        if reservation.id is None:
            return
        if reservation.drawn:
            if self.blocks is not None:
                self.blocks.settled(reservation, charged)
        else:
            self.forget(reservation.id)

    async def list_reservations(
        self, owner_id: str | None = None, *, after: tuple[datetime, str] | None = None, limit: int | None = None
    ) -> list[Reservation]:
        """The reservations held now (of `owner_id`), oldest first; a page of `limit`
        of them after the one whose (created_at, id) is `after`."""
        order = (reservations.c.created_at, reservations.c.id)
        query = select(reservations).order_by(*order).limit(limit)
        if owner_id is not None:
            query = query.where(reservations.c.owner_id == owner_id)
        if after is not None:
            query = query.where(tuple_(*order) > tuple_(*after))
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [
            Reservation(
                row.id, row.owner_id, row.key_id, row.amount_micros, row.request_id, row.created_at, row.expires_at
            )
            for row in rows
        ]

    async def release_expired(self, now: datetime | None = None) -> int:
        """Releases the reservations whose lease ended before `now` (default: the
        database's now): their process died or lost the database mid-call. The ones
        this process holds are alive whatever their lease says (it lapsed while the
        database was out of reach; the next renewal extends it). Returns how many were
        released."""
        cutoff = self._now() if now is None else now
        async with self._db.read() as conn:
            ids = (
                await conn.execute(
                    select(reservations.c.id).where(reservations.c.expires_at < cutoff).order_by(reservations.c.id)
                )
            ).scalars()
            stale = [reservation_id for reservation_id in ids if reservation_id not in self._held]
        released = 0
        for reservation_id in stale:  # one by one: each is a short transaction
            async with self._db.write() as conn:
                taken = await _take_expired(conn, reservation_id, self._now() if now is None else now)
                if taken is not None:
                    await apply_settlements(conn, [(taken, 0)])
                    released += 1
            if taken is not None:
                log.warning(
                    "released credit reservation %s (%s credits of %s): its lease ended unrenewed",
                    reservation_id,
                    format_credits(taken.amount_micros),
                    taken.owner_id,
                )
        return released

    async def prune_spend_windows(self, now: datetime | None = None) -> int:
        """Deletes the spend windows of past periods: rows holding nothing, untouched
        for `_WINDOW_KEPT` (longer than a month, so their period has ended; only the
        current period is ever consulted, and the ledger keeps the history). Returns
        how many were deleted."""
        cutoff = (now or utcnow()) - _WINDOW_KEPT
        async with self._db.write() as conn:
            done = await conn.execute(
                delete(spend_windows).where(spend_windows.c.reserved_micros == 0, spend_windows.c.updated_at < cutoff)
            )
        return max(done.rowcount, 0)

    async def _sweep(self) -> int:
        """The sweeper's round: expired reservations, then past spend windows."""
        released = await self.release_expired()
        await self.prune_spend_windows()
        return released

    # -- leases --------------------------------------------------------------------------

    def hold(self, reservation_id: str) -> None:
        """Keeps renewing the reservation's lease: this process still answers for it
        (its call runs, or its record waits to be written)."""
        self._held.add(reservation_id)

    def forget(self, reservation_id: str) -> None:
        """Stops renewing the lease (the reservation was settled, or is left to lapse);
        a credit block's lease is its own to end."""
        if self.blocks is not None and self.blocks.owns(reservation_id):
            return
        self._held.discard(reservation_id)

    @property
    def held(self) -> frozenset[str]:
        """The reservations whose leases this process renews."""
        return frozenset(self._held)

    async def renew_leases(self) -> int:
        """Extends the lease of every reservation this process holds to now + lease;
        returns how many rows were renewed (settled ones are gone)."""
        held = sorted(self._held)
        renewed = 0
        for start in range(0, len(held), _IDS_PER_RENEWAL):
            chunk = held[start : start + _IDS_PER_RENEWAL]
            # Rows locked in id order, as the ledger takes them: no deadlock with a
            # concurrent settlement on PostgreSQL (SQLite has one writer anyway).
            locked = (
                select(reservations.c.id)
                .where(reservations.c.id.in_(chunk))
                .order_by(reservations.c.id)
                .with_for_update()
            )
            async with self._db.write() as conn:
                done = await conn.execute(
                    update(reservations).where(reservations.c.id.in_(locked)).values(expires_at=self._lease_end())
                )
            renewed += max(done.rowcount, 0)
        return renewed

    def start_lease_keeping(self, *, sweep: bool = True) -> None:
        """Starts the background loops of a serving process: lease renewal (of this
        process's own reservations) and, with `sweep`, the sweeper of expired ones (which
        runs at once, then every lease/3). One sweeper per `serve` is enough: the other
        workers of a `serve --workers N` pass sweep=False."""
        if self._lease_tasks:
            return
        period = self.lease_s / 3
        self._lease_tasks = [
            asyncio.create_task(
                _every(period, 0.0, "renewing credit reservation leases", self.renew_leases, first_at_once=False),
                name="credit-lease-renewal",
            ),
        ]
        if sweep:
            log.info("sweeping expired credit reservations every %.1f s in this process", period)
            self._lease_tasks.append(
                asyncio.create_task(
                    _every(period, _SWEEP_JITTER, "releasing expired credit reservations", self._sweep),
                    name="credit-reservation-sweeper",
                )
            )

    async def stop_lease_keeping(self) -> None:
        tasks, self._lease_tasks = self._lease_tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _now(self) -> datetime | ColumnElement[datetime]:
        """Now, on the clock every replica shares: PostgreSQL's (UTC, naive like the
        columns); SQLite's file lives on one machine, whose clock is ours."""
        if self._db.backend == "postgresql":
            return func.timezone("UTC", func.now())
        return utcnow()

    def _lease_end(self) -> datetime | ColumnElement[datetime]:
        lease = timedelta(seconds=self.lease_s)
        now = self._now()
        if isinstance(now, datetime):
            return now + lease
        return now + literal(lease, Interval())


async def _every(
    period: float,
    jitter: float,
    what: str,
    work: Callable[[], Awaitable[int]],
    *,
    first_at_once: bool = True,
) -> None:
    """Runs `work` every `period` seconds (± `jitter` of it) until cancelled; a failure
    (the database is down) is logged and the next round tries again."""
    if not first_at_once:
        await asyncio.sleep(period)
    while True:
        try:
            await work()
        except Exception as exc:  # noqa: BLE001 - a background loop must outlive a database outage
            log.warning("%s failed, retrying in %.1f s: %s", what, period, getattr(exc, "orig", None) or exc)
        await asyncio.sleep(period * random.uniform(1 - jitter, 1 + jitter))


# -- settlement building blocks, shared with the ledger's group commit --------------------


@dataclass(frozen=True, slots=True)
class HeldReservation:
    id: str
    owner_id: str
    key_id: str | None
    amount_micros: int
    # The spend windows it holds `amount_micros` of (server.limits.windows).
    window_ids: tuple[str, ...] = ()


_TAKEN = (reservations.c.owner_id, reservations.c.key_id, reservations.c.amount_micros, reservations.c.spend_window_ids)

# A call's reservation and settlement statements, built once: SQLAlchemy keeps a
# statement object's cache key, where a statement built per call was walked again on
# every execution (most of a reservation's CPU in the writer thread); in SQLite's
# writer thread they run straight on the sqlite3 cursor (`prebuilt`). Parameters are
# named b_* : a SET clause reserves its columns' own names.
_AMOUNT = bindparam("b_amount", type_=BigInteger())
_CHARGED = bindparam("b_charged", type_=BigInteger())
_HELD = bindparam("b_held", type_=BigInteger())
# Holds `b_amount` of a balance, and of a key's cap, if at least `b_need` is free (a
# call's reservation: its amount; a credit block: a multiple of it).
_NEED = bindparam("b_need", type_=BigInteger())
HOLD_BALANCE = prebuilt(
    update(balances)
    .where(
        balances.c.owner_id == bindparam("b_owner"),
        balances.c.balance_micros - balances.c.reserved_micros >= _NEED,
    )
    .values(
        reserved_micros=balances.c.reserved_micros + _AMOUNT,
        updated_at=bindparam("b_now", type_=balances.c.updated_at.type),
    )
)
HOLD_KEY = prebuilt(
    update(api_keys)
    .where(
        api_keys.c.id == bindparam("b_key"),
        api_keys.c.spend_cap_micros.is_(None)
        | (api_keys.c.spend_cap_micros - api_keys.c.spent_micros - api_keys.c.reserved_micros >= _NEED),
    )
    .values(reserved_micros=api_keys.c.reserved_micros + _AMOUNT)
)
_INSERT_RESERVATION = prebuilt(reservations.insert())
_TAKE = prebuilt(delete(reservations).where(reservations.c.id == bindparam("b_id")).returning(*_TAKEN))
# A credit block's draws settled: its row shrinks by what they were charged.
_DRAW = prebuilt(
    update(reservations)
    .where(reservations.c.id == bindparam("b_id"), reservations.c.amount_micros >= _CHARGED)
    .values(amount_micros=reservations.c.amount_micros - _CHARGED)
    .returning(*_TAKEN)
)
_UNDRAW = prebuilt(
    update(reservations)
    .where(reservations.c.id == bindparam("b_id"))
    .values(amount_micros=reservations.c.amount_micros + _CHARGED)
)
_SETTLE_BALANCE = prebuilt(
    update(balances)
    .where(balances.c.owner_id == bindparam("b_owner"))
    .values(
        balance_micros=balances.c.balance_micros - _CHARGED,
        reserved_micros=balances.c.reserved_micros - _HELD,
        updated_at=bindparam("b_now", type_=balances.c.updated_at.type),
    )
)
_SETTLE_KEY = prebuilt(
    update(api_keys)
    .where(api_keys.c.id == bindparam("b_key"))
    .values(spent_micros=api_keys.c.spent_micros + _CHARGED, reserved_micros=api_keys.c.reserved_micros - _HELD)
)
_SETTLE_WINDOW = prebuilt(
    update(spend_windows)
    .where(spend_windows.c.id == bindparam("b_window"))
    .values(
        spent_micros=spend_windows.c.spent_micros + _CHARGED,
        reserved_micros=spend_windows.c.reserved_micros - _HELD,
        updated_at=bindparam("b_now", type_=spend_windows.c.updated_at.type),
    )
)


def _held(reservation_id: str, row: Any) -> HeldReservation:
    windows = tuple(str(row.spend_window_ids).split()) if row.spend_window_ids else ()
    return HeldReservation(reservation_id, row.owner_id, row.key_id, row.amount_micros, windows)


async def _add_to_window(conn: Executor, row_id: str, limit_micros: int, amount_micros: int) -> bool:
    """Holds `amount_micros` of the window if it still fits under the limit (the WHERE
    clause is re-checked on the newest row version after a concurrent writer)."""
    column = spend_windows.c
    done = await conn.execute(
        update(spend_windows)
        .where(column.id == row_id, column.spent_micros + column.reserved_micros + amount_micros <= limit_micros)
        .values(reserved_micros=column.reserved_micros + amount_micros, updated_at=utcnow())
    )
    return bool(done.rowcount == 1)


async def take_reservations(
    conn: Executor, ids: Iterable[str], draws: Mapping[str, int] | None = None
) -> dict[str, HeldReservation]:
    """Deletes the reservations and takes `draws` (credit block id -> credits) out of
    the blocks' rows, all in id order (the lock order); returns those that still
    existed (a block with what its row holds after the draws)."""
    draws = draws or {}
    taken: dict[str, HeldReservation] = {}
    for reservation_id in sorted(set(ids) | draws.keys()):
        if reservation_id in draws:
            found = await conn.execute(_DRAW, {"b_id": reservation_id, "b_charged": draws[reservation_id]})
        else:
            found = await conn.execute(_TAKE, {"b_id": reservation_id})
        row = found.one_or_none()
        if row is not None:
            taken[reservation_id] = _held(reservation_id, row)
    return taken


async def undraw(conn: Executor, refunds: Mapping[str, int]) -> None:
    """Puts credits back into credit blocks' rows (draws whose record was a duplicate)."""
    for block_id in sorted(refunds):
        await conn.execute(_UNDRAW, {"b_id": block_id, "b_charged": refunds[block_id]})


async def _take_expired(
    conn: AsyncConnection, reservation_id: str, cutoff: datetime | ColumnElement[datetime]
) -> HeldReservation | None:
    """Deletes the reservation if its lease is still over (a renewal may have won)."""
    row = (
        await conn.execute(
            delete(reservations)
            .where(reservations.c.id == reservation_id, reservations.c.expires_at < cutoff)
            .returning(*_TAKEN)
        )
    ).one_or_none()
    return None if row is None else _held(reservation_id, row)


async def apply_settlements(conn: Executor, settlements: Sequence[tuple[HeldReservation, int]]) -> None:
    """Moves each taken reservation's charge from held to spent: balances (by owner),
    then keys (by id), then spend windows (by id), one UPDATE per row."""
    owner_delta: dict[str, tuple[int, int]] = {}
    key_delta: dict[str, tuple[int, int]] = {}
    window_delta: dict[str, tuple[int, int]] = {}
    for held, charged in settlements:
        for window_id in held.window_ids:
            spent, released = window_delta.get(window_id, (0, 0))
            window_delta[window_id] = (spent + charged, released + held.amount_micros)
        spent, released = owner_delta.get(held.owner_id, (0, 0))
        owner_delta[held.owner_id] = (spent + charged, released + held.amount_micros)
        if held.key_id is not None:
            spent, released = key_delta.get(held.key_id, (0, 0))
            key_delta[held.key_id] = (spent + charged, released + held.amount_micros)
    now = utcnow()
    for owner_id in sorted(owner_delta):
        charged, held_amount = owner_delta[owner_id]
        await conn.execute(
            _SETTLE_BALANCE, {"b_owner": owner_id, "b_charged": charged, "b_held": held_amount, "b_now": now}
        )
    for key_id in sorted(key_delta):
        charged, held_amount = key_delta[key_id]
        await conn.execute(_SETTLE_KEY, {"b_key": key_id, "b_charged": charged, "b_held": held_amount})
    for window_id in sorted(window_delta):
        charged, held_amount = window_delta[window_id]
        await conn.execute(
            _SETTLE_WINDOW, {"b_window": window_id, "b_charged": charged, "b_held": held_amount, "b_now": now}
        )


async def settle_in(conn: Executor, actual_by_reservation: dict[str, int]) -> dict[str, int]:
    """Settles reservations inside `conn`'s transaction; returns what each was charged."""
    taken = await take_reservations(conn, actual_by_reservation)
    charges = {rid: charge_for(held, actual_by_reservation[rid]) for rid, held in taken.items()}
    await apply_settlements(conn, [(held, charges[rid]) for rid, held in taken.items()])
    for rid in actual_by_reservation.keys() - taken.keys():
        log.warning("credit reservation %s was already settled or released; nothing charged", rid)
    return charges


def charge_for(held: HeldReservation, actual_micros: int) -> int:
    actual = max(actual_micros, 0)
    if actual > held.amount_micros:
        log.warning(
            "call cost %s credits but only %s were reserved; charging the reservation",
            format_credits(actual),
            format_credits(held.amount_micros),
        )
    return min(actual, held.amount_micros)


async def _available(conn: Executor, owner_id: str) -> int:
    row = (
        await conn.execute(
            select(balances.c.balance_micros, balances.c.reserved_micros).where(balances.c.owner_id == owner_id)
        )
    ).one_or_none()
    return 0 if row is None else int(row.balance_micros - row.reserved_micros)


async def _cap_left(conn: Executor, key_id: str) -> int:
    row = (
        await conn.execute(
            select(api_keys.c.spend_cap_micros, api_keys.c.spent_micros, api_keys.c.reserved_micros).where(
                api_keys.c.id == key_id
            )
        )
    ).one_or_none()
    if row is None or row.spend_cap_micros is None:
        return 0
    return max(int(row.spend_cap_micros - row.spent_micros - row.reserved_micros), 0)


def _is_glob(model: str) -> bool:
    return any(c in model for c in "*?[")


def _rate(row: Row[tuple[object, ...]]) -> Rate:
    return Rate(
        model=row.model,
        input_per_million_micros=row.input_per_million_micros,
        output_per_million_micros=row.output_per_million_micros,
        cached_input_per_million_micros=row.cached_input_per_million_micros,
        per_image_micros=row.per_image_micros,
        per_audio_second_micros=row.per_audio_second_micros,
        per_character_micros=row.per_character_micros,
    )
