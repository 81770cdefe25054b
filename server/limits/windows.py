"""Credit limits per UTC day and per calendar month (UTC): spend windows.

A rule's `daily_credits` / `monthly_credits` limit what the ledger charges the rule's
key or owner (narrowed to its model glob) per period: the UTC day (00:00 to 24:00
UTC) and the calendar month of the Gregorian calendar in UTC (the 1st, 00:00 UTC, to
the 1st of the next month). A call counts in the period in which it started (its
reservation holds that period's row), even when it ends after midnight.

Where the counters live: in the database (`spend_windows`), not in Redis. Credits
already live there, and a window is only exact if the hold on it is taken in the same
transaction as the hold on the balance and released in the same transaction as the
ledger record's charge (server.accounts.credits, server.accounts.ledger): then what a
window counts is exactly what the ledger charged, it survives restarts and Redis
outages, every replica sees one counter, and a crashed replica's holds come back with
its credit reservations' leases. A day's window changes once per call, far below what
a minute's RPM counter sees, so the database's row lock costs nothing noticeable.

Counting: before the call, the worst-case charge the credits module reserves for the
balance is also reserved against every window of the call, with one conditional UPDATE
each (`spent + reserved + x <= limit`), in the reservation's transaction; settling
moves the actual charge (at most the reservation) from `reserved` to `spent`. So
concurrent calls on any number of replicas never take a window past its limit.

The sweeper of expired reservations also deletes past periods' rows (untouched for
62 days, holding nothing; CreditService.prune_spend_windows). A period's row is
created by its first call, starting from what the ledger already
charged the rule's key or owner in that period for models its glob matches
(`ledger_spend`): a limit set mid-day counts the day's spend so far. (The ledger keeps
the resolved `provider/model`, so an alias glob starts from zero; calls already in
flight when a limit is set are not counted in it.)

Over the limit: 429 RATE_LIMITED (a limit that resets by itself, like RPM; the
balance's own refusal, INSUFFICIENT_CREDITS, means "buy more"), with the real wait
until the period ends in Retry-After and ErrorInfo metadata scope, limit_kind
(`daily_credits` / `monthly_credits`), limit (credits), window (`day` / `month`),
window_seconds (this period's length), model (the glob) and resets_at.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from fnmatch import fnmatchcase
from typing import Literal

from sqlalchemy import func, select

from server.errors import RateLimited
from server.limits.rules import LimitRule
from server.storage.database import Database
from server.storage.inline import Executor
from server.storage.schema import spend_windows, usage_records

WindowKind = Literal["daily_credits", "monthly_credits"]
WINDOW_KINDS: tuple[WindowKind, ...] = ("daily_credits", "monthly_credits")
_NAMES = {"daily_credits": ("day", "per UTC day"), "monthly_credits": ("month", "per UTC calendar month")}
_MICROS_PER_CREDIT = 1_000_000


@dataclass(frozen=True, slots=True)
class Period:
    """One day or month: its key in `spend_windows.period` and its bounds (UTC)."""

    key: str
    start: datetime
    end: datetime


def period_of(kind: WindowKind, now: datetime) -> Period:
    """The UTC day or calendar month that contains `now` (naive means UTC)."""
    now = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    if kind == "daily_credits":
        start = now.replace(hour=0, minute=0, second=0, microsecond=0)
        return Period(f"day:{start:%Y-%m-%d}", start, start + timedelta(days=1))
    start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return Period(f"month:{start:%Y-%m}", start, end)


@dataclass(frozen=True, slots=True)
class CreditWindow:
    """A rule's limit on credits per day or month, as it applies to one call."""

    scope: str
    subject: str
    model: str
    kind: WindowKind
    limit_micros: int

    def row_id(self, period: Period) -> str:
        """The `spend_windows` id of this window in `period`."""
        text = "\0".join((self.scope, self.subject, self.model, period.key))
        return hashlib.sha256(text.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class WindowSpend:
    """What a window's current period holds: charged, and held by calls in flight."""

    spent_micros: int = 0
    reserved_micros: int = 0


def windows_of(
    rules: Sequence[LimitRule], model: str | None = None, public_model: str | None = None
) -> list[CreditWindow]:
    """The credit windows of `rules` that apply to a call of `model` (all of them when
    `model` is None)."""
    windows = []
    for rule in rules:
        if model is not None and not rule.matches(model, public_model):
            continue
        for kind in WINDOW_KINDS:
            limit = getattr(rule, f"{kind}_micros")
            if limit is not None:
                windows.append(CreditWindow(rule.scope, rule.subject, rule.model, kind, int(limit)))
    return windows


async def spend_of(conn: Executor, windows: Sequence[CreditWindow], now: datetime) -> dict[CreditWindow, WindowSpend]:
    """The current period's spend of each window (before its first counted call: what
    the ledger charged in the period so far)."""
    ids = {window.row_id(period_of(window.kind, now)): window for window in windows}
    found: dict[CreditWindow, WindowSpend] = {}
    listed = list(ids)
    for start in range(0, len(listed), 500):  # far under both backends' bind limits
        rows = await conn.execute(
            select(spend_windows.c.id, spend_windows.c.spent_micros, spend_windows.c.reserved_micros).where(
                spend_windows.c.id.in_(listed[start : start + 500])
            )
        )
        for row in rows:
            found[ids[row.id]] = WindowSpend(int(row.spent_micros), int(row.reserved_micros))
    for window in windows:
        if window not in found:  # no call counted yet: what its first call will start from
            found[window] = WindowSpend(await ledger_spend(conn, window, period_of(window.kind, now)))
    return found


async def ledger_spend(conn: Executor, window: CreditWindow, period: Period) -> int:
    """What the ledger charged the window's key or owner in `period`, for models its
    glob matches (one grouped query on the (subject, created_at) index)."""
    subject = usage_records.c.key_id if window.scope == "key" else usage_records.c.owner_id
    rows = await conn.execute(
        select(usage_records.c.model, func.coalesce(func.sum(usage_records.c.credits_micros), 0))
        .where(
            subject == window.subject,
            usage_records.c.created_at >= period.start,
            usage_records.c.created_at < period.end,
        )
        .group_by(usage_records.c.model)
    )
    return sum(int(charged) for model, charged in rows if fnmatchcase(model, window.model))


async def spend_by_rule(
    db: Database, rules: Sequence[LimitRule], now: datetime
) -> dict[tuple[str, str, str, WindowKind], WindowSpend]:
    """The current period's spend of every credit window the rules set, keyed by
    (scope, subject, model, kind): what `limits show` and the admin API show."""
    windows = windows_of(rules)
    if not windows:
        return {}
    async with db.read() as conn:
        spend = await spend_of(conn, windows, now)
    return {(w.scope, w.subject, w.model, w.kind): value for w, value in spend.items()}


def format_micros(micros: int) -> str:
    """2500000 -> "2.5" (credits, shortest exact form)."""
    whole, frac = divmod(micros, _MICROS_PER_CREDIT)
    return f"{whole}.{frac:06d}".rstrip("0").rstrip(".")


def refusal(window: CreditWindow, spend: WindowSpend, needed_micros: int, now: datetime) -> RateLimited:
    """RATE_LIMITED for a call whose worst case does not fit in the window now."""
    period = period_of(window.kind, now)
    current = now.astimezone(UTC) if now.tzinfo else now.replace(tzinfo=UTC)
    wait_s = max((period.end - current).total_seconds(), 1.0)
    unit, per = _NAMES[window.kind]
    used = spend.spent_micros + spend.reserved_micros
    message = (
        f"credit limit reached: {format_micros(window.limit_micros)} credits {per} on this {window.scope}"
        f"{'' if window.model == '*' else f' for models {window.model!r}'}; "
        f"{format_micros(used)} spent or held by calls in flight, this call needs up to "
        f"{format_micros(needed_micros)}; the {unit} resets at {period.end:%Y-%m-%dT%H:%M:%SZ}"
    )
    if needed_micros > window.limit_micros:
        message += " (this call's worst case alone exceeds the limit: lower max_tokens)"
    metadata = {
        "scope": window.scope,
        "limit_kind": window.kind,
        "limit": format_micros(window.limit_micros),
        "window": unit,
        "window_seconds": str(int((period.end - period.start).total_seconds())),
        "model": window.model,
        "resets_at": f"{period.end:%Y-%m-%dT%H:%M:%SZ}",
    }
    return RateLimited(message, retry_after_seconds=wait_s, metadata=metadata)
