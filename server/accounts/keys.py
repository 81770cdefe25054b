"""Gateway API keys: creation, authentication (cached) and model allow-lists.

A secret looks like `ahk_<prefix>_<random>`: `prefix` (8 characters of [a-z0-9]) is
stored in clear, shown in listings and used as the lookup index; `random` carries
256 bits from `secrets`. The secret is shown once, by `create_key`, and stored only as
SHA-256(secret) — or HMAC-SHA256(pepper, secret) when a server pepper is configured,
so that a stolen database alone cannot even confirm a guessed secret.

Why not bcrypt/scrypt/argon2: a slow KDF protects *low-entropy* secrets (passwords)
from offline guessing. With 256 random bits there is nothing to guess — 2^256
SHA-256 evaluations is out of reach however fast each one is — while a slow KDF would
add tens of milliseconds of CPU to every cache miss and make unknown-key floods a
cheap denial of service. The stored hash is compared with `hmac.compare_digest`
(constant time).

Hot path: `authenticate` answers from an in-process cache keyed by the secret's hash.
An entry is trusted for `cache_ttl_s` (default 5 s), so a key revoked on any replica
stops working on every replica within that bound (immediately on the revoking one).
Unknown or wrong secrets are cached too, for `negative_ttl_s`, so a flood of bad keys
costs at most one database read per distinct secret per interval; the cache is an LRU
bounded to `max_entries`, and concurrent misses for one secret share one read.
Expiry is checked against the clock on every call, not cached.

Database outages: a key that was read successfully keeps authenticating from the cache
while the database cannot be reached, for at most `outage_grace_s` (default 300 s)
past its TTL; then, and for keys never seen (or cached as unknown), the call gets 503
STORAGE_UNAVAILABLE. So a revocation made on another replica during an outage takes
effect here within TTL + grace at worst (a revocation on this replica is immediate),
and a database restart or failover does not lock every client out. While the
database is failing, one lookup per `outage_probe_interval_s` tries it again; the
others answer from the cache at once instead of each waiting for the timeout.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from fnmatch import fnmatchcase

from sqlalchemy import Row, select, tuple_, update
from sqlalchemy.exc import IntegrityError

from server.accounts.errors import KeyExpired, KeyInvalid, KeyRevoked, ModelNotAllowed, Unauthenticated
from server.errors import StorageUnavailable
from server.storage.database import Database
from server.storage.schema import api_keys, utcnow

SECRET_PREFIX = "ahk"
PREFIX_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
PREFIX_LENGTH = 8
_SECRET_RE = re.compile(rf"^{SECRET_PREFIX}_([a-z0-9]{{{PREFIX_LENGTH}}})_([A-Za-z0-9_-]{{40,64}})$")


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """A key as stored, without its secret."""

    id: str
    prefix: str
    name: str
    owner_id: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    # fnmatch globs such as "openai/*"; None means every model.
    allowed_models: tuple[str, ...] | None
    spend_cap_micros: int | None

    @property
    def display(self) -> str:
        """How the key is shown: `ahk_<prefix>_…`."""
        return f"{SECRET_PREFIX}_{self.prefix}_…"

    def allows(self, model: str) -> bool:
        return self.allowed_models is None or any(fnmatchcase(model, glob) for glob in self.allowed_models)


def authorize(key: KeyRecord, model: str, public_model: str | None = None) -> None:
    """Raises MODEL_NOT_ALLOWED unless `model` (the resolved `provider/model`) or the
    public model the caller named for it (an alias, a routed model such as `smart`, a
    fallback) matches one of the key's globs: allowing a routed model allows what the
    operator configured behind it."""
    if not key.allows(model) and not (public_model and key.allows(public_model)):
        allowed = ", ".join(key.allowed_models or ())
        raise ModelNotAllowed(
            f"API key {key.name!r} ({key.display}) may not use model {model!r}; it allows: {allowed}",
            metadata={"model": model, "key_prefix": key.prefix},
        )


class _Failed:
    """A shared lookup that ended without a result."""


@dataclass(slots=True)
class _Entry:
    record: KeyRecord | None  # None: no key has this secret
    fresh_until: float


class KeyStore:
    """Creates, revokes and authenticates API keys."""

    def __init__(
        self,
        db: Database,
        *,
        pepper: bytes | None = None,
        cache_ttl_s: float = 5.0,
        negative_ttl_s: float = 1.0,
        max_entries: int = 100_000,
        outage_grace_s: float = 300.0,
        outage_probe_interval_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], datetime] = utcnow,
    ) -> None:
        self._db = db
        self._pepper = pepper
        self._ttl = cache_ttl_s
        self._negative_ttl = negative_ttl_s
        self._max_entries = max_entries
        self._clock = clock
        # Expiry compares with stored wall-clock times; injectable so tests need no sleep.
        self._wall_clock = wall_clock
        self._cache: OrderedDict[bytes, _Entry] = OrderedDict()
        self._inflight: dict[bytes, asyncio.Future[KeyRecord | _Failed | None]] = {}
        self._outage_grace = outage_grace_s
        self._probe_interval = outage_probe_interval_s
        # While the database fails: when the next lookup may try it again.
        self._next_probe: float | None = None
        # Told of a key this process revoked or changed (the workers of one `serve` then
        # forget it at once: server.serving.hub).
        self.on_change: Callable[[str], None] | None = None

    # -- administration ---------------------------------------------------------------

    async def create_key(
        self,
        owner_id: str,
        name: str,
        *,
        expires_at: datetime | None = None,
        allowed_models: Iterable[str] | None = None,
        spend_cap_micros: int | None = None,
    ) -> tuple[KeyRecord, str]:
        """A new key and its secret. The secret is not stored and cannot be shown again."""
        if not name:
            raise ValueError("a key needs a name")
        if expires_at is not None and expires_at.tzinfo is None:
            raise ValueError("expires_at must be an aware datetime")
        if spend_cap_micros is not None and spend_cap_micros < 0:
            raise ValueError("spend_cap_micros must not be negative")
        globs = tuple(allowed_models) if allowed_models is not None else None
        if globs is not None and (not globs or any(not glob for glob in globs)):
            raise ValueError("allowed_models must be None (every model) or non-empty globs")
        for _attempt in range(5):
            prefix = "".join(secrets.choice(PREFIX_ALPHABET) for _ in range(PREFIX_LENGTH))
            secret = f"{SECRET_PREFIX}_{prefix}_{secrets.token_urlsafe(32)}"
            record = KeyRecord(
                id=uuid.uuid4().hex,
                prefix=prefix,
                name=name,
                owner_id=owner_id,
                created_at=utcnow(),
                expires_at=expires_at,
                revoked_at=None,
                allowed_models=globs,
                spend_cap_micros=spend_cap_micros,
            )
            try:
                async with self._db.write() as conn:
                    await conn.execute(
                        api_keys.insert().values(
                            id=record.id,
                            prefix=prefix,
                            secret_hash=self._hash(secret),
                            name=name,
                            owner_id=owner_id,
                            created_at=record.created_at,
                            expires_at=expires_at,
                            allowed_models=list(globs) if globs is not None else None,
                            spend_cap_micros=spend_cap_micros,
                        )
                    )
            except IntegrityError as exc:
                if "prefix" in str(exc.orig):  # a prefix collision (1 in 2.8e12): draw again
                    continue
                raise
            return record, secret
        raise RuntimeError("could not draw a unique key prefix")  # pragma: no cover

    async def revoke_key(self, key_id: str) -> KeyRecord:
        """Revokes the key (idempotent). Effective here now, on other replicas within
        the cache TTL."""
        async with self._db.write() as conn:
            await conn.execute(
                update(api_keys)
                .where(api_keys.c.id == key_id, api_keys.c.revoked_at.is_(None))
                .values(revoked_at=utcnow())
            )
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one_or_none()
        if row is None:
            raise KeyError(key_id)
        self._changed(key_id)
        return _record(row)

    async def set_spend_cap(self, key_id: str, spend_cap_micros: int | None) -> KeyRecord:
        async with self._db.write() as conn:
            await conn.execute(
                update(api_keys).where(api_keys.c.id == key_id).values(spend_cap_micros=spend_cap_micros)
            )
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one_or_none()
        if row is None:
            raise KeyError(key_id)
        self._changed(key_id)
        return _record(row)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one_or_none()
        return None if row is None else _record(row)

    async def list_keys(
        self, owner_id: str | None = None, *, after: tuple[datetime, str] | None = None, limit: int | None = None
    ) -> list[KeyRecord]:
        """Keys oldest first; a page of `limit` of them after the key whose
        (created_at, id) is `after`."""
        query = select(api_keys).order_by(api_keys.c.created_at, api_keys.c.id).limit(limit)
        if owner_id is not None:
            query = query.where(api_keys.c.owner_id == owner_id)
        if after is not None:
            query = query.where(tuple_(api_keys.c.created_at, api_keys.c.id) > tuple_(*after))
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_record(row) for row in rows]

    def _changed(self, key_id: str) -> None:
        self.invalidate(key_id)
        if self.on_change is not None:
            self.on_change(key_id)

    def invalidate(self, key_id: str | None = None) -> None:
        """Forgets cached entries (of one key, or all) on this replica."""
        if key_id is None:
            self._cache.clear()
            return
        for digest in [d for d, e in self._cache.items() if e.record is not None and e.record.id == key_id]:
            del self._cache[digest]

    # -- the hot path -------------------------------------------------------------------

    async def authenticate(self, secret: str | None) -> KeyRecord:
        """The key whose secret this is; raises UNAUTHENTICATED (missing), KEY_INVALID
        (malformed, unknown, wrong), KEY_EXPIRED or KEY_REVOKED."""
        if not secret:
            raise Unauthenticated("no API key given; send it as 'Authorization: Bearer ahk_...'")
        match = _SECRET_RE.match(secret)
        if match is None:
            raise KeyInvalid("the API key is malformed; gateway keys look like ahk_<prefix>_<secret>")
        digest = self._hash(secret)
        record = await self._lookup(match.group(1), digest)
        if record is None:
            raise KeyInvalid(f"the API key ahk_{match.group(1)}_… is not valid")
        if record.revoked_at is not None:
            raise KeyRevoked(
                f"the API key {record.name!r} ({record.display}) was revoked",
                metadata={"key_prefix": record.prefix},
            )
        if record.expires_at is not None and record.expires_at <= self._wall_clock():
            raise KeyExpired(
                f"the API key {record.name!r} ({record.display}) expired at {record.expires_at.isoformat()}",
                metadata={"key_prefix": record.prefix},
            )
        return record

    async def _lookup(self, prefix: str, digest: bytes) -> KeyRecord | None:
        entry = self._cache.get(digest)
        now = self._clock()
        if entry is not None and entry.fresh_until > now:
            self._cache.move_to_end(digest)
            return entry.record
        stale = entry.record if entry is not None and entry.fresh_until + self._outage_grace > now else None
        if stale is not None and self._next_probe is not None:
            if now < self._next_probe:
                return stale  # the database failed a moment ago: do not wait on it again
            self._next_probe = now + self._probe_interval  # this lookup probes; others wait not
        try:
            record = await self._load_shared(prefix, digest)
        except StorageUnavailable:
            self._next_probe = self._clock() + self._probe_interval
            if stale is None:
                raise
            return stale
        self._next_probe = None
        return record

    async def _load_shared(self, prefix: str, digest: bytes) -> KeyRecord | None:
        """Reads the key and caches the answer; concurrent reads of one secret share one."""
        pending = self._inflight.get(digest)
        if pending is not None:
            shared = await asyncio.shield(pending)
            if not isinstance(shared, _Failed):
                return shared
            # The shared read failed (or was cancelled): try on our own.
        future: asyncio.Future[KeyRecord | _Failed | None] = asyncio.get_running_loop().create_future()
        self._inflight[digest] = future
        try:
            record = await self._load(prefix, digest)
            future.set_result(record)
        finally:
            if not future.done():
                future.set_result(_Failed())
            if self._inflight.get(digest) is future:
                del self._inflight[digest]
        ttl = self._ttl if record is not None else self._negative_ttl
        if ttl > 0:
            self._cache[digest] = _Entry(record, self._clock() + ttl)
            self._cache.move_to_end(digest)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return record

    async def _load(self, prefix: str, digest: bytes) -> KeyRecord | None:
        async with self._db.read() as conn:
            row = (await conn.execute(select(api_keys).where(api_keys.c.prefix == prefix))).one_or_none()
        if row is None or not hmac.compare_digest(bytes(row.secret_hash), digest):
            return None
        return _record(row)

    def _hash(self, secret: str) -> bytes:
        data = secret.encode()
        if self._pepper:
            # hmac.digest: the one-shot C path, the same bytes as hmac.new(...).digest().
            return hmac.digest(self._pepper, data, "sha256")
        return hashlib.sha256(data).digest()


def _record(row: Row[tuple[object, ...]]) -> KeyRecord:
    allowed = row.allowed_models
    return KeyRecord(
        id=row.id,
        prefix=row.prefix,
        name=row.name,
        owner_id=row.owner_id,
        created_at=row.created_at,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        allowed_models=tuple(allowed) if allowed is not None else None,
        spend_cap_micros=row.spend_cap_micros,
    )
