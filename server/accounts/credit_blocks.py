"""Credit blocks: a serving process holds credits for its next calls in advance.

Why: a call's own reservation is a write transaction of its own, ahead of the ledger
record that settles it. At one connection that transaction was most of what billing
added to a call's CPU (billing on cost 1.22x billing off; without it, 1.04x).

A block is a reservation row like any other: leased, renewed by its process, swept
when its process dies (server.accounts.credits). It is held by the process rather
than by one call, for one (owner, key), of `block_calls` times the worst case of the
call that takes it. A call draws its worst case from the block in memory, with no
database work; the call's ledger record settles the draw in the record's own
transaction: the block's row shrinks by the charge and the balance and the key's cap
are charged it (credits.take_reservations, ledger), so what the row holds always
equals what the balance and the cap hold for it. A draw that does not fit tops the
block up: one transaction, the calls behind it waiting for it rather than each
taking its own.

No overdraft: every draw fits in what the block's row holds (the event loop checks
and draws with no await between), and that is held in the balance and the cap.

Exact near the end of a balance: a block is taken or topped up only while the owner
has at least `BLOCK_SHARE` times its amount free, and the key's cap as much left, so
the blocks of all processes never hold more than a small share of what is free.
Below that, calls reserve one by one as before, with exact refusals; a block nothing
draws from is given back first. Calls under credit windows (server.limits.windows)
reserve one by one: a window's hold is per call.

A block is given back (its row deleted, its credits released) once idle for
`IDLE_S`, when a top-up is refused, and when the process shuts down; a process that
dies leaves it to lapse and be swept, like any reservation. Meanwhile the owner's
`reserved` credits include it: they are held for this process's next calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sqlalchemy import BigInteger, bindparam, update

from server.accounts.credits import BLOCK_ID_PREFIX, HOLD_BALANCE, HOLD_KEY, Reservation
from server.storage.database import Database
from server.storage.inline import Executor, prebuilt
from server.storage.schema import reservations, utcnow

log = logging.getLogger(__name__)

# A block is at most this share of what its owner (and its key's cap) has free.
BLOCK_SHARE = 8
# A block nothing has drawn from for this long is given back.
IDLE_S = 5.0
# Refused holders remembered before the expired ones are dropped (the memory stays flat).
REFUSED_KEPT = 1024

Holder = tuple[str, str | None]  # (owner id, key id)
InsertRow = Callable[[Executor, Reservation], Awaitable[None]]

_AMOUNT = bindparam("b_amount", type_=BigInteger())
_GROW = prebuilt(
    update(reservations)
    .where(reservations.c.id == bindparam("b_id"))
    .values(amount_micros=reservations.c.amount_micros + _AMOUNT)
)


class _Refused(Exception):
    """Not enough free for a block (its transaction's holds roll back)."""


class _Lost(Exception):
    """The block's row is gone: its lease lapsed and a sweeper released it."""


@dataclass(slots=True)
class _Block:
    id: str
    owner_id: str
    key_id: str | None
    held: int  # what its row holds
    drawn: int = 0  # the worst cases of the draws not settled yet
    has_row: bool = False  # a top-up committed: its reservation row exists
    last_used: float = field(default_factory=time.monotonic)
    refilling: asyncio.Lock = field(default_factory=asyncio.Lock)

    @property
    def free(self) -> int:
        return self.held - self.drawn


class CreditBlocks:
    """This process's blocks, by (owner, key). `insert_row` writes a new reservation
    row (with its lease); `hold` / `forget` keep its lease renewed or stop it;
    `release` gives a reservation's row back."""

    def __init__(
        self,
        db: Database,
        block_calls: int,
        *,
        insert_row: InsertRow,
        hold: Callable[[str], None],
        forget: Callable[[str], None],
        release: Callable[[Reservation], Awaitable[None]],
    ) -> None:
        self._db = db
        self.block_calls = block_calls
        self._insert_row = insert_row
        self._hold, self._forget, self._release = hold, forget, release
        self._by_holder: dict[Holder, _Block] = {}
        self._by_id: dict[str, _Block] = {}
        # Holders refused a block lately (too little free): they reserve per call
        # until then, rather than try a block before each call.
        self._refused_until: dict[Holder, float] = {}
        self._idle_keeper: asyncio.Task[None] | None = None
        self.transactions = 0  # blocks taken or topped up (for tests)

    def owns(self, reservation_id: str) -> bool:
        return reservation_id in self._by_id

    def draw(self, owner_id: str, key_id: str | None, amount: int, request_id: str | None) -> Reservation | None:
        """`amount` of the holder's block, or None when it has no block or too little."""
        block = self._by_holder.get((owner_id, key_id))
        if block is None or block.free < amount:
            return None
        block.drawn += amount
        block.last_used = time.monotonic()
        return Reservation(block.id, owner_id, key_id, amount, request_id, drawn=True)

    async def take(self, owner_id: str, key_id: str | None, amount: int, request_id: str | None) -> Reservation | None:
        """`amount` of the holder's block, topped up or taken for it first; None when
        the owner or the key has too little free for a block (reserve per call)."""
        holder = (owner_id, key_id)
        if holder in self._refused_until:
            if time.monotonic() < self._refused_until[holder]:
                return None
            del self._refused_until[holder]
        block = self._by_holder.get(holder)
        if block is None:
            # (The id column holds 32 characters: the prefix and 112 random bits.)
            block = _Block(BLOCK_ID_PREFIX + uuid.uuid4().hex[: 32 - len(BLOCK_ID_PREFIX)], owner_id, key_id, held=0)
            self._by_holder[holder] = block
            self._by_id[block.id] = block
        async with block.refilling:
            if self._by_id.get(block.id) is not block:  # given back meanwhile
                return await self.take(owner_id, key_id, amount, request_id)
            drawn = self.draw(owner_id, key_id, amount, request_id)
            if drawn is not None:  # another call topped it up meanwhile
                return drawn
            if not await self._top_up(block, amount * self.block_calls):
                return None
            return self.draw(owner_id, key_id, amount, request_id)

    async def _top_up(self, block: _Block, amount: int) -> bool:
        new = not block.has_row
        try:
            await self._db.write_grouped(lambda conn: self._grow(conn, block, amount, new=new), synced=False)
        except _Refused:
            self._remember_refused((block.owner_id, block.key_id))
            await self._give_back_if_idle(block, refilling=True)
            return False
        except _Lost:
            log.warning("credit block %s was released while held (its lease lapsed); taking another", block.id)
            self._drop(block)
            return False
        self.transactions += 1
        if new:
            block.has_row = True
            self._hold(block.id)
        block.held += amount
        self._start_idle_keeper()
        return True

    def _remember_refused(self, holder: Holder) -> None:
        now = time.monotonic()
        if len(self._refused_until) >= REFUSED_KEPT:
            self._refused_until = {h: until for h, until in self._refused_until.items() if until > now}
        self._refused_until[holder] = now + IDLE_S

    async def _grow(self, conn: Executor, block: _Block, amount: int, *, new: bool) -> None:
        # The lock order of a settlement (server.accounts.credits): the block's row
        # first, then the balance, then the key.
        if not new and (await conn.execute(_GROW, {"b_id": block.id, "b_amount": amount})).rowcount != 1:
            raise _Lost
        need = amount * BLOCK_SHARE
        now = utcnow()
        held = await conn.execute(
            HOLD_BALANCE, {"b_owner": block.owner_id, "b_amount": amount, "b_need": need, "b_now": now}
        )
        if held.rowcount != 1:
            raise _Refused
        if block.key_id is not None:
            capped = await conn.execute(HOLD_KEY, {"b_key": block.key_id, "b_amount": amount, "b_need": need})
            if capped.rowcount != 1:
                raise _Refused
        if new:
            await self._insert_row(conn, Reservation(block.id, block.owner_id, block.key_id, amount, None, now))

    def settled(self, reservation: Reservation, charged: int) -> None:
        """A draw's record was written (`charged` taken from the block's row) or
        failed (nothing charged): its worst case is free again."""
        block = self._by_id.get(reservation.id or "")
        if block is None:
            return
        block.drawn -= reservation.amount_micros
        block.held -= charged

    def lost(self, block_id: str) -> None:
        """A settlement found the block's row gone: its next draws go elsewhere."""
        block = self._by_id.get(block_id)
        if block is not None:
            log.warning("credit block %s was released while held (its lease lapsed)", block_id)
            self._drop(block)

    def _drop(self, block: _Block) -> None:
        self._by_id.pop(block.id, None)
        if self._by_holder.get((block.owner_id, block.key_id)) is block:
            del self._by_holder[(block.owner_id, block.key_id)]
        self._forget(block.id)

    async def _give_back_if_idle(self, block: _Block, *, refilling: bool = False) -> None:
        """Deletes the block's row and releases what it holds, unless a call draws from
        it or tops it up (`refilling`: the caller is the one topping it up)."""
        if block.drawn or self._by_id.get(block.id) is not block or (block.refilling.locked() and not refilling):
            return
        self._drop(block)
        if block.has_row:
            await self._release(Reservation(block.id, block.owner_id, block.key_id, block.held))

    async def give_back_idle(self, now: float | None = None) -> int:
        """Gives back the blocks nothing has drawn from for IDLE_S; returns how many."""
        now = time.monotonic() if now is None else now
        idle = [b for b in self._by_id.values() if not b.drawn and now - b.last_used >= IDLE_S]
        for block in idle:
            await self._give_back_if_idle(block)
        return len(idle)

    async def give_back_all(self) -> None:
        """At shutdown, once every record is written: every block nothing draws from."""
        if self._idle_keeper is not None:
            self._idle_keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._idle_keeper
            self._idle_keeper = None
        for block in list(self._by_id.values()):
            await self._give_back_if_idle(block)

    def _start_idle_keeper(self) -> None:
        if self._idle_keeper is None or self._idle_keeper.done():
            self._idle_keeper = asyncio.create_task(self._keep_idle(), name="credit-block-idle-keeper")

    async def _keep_idle(self) -> None:
        """Gives idle blocks back every IDLE_S / 2 while there are blocks."""
        while self._by_id:
            await asyncio.sleep(IDLE_S / 2)
            try:
                await self.give_back_idle()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                log.warning("could not give back idle credit blocks: %s", exc)
