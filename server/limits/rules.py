"""Limit definitions: what is limited, on whom, for which models; stored in the
`rate_limits` table and read through a short cache.

A rule is on a key (`scope="key"`, subject = the key's id) or on an owner (`"owner"`,
subject = "user:alice": all its keys together), narrowed to a model glob (`openai/*`;
default `*`). It sets any of: requests per minute, tokens per minute (input plus
output), calls in flight, credits per UTC day and per UTC calendar month
(enforced by the credits module: server.limits.windows). Setting a rule again
for the same scope, subject and glob changes the limits it names and keeps the others.

Replicas read rules through `LimitStore.rules_for`, cached for the key cache TTL
(`AIGNE_HUB_KEY_CACHE_TTL_S`), so a change applies everywhere within that bound, as a
revocation does. When the database cannot be read, the last rules read are used.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Literal

from sqlalchemy import and_, delete, or_, select

from server.errors import InvalidRequest, ResourceNotFound
from server.storage.database import Database
from server.storage.schema import api_keys, owners, rate_limits, utcnow

Scope = Literal["key", "owner"]
SCOPES: tuple[Scope, ...] = ("key", "owner")
# The limits a rule can set, in the order they are shown.
LIMIT_FIELDS = ("rpm", "tpm", "concurrency", "daily_credits_micros", "monthly_credits_micros")
MAX_LIMIT = 10**12
MAX_GLOB_CHARS = 200
# The id of the rule the config file's `limits: {default_key: ...}` makes for a key.
DEFAULT_RULE_ID = "default"
# Subjects per `find_each` query: well under SQLite's oldest limit of 999 parameters.
_SUBJECTS_PER_QUERY = 500


@dataclass(frozen=True, slots=True)
class LimitRule:
    """One row of `rate_limits`; None means "not limited"."""

    scope: Scope
    subject: str
    model: str = "*"
    rpm: int | None = None
    tpm: int | None = None
    concurrency: int | None = None
    daily_credits_micros: int | None = None
    monthly_credits_micros: int | None = None
    id: str = ""
    updated_at: datetime | None = None

    def matches(self, model: str, public_model: str | None = None) -> bool:
        """Whether the rule applies to a call of `model` (resolved `provider/model`) or
        of the public name the caller used for it (an alias, a routed model)."""
        return fnmatchcase(model, self.model) or bool(public_model and fnmatchcase(public_model, self.model))

    def limits(self) -> dict[str, int]:
        return {name: value for name in LIMIT_FIELDS if (value := getattr(self, name)) is not None}


def check_rule(rule: LimitRule) -> None:
    """INVALID_ARGUMENT unless the rule is well formed: a known scope, a subject, a
    glob of at most 200 characters, and at least one limit, each a whole number from 1."""
    if rule.scope not in SCOPES:
        raise InvalidRequest(f"scope must be 'key' or 'owner', not {rule.scope[:64]!r}", field="scope")
    if not rule.subject:
        raise InvalidRequest("a limit needs a key id or an owner", field="subject")
    if not rule.model or len(rule.model) > MAX_GLOB_CHARS:
        raise InvalidRequest(f"model must be a glob of 1 to {MAX_GLOB_CHARS} characters", field="model")
    for name in LIMIT_FIELDS:
        value = getattr(rule, name)
        if value is None or (isinstance(value, int) and 1 <= value <= MAX_LIMIT):
            continue
        if name.endswith("_credits_micros"):  # micro-credits: say it in credits, as they were given
            shown = name.removesuffix("_micros")
            raise InvalidRequest(f"{shown} must be from 0.000001 to {MAX_LIMIT // 1_000_000} credits", field=shown)
        raise InvalidRequest(f"{name} must be a whole number from 1 to {MAX_LIMIT}, not {str(value)[:40]}", field=name)
    if not rule.limits():
        raise InvalidRequest(
            "set at least one limit (rpm, tpm, concurrency, daily credits, monthly credits)", field="limits"
        )


def _rule(row: Any) -> LimitRule:
    values = {f.name: getattr(row, f.name) for f in fields(LimitRule)}
    return LimitRule(**values)


class LimitStore:
    """Creates, lists and removes rules; `rules_for` is the cached read of the hot path."""

    def __init__(self, db: Database, *, cache_ttl_s: float = 5.0, clock: Callable[[], float] = time.monotonic) -> None:
        self._db = db
        self._ttl = cache_ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, list[LimitRule]]] = {}
        # Told when this process changed a rule (the workers of one `serve` then forget
        # theirs at once: server.serving.hub).
        self.on_change: Callable[[], None] | None = None

    async def set(self, rule: LimitRule) -> LimitRule:
        """Creates the rule, or changes the limits it names on the existing one.
        NOT_FOUND when its key or owner does not exist; nothing changes on an error."""
        check_rule(rule)
        await self._check_subject(rule.scope, rule.subject)
        async with self._db.write() as conn:
            found = (
                await conn.execute(
                    select(rate_limits).where(
                        rate_limits.c.scope == rule.scope,
                        rate_limits.c.subject == rule.subject,
                        rate_limits.c.model == rule.model,
                    )
                )
            ).first()
            now = utcnow()
            if found is None:
                stored = replace(rule, id=uuid.uuid4().hex, updated_at=now)
                values = {f.name: getattr(stored, f.name) for f in fields(LimitRule)}
                await conn.execute(rate_limits.insert().values(**values))
            else:
                stored = replace(_rule(found), updated_at=now, **rule.limits())  # type: ignore[arg-type]
                changes = {name: getattr(stored, name) for name in LIMIT_FIELDS}
                await conn.execute(
                    rate_limits.update().where(rate_limits.c.id == found.id).values(**changes, updated_at=now)
                )
        self._changed()
        return stored

    def invalidate(self) -> None:
        """Forgets the cached rules of this process."""
        self._cache.clear()

    def _changed(self) -> None:
        self._cache.clear()
        if self.on_change is not None:
            self.on_change()

    async def remove(self, scope: Scope, subject: str, model: str = "*") -> None:
        """Removes a rule; NOT_FOUND when there is none."""
        async with self._db.write() as conn:
            result = await conn.execute(
                delete(rate_limits).where(
                    rate_limits.c.scope == scope, rate_limits.c.subject == subject, rate_limits.c.model == model
                )
            )
        if not result.rowcount:
            raise ResourceNotFound(f"no limit on {scope} {subject[:64]!r} for model {model[:64]!r}", field="subject")
        self._changed()

    async def find(
        self,
        scope: Scope | None = None,
        subject: str | None = None,
        *,
        after: tuple[str, str, str] | None = None,
        limit: int | None = None,
    ) -> list[LimitRule]:
        """Rules ordered by (scope, subject, model), optionally of one scope/subject."""
        query = select(rate_limits).order_by(rate_limits.c.scope, rate_limits.c.subject, rate_limits.c.model)
        if scope is not None:
            query = query.where(rate_limits.c.scope == scope)
        if subject is not None:
            query = query.where(rate_limits.c.subject == subject)
        if after is not None:
            query = query.where(
                (rate_limits.c.scope, rate_limits.c.subject, rate_limits.c.model) > after  # type: ignore[operator]
            )
        if limit is not None:
            query = query.limit(limit)
        async with self._db.read() as conn:
            return [_rule(row) for row in (await conn.execute(query)).all()]

    async def find_each(self, scope: Scope, subjects: Sequence[str]) -> dict[str, list[LimitRule]]:
        """Each subject's rules (ordered by model), for many subjects in a few queries:
        `find` per subject made a page of 1000 keys 1000 queries."""
        found: dict[str, list[LimitRule]] = {subject: [] for subject in subjects}
        unique = list(found)
        async with self._db.read() as conn:
            for start in range(0, len(unique), _SUBJECTS_PER_QUERY):
                query = (
                    select(rate_limits)
                    .where(
                        rate_limits.c.scope == scope,
                        rate_limits.c.subject.in_(unique[start : start + _SUBJECTS_PER_QUERY]),
                    )
                    .order_by(rate_limits.c.subject, rate_limits.c.model)
                )
                for row in (await conn.execute(query)).all():
                    found[row.subject].append(_rule(row))
        return found

    async def rules_for(self, key_id: str, owner_id: str) -> list[LimitRule]:
        """The rules of a key and of its owner (cached; stale ones when the database fails)."""
        cache_key = (key_id, owner_id)
        cached = self._cache.get(cache_key)
        now = self._clock()
        if cached is not None and cached[0] > now:
            return cached[1]
        query = select(rate_limits).where(
            or_(
                and_(rate_limits.c.scope == "key", rate_limits.c.subject == key_id),
                and_(rate_limits.c.scope == "owner", rate_limits.c.subject == owner_id),
            )
        )
        try:
            async with self._db.read() as conn:
                rules = [_rule(row) for row in (await conn.execute(query)).all()]
        except Exception:
            if cached is not None:
                return cached[1]  # the database is failing: the last rules read still hold
            raise
        if len(self._cache) > 100_000:
            self._cache.clear()
        self._cache[cache_key] = (now + self._ttl, rules)
        return rules

    async def exists(self, scope: Scope, subject: str) -> bool:
        """Whether the key (scope "key") or owner named exists."""
        column = api_keys.c.id if scope == "key" else owners.c.id
        async with self._db.read() as conn:
            return (await conn.execute(select(column).where(column == subject))).first() is not None

    async def _check_subject(self, scope: Scope, subject: str) -> None:
        if not await self.exists(scope, subject):
            kind = "API key" if scope == "key" else "owner"
            raise ResourceNotFound(f"no {kind} {subject[:64]!r}", field=scope)
