"""API keys: lifecycle, error reasons, the cache (no round trip, bounded revocation)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from server.accounts import (
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    KeyStore,
    ModelNotAllowed,
    PermissionDenied,
    Unauthenticated,
    authorize,
    ensure_owner,
)
from server.errors import GatewayError
from server.limits.rules import LimitRule, LimitStore
from server.storage import Database
from server.storage.schema import api_keys
from tests.storage_fixtures import count_queries, database_url, db, open_replica  # noqa: F401


async def _owner(db: Database) -> str:  # noqa: F811
    return (await ensure_owner(db, "user", "alice")).id


def _reason(exc: pytest.ExceptionInfo[GatewayError]) -> str:
    return exc.value.reason


async def test_key_lifecycle(db: Database) -> None:  # noqa: F811
    keys = KeyStore(db)
    owner = await _owner(db)
    record, secret = await keys.create_key(owner, "ci", allowed_models=["openai/*"], spend_cap_micros=5_000_000)
    assert secret.startswith(f"ahk_{record.prefix}_") and len(secret) > 50
    assert record.display == f"ahk_{record.prefix}_…"

    authed = await keys.authenticate(secret)
    assert authed == record
    assert authed.owner_id == "user:alice" and authed.allowed_models == ("openai/*",)
    assert authed.spend_cap_micros == 5_000_000

    # Stored only as a hash.
    async with db.read() as conn:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == record.id))).one()
    assert bytes(row.secret_hash) == hashlib.sha256(secret.encode()).digest()
    assert secret not in repr(tuple(row)) and secret.split("_", 2)[2] not in repr(tuple(row))
    assert [k.id for k in await keys.list_keys(owner)] == [record.id]

    with pytest.raises(Unauthenticated) as missing:
        await keys.authenticate(None)
    assert _reason(missing) == "UNAUTHENTICATED"
    with pytest.raises(KeyInvalid) as malformed:
        await keys.authenticate("sk-not-a-gateway-key")
    assert _reason(malformed) == "KEY_INVALID"
    wrong = secret[:-4] + ("AAAA" if not secret.endswith("AAAA") else "BBBB")
    with pytest.raises(KeyInvalid) as bad:
        await keys.authenticate(wrong)
    assert _reason(bad) == "KEY_INVALID" and isinstance(bad.value, Unauthenticated)
    with pytest.raises(KeyInvalid):
        await keys.authenticate("ahk_zzzzzzzz_" + secret.split("_", 2)[2])

    revoked = await keys.revoke_key(record.id)
    assert revoked.revoked_at is not None
    with pytest.raises(KeyRevoked) as gone:
        await keys.authenticate(secret)  # at once on the revoking replica
    assert _reason(gone) == "KEY_REVOKED" and record.prefix in gone.value.message
    assert (await keys.revoke_key(record.id)).revoked_at == revoked.revoked_at  # idempotent


async def test_expired_key(db: Database) -> None:  # noqa: F811
    keys = KeyStore(db)
    owner = await _owner(db)
    _, old = await keys.create_key(owner, "old", expires_at=datetime.now(UTC) - timedelta(seconds=1))
    with pytest.raises(KeyExpired) as expired:
        await keys.authenticate(old)
    assert _reason(expired) == "KEY_EXPIRED"

    # Expiry is checked on every call, not cached: a wall clock moved past the expiry
    # (no sleep) makes the cached key expired.
    now = datetime.now(UTC)
    wall = [now]
    timed = KeyStore(db, wall_clock=lambda: wall[0])
    _, soon = await timed.create_key(owner, "soon", expires_at=now + timedelta(seconds=1))
    await timed.authenticate(soon)
    wall[0] = now + timedelta(seconds=1)
    with pytest.raises(KeyExpired):
        await timed.authenticate(soon)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_revocation_reaches_other_replicas_within_the_ttl(database_url: str, db: Database) -> None:  # noqa: F811
    clock = FakeClock()
    replica = await open_replica(database_url)
    try:
        here = KeyStore(db, cache_ttl_s=5)
        there = KeyStore(replica, cache_ttl_s=5, clock=clock)
        record, secret = await here.create_key(await _owner(db), "shared")
        await there.authenticate(secret)  # cached on the other replica

        await here.revoke_key(record.id)
        with pytest.raises(KeyRevoked):
            await here.authenticate(secret)  # at once where it was revoked
        clock.now += 4.9
        await there.authenticate(secret)  # within the TTL the other replica trusts its cache
        clock.now += 0.2
        with pytest.raises(KeyRevoked):
            await there.authenticate(secret)  # past it, never
    finally:
        await replica.close()


async def test_revocation_with_a_tiny_ttl_in_real_time(database_url: str, db: Database) -> None:  # noqa: F811
    replica = await open_replica(database_url)
    try:
        here, there = KeyStore(db), KeyStore(replica, cache_ttl_s=0.2)
        record, secret = await here.create_key(await _owner(db), "tiny")
        await there.authenticate(secret)
        await here.revoke_key(record.id)
        await asyncio.sleep(0.25)
        with pytest.raises(KeyRevoked):
            await there.authenticate(secret)
    finally:
        await replica.close()


async def test_hot_path_does_no_database_round_trip(db: Database) -> None:  # noqa: F811
    keys = KeyStore(db, cache_ttl_s=60, negative_ttl_s=60)
    _, secret = await keys.create_key(await _owner(db), "hot")
    with count_queries(db) as queries:
        await keys.authenticate(secret)
        assert len(queries) == 1
        for _ in range(100):
            await keys.authenticate(secret)
        assert len(queries) == 1

        # Unknown secrets are cached too (briefly), so a flood costs one read each.
        bogus = "ahk_aaaaaaaa_" + "x" * 43
        for _ in range(10):
            with pytest.raises(KeyInvalid):
                await keys.authenticate(bogus)
        assert len(queries) == 2

    # Concurrent misses for one key share one read.
    cold = KeyStore(db)
    with count_queries(db) as queries:
        records = await asyncio.gather(*(cold.authenticate(secret) for _ in range(20)))
    assert len({r.id for r in records}) == 1
    assert len(queries) == 1


async def test_negative_cache_expires(db: Database) -> None:  # noqa: F811
    clock = FakeClock()
    keys = KeyStore(db, negative_ttl_s=1, clock=clock)
    bogus = "ahk_bbbbbbbb_" + "y" * 43
    with count_queries(db) as queries:
        for _ in range(2):
            with pytest.raises(KeyInvalid):
                await keys.authenticate(bogus)
        clock.now += 1.01
        with pytest.raises(KeyInvalid):
            await keys.authenticate(bogus)
    assert len(queries) == 2


async def test_cache_is_bounded(db: Database) -> None:  # noqa: F811
    keys = KeyStore(db, max_entries=5)
    for i in range(20):
        with pytest.raises(KeyInvalid):
            await keys.authenticate(f"ahk_{i:08d}_" + "z" * 43)
    assert len(keys._cache) == 5


async def test_pepper_changes_the_hash(db: Database) -> None:  # noqa: F811
    peppered = KeyStore(db, pepper=b"server-side pepper")
    record, secret = await peppered.create_key(await _owner(db), "peppered")
    assert (await peppered.authenticate(secret)).id == record.id
    with pytest.raises(KeyInvalid):
        await KeyStore(db).authenticate(secret)  # without the pepper the hash differs
    # The stored hash is HMAC-SHA256(pepper, secret): keys stored by earlier releases
    # still authenticate.
    async with db.read() as conn:
        stored = (await conn.execute(select(api_keys.c.secret_hash).where(api_keys.c.id == record.id))).scalar_one()
    assert stored == hmac.new(b"server-side pepper", secret.encode(), hashlib.sha256).digest()


def test_allow_list_globs() -> None:
    from server.accounts.keys import KeyRecord

    now = datetime.now(UTC)
    key = KeyRecord("id", "abcdefgh", "k", "user:a", now, None, None, ("openai/*", "anthropic/claude-3-*"), None)
    authorize(key, "openai/gpt-4o")
    authorize(key, "anthropic/claude-3-5-sonnet")
    for model in ("google/gemini-2.0", "anthropic/claude-2", "OpenAI/gpt-4o", "openaix/gpt"):
        with pytest.raises(ModelNotAllowed) as denied:
            authorize(key, model)
        assert denied.value.reason == "MODEL_NOT_ALLOWED" and isinstance(denied.value, PermissionDenied)
        assert model in denied.value.message and "openai/*" in denied.value.message
    anything = KeyRecord("id", "abcdefgh", "k", "user:a", now, None, None, None, None)
    authorize(anything, "whatever/model")


async def test_create_key_validates(db: Database) -> None:  # noqa: F811
    keys = KeyStore(db)
    owner = await _owner(db)
    with pytest.raises(ValueError):
        await keys.create_key(owner, "")
    with pytest.raises(ValueError):
        await keys.create_key(owner, "k", allowed_models=[])
    with pytest.raises(ValueError):
        await keys.create_key(owner, "k", expires_at=datetime(2030, 1, 1))
    with pytest.raises(Exception, match=r"(?i)foreign key|violates"):
        await keys.create_key("user:nobody", "k")


async def test_the_limits_of_many_keys_are_found_in_one_query_per_500(db: Database) -> None:  # noqa: F811
    owner = await ensure_owner(db, "project", "many-keys")
    store = LimitStore(db)
    keys = [(await KeyStore(db).create_key(owner.id, f"k{i}"))[0].id for i in range(3)]
    await store.set(LimitRule("key", keys[0], "*", rpm=1))
    await store.set(LimitRule("key", keys[1], "openai/*", rpm=2))
    await store.set(LimitRule("key", keys[1], "*", tpm=3))
    await store.set(LimitRule("owner", owner.id, "*", rpm=4))  # another scope: not a key's
    subjects = [f"absent-{i}" for i in range(1200)]
    subjects[0], subjects[600], subjects[1199] = keys  # one in each query
    with count_queries(db) as queries:
        found = await store.find_each("key", subjects)
    assert len(queries) == 3
    assert set(found) == set(subjects) and sum(map(len, found.values())) == 3
    assert [(r.model, r.rpm) for r in found[keys[0]]] == [("*", 1)]
    assert [(r.model, r.rpm, r.tpm) for r in found[keys[1]]] == [("*", None, 3), ("openai/*", 2, None)]
    assert found[keys[2]] == [] and found["absent-1"] == []
