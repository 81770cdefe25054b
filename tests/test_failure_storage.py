"""A PostgreSQL outage, through the real server and the REST bridge.

The gateway reaches a database of its own (created for the test on the shared server)
through `FaultProxy`, which plays the outage: "stopped" refuses connections and resets
open ones, "frozen" holds them open and forwards nothing. The shared PostgreSQL itself
is never touched. Each outage must give 503 STORAGE_UNAVAILABLE (gRPC UNAVAILABLE with
ErrorInfo and RetryInfo; REST 503 with an OpenAI error body and `retry-after`) within
the configured timeouts, with no internal text, and the same gateway must serve again
once the database is back.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
import pytest_asyncio
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.sql.dml import Insert

from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.accounts.credentials import CredentialVault
from server.accounts.errors import KeyRevoked
from server.accounts.keys import KeyStore
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import Settings
from server.errors import StorageUnavailable
from server.storage import Database
from server.storage.database import create_engine
from server.storage.inline import Executor
from server.storage.migrate import _PG_LOCK_KEY, upgrade_engine
from server.storage.schema import owners, utcnow
from tests.conftest import Bridge, gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.fakes.tcp_proxy import FaultProxy
from tests.helpers import bearer_interceptors, error_info, retry_info
from tests.storage_fixtures import POSTGRES_URL, _admin_connection, another_process_writing

CONNECT_TIMEOUT_S = 1.0
STATEMENT_TIMEOUT_S = 1.0
# The longest a frozen database may hold a call: a statement's client-side bound
# (statement timeout + 1 s) or a connection attempt; plus margin for a loaded machine.
WORST_CASE_S = max(CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S + 1.0)
MARGIN_S = 3.0
# Seen by trust auth as nothing; must never reach a client or the log.
DB_PASSWORD = "pw-" + secrets.token_hex(8)
ADMIN_TOKEN = "admin-" + secrets.token_hex(8)
INTERNAL_TEXT = ("Errno", "ConnectionRefused", "Connect call failed", "Traceback", "asyncpg", "TimeoutError")


@dataclass
class Outage:
    proxy: FaultProxy
    gateway: Gateway
    bridge: Bridge

    async def new_key(self) -> str:
        """A key this gateway has never seen (so not in its cache)."""
        owner = await ensure_owner(self.gateway.accounts.db, "user", "outage")
        _, secret = await self.gateway.accounts.keys.create_key(owner.id, f"k-{secrets.token_hex(3)}")
        return secret


@pytest_asyncio.fixture
async def outage(fake_openai: FakeOpenAI, tmp_path: Path) -> AsyncIterator[Outage]:
    name = f"aigne_test_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    await admin.execute(f'CREATE DATABASE "{name}"')
    proxy = FaultProxy(make_url(POSTGRES_URL).host or "127.0.0.1", make_url(POSTGRES_URL).port or 5432)
    try:
        direct = create_engine(make_url(POSTGRES_URL).set(database=name))
        await upgrade_engine(direct)
        await direct.dispose()
        await proxy.start()
        url = make_url(POSTGRES_URL).set(database=name, password=DB_PASSWORD, port=proxy.port)
        settings = Settings(
            grpc_port=0,
            database_url=url.render_as_string(hide_password=False),
            database_connect_timeout_s=CONNECT_TIMEOUT_S,
            database_statement_timeout_s=STATEMENT_TIMEOUT_S,
            data_dir=tmp_path / "data",
            admin_token=ADMIN_TOKEN,
        )
        gateway = await start_gateway(settings, gateway_config(fake_openai.base_url))
        bridge = await start_bridge(gateway.port, tmp_path / "envoy")
        try:
            yield Outage(proxy, gateway, bridge)
        finally:
            await proxy.resume()
            await bridge.envoy.stop()
            await gateway.stop(0.5)
    finally:
        await proxy.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def grpc_list_models(outage: Outage, secret: str) -> status_pb.ListModelsResponse:
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{outage.gateway.port}", interceptors=bearer_interceptors(secret)
    ) as channel:
        response: status_pb.ListModelsResponse = await status_grpc.StatusServiceStub(channel).ListModels(
            status_pb.ListModelsRequest(), timeout=30
        )
        return response


async def rest_chat(outage: Outage, secret: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=outage.bridge.rest_url, timeout=30) as client:
        return await client.post(
            "/v1/chat/completions",
            headers={"authorization": f"Bearer {secret}"},
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
        )


async def assert_grpc_outage(outage: Outage, secret: str) -> None:
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await grpc_list_models(outage, secret)
    elapsed = time.monotonic() - started
    error = caught.value
    assert error.code() == grpc.StatusCode.UNAVAILABLE, error
    assert error_info(error).reason == "STORAGE_UNAVAILABLE"
    hint = retry_info(error)
    assert hint is not None and hint.retry_delay.seconds >= 1
    assert_no_internal_text(error.details() or "")
    assert elapsed < WORST_CASE_S + MARGIN_S, elapsed


async def assert_rest_outage(outage: Outage, secret: str) -> None:
    started = time.monotonic()
    response = await rest_chat(outage, secret)
    elapsed = time.monotonic() - started
    assert response.status_code == 503, response.text
    error = response.json()["error"]
    assert error["code"] == "STORAGE_UNAVAILABLE"
    assert error["type"] == "service_unavailable_error"
    assert int(response.headers["retry-after"]) >= 1
    assert_no_internal_text(response.text)
    assert elapsed < WORST_CASE_S + MARGIN_S, elapsed


def assert_no_internal_text(text: str) -> None:
    for fragment in (*INTERNAL_TEXT, DB_PASSWORD):
        assert fragment not in text, text


async def assert_serving(outage: Outage, secret: str) -> None:
    models = await grpc_list_models(outage, secret)
    assert models.data
    response = await rest_chat(outage, secret)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "echo: hi"


async def test_stopped_database_is_503_with_a_retry_hint_and_recovers(
    outage: Outage, caplog: pytest.LogCaptureFixture
) -> None:
    secret = await outage.new_key()
    await assert_serving(outage, secret)  # pooled connections exist, as in production
    fresh = await outage.new_key()
    await outage.proxy.stop_server()
    with caplog.at_level(logging.WARNING, logger="server.storage.database"):
        await assert_grpc_outage(outage, fresh)
        await assert_rest_outage(outage, fresh)
        async with httpx.AsyncClient(base_url=outage.bridge.rest_url, timeout=30) as client:
            admin = await client.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 503, admin.text
        assert admin.json()["error"]["code"] == "STORAGE_UNAVAILABLE"
        assert_no_internal_text(admin.text)
    logged = caplog.text
    assert "is unreachable" in logged or "is unavailable" in logged, logged
    assert DB_PASSWORD not in logged and "***" in logged
    await outage.proxy.resume()
    await assert_serving(outage, fresh)  # the same gateway, no restart


async def test_frozen_database_is_503_within_the_timeouts_and_recovers(outage: Outage) -> None:
    secret = await outage.new_key()
    await assert_serving(outage, secret)
    fresh = await outage.new_key()
    outage.proxy.freeze()
    await assert_grpc_outage(outage, fresh)
    await assert_rest_outage(outage, fresh)
    await outage.proxy.resume()
    await assert_serving(outage, fresh)


async def test_a_cached_key_still_authenticates_during_an_outage(outage: Outage) -> None:
    secret = await outage.new_key()
    assert (await grpc_list_models(outage, secret)).data  # now cached
    await outage.proxy.stop_server()
    assert (await grpc_list_models(outage, secret)).data  # needs no database
    # A key it has not seen cannot be checked: not KEY_INVALID, but 503.
    await assert_grpc_outage(outage, "ahk_abcdefgh_" + "x" * 43)


@pytest_asyncio.fixture
async def proxied_database() -> AsyncIterator[tuple[FaultProxy, Database, Database]]:
    """A fresh database reached through a fault proxy, and directly (another replica)."""
    name = f"aigne_test_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    await admin.execute(f'CREATE DATABASE "{name}"')
    target = make_url(POSTGRES_URL)
    proxy = FaultProxy(target.host or "127.0.0.1", target.port or 5432)
    await proxy.start()
    try:
        direct = await Database.open(target.set(database=name), migrate=True)
        proxied = await Database.open(
            target.set(database=name, port=proxy.port),
            connect_timeout_s=CONNECT_TIMEOUT_S,
            statement_timeout_s=STATEMENT_TIMEOUT_S,
        )
        yield proxy, proxied, direct
        await proxy.resume()
        await proxied.close()
        await direct.close()
    finally:
        await proxy.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_key_outlives_its_ttl_only_for_the_outage_grace(
    proxied_database: tuple[FaultProxy, Database, Database],
) -> None:
    proxy, proxied, direct = proxied_database
    now = [1000.0]
    keys = KeyStore(proxied, cache_ttl_s=5, outage_grace_s=60, clock=lambda: now[0])
    elsewhere = KeyStore(direct)  # another replica
    owner = await ensure_owner(direct, "user", "grace")
    kept, kept_secret = await elsewhere.create_key(owner.id, "kept")
    revoked, revoked_secret = await elsewhere.create_key(owner.id, "revoked")
    assert (await keys.authenticate(kept_secret)).id == kept.id
    assert (await keys.authenticate(revoked_secret)).id == revoked.id
    await elsewhere.revoke_key(revoked.id)
    await proxy.stop_server()

    now[0] += 10  # past the TTL, within the grace: both still answer from the cache
    assert (await keys.authenticate(kept_secret)).id == kept.id
    assert (await keys.authenticate(revoked_secret)).id == revoked.id  # the documented lag

    now[0] += 60  # past TTL + grace: no longer
    with pytest.raises(StorageUnavailable):
        await keys.authenticate(kept_secret)

    await proxy.resume()  # the database is back: the revocation is seen
    with pytest.raises(KeyRevoked):
        await keys.authenticate(revoked_secret)
    assert (await keys.authenticate(kept_secret)).id == kept.id


async def test_migrations_are_not_cut_by_the_statement_timeout() -> None:
    """A replica waiting for another's migration lock (or building an index on a large
    table) must not fail because of the request path's statement timeout."""
    name = f"aigne_test_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    await admin.execute(f'CREATE DATABASE "{name}"')
    url = make_url(POSTGRES_URL).set(database=name)
    other = await asyncpg.connect(url.render_as_string(hide_password=False))
    try:
        await other.execute("SELECT pg_advisory_lock($1)", _PG_LOCK_KEY)  # "another replica migrating"
        opening = asyncio.create_task(Database.open(url, migrate=True, statement_timeout_s=0.2))
        while not await other.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"):
            assert not opening.done(), opening.exception()
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # well past the statement timeout while it waits
        await other.execute("SELECT pg_advisory_unlock($1)", _PG_LOCK_KEY)
        database = await asyncio.wait_for(opening, 30)
        async with database.read() as conn:
            assert await conn.scalar(text("SELECT count(*) FROM api_keys")) == 0
        await database.close()
    finally:
        await other.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_locked_sqlite_database_is_unavailable_after_the_busy_timeout(tmp_path: Path) -> None:
    path = tmp_path / "hub.db"
    database = await Database.open(f"sqlite:///{path}", sqlite_busy_timeout_ms=300)
    try:
        with another_process_writing(path) as other_process:
            await _refused_while_locked(database)
            other_process.execute("ROLLBACK")
        await _write_async(database)  # and it works again
        await _write_alone_in_thread(database)  # on a new connection: the failed one was dropped
    finally:
        await database.close()


async def _refused_while_locked(database: Database) -> None:
    for attempt in (_write_async, _write_in_thread, _write_alone_in_thread, _write_grouped):
        started = time.monotonic()
        with pytest.raises(StorageUnavailable) as caught:
            await attempt(database)
        assert 0.25 < time.monotonic() - started < 0.3 + MARGIN_S
        assert "locked" not in caught.value.message  # the driver's text stays in the log


async def test_waiting_for_this_process_sqlite_writer_is_bounded_too(tmp_path: Path) -> None:
    database = await Database.open(f"sqlite:///{tmp_path / 'hub.db'}", sqlite_busy_timeout_ms=300)
    try:
        holding = asyncio.Event()
        release = asyncio.Event()

        async def long_writer() -> None:
            async with database.write():
                holding.set()
                await release.wait()

        writer = asyncio.create_task(long_writer())
        await holding.wait()
        with pytest.raises(StorageUnavailable):
            await asyncio.wait_for(_write_in_thread(database), 10)  # fails, not hangs, if unbounded
        release.set()
        await writer
        await _write_in_thread(database)
    finally:
        await database.close()


def _new_owner() -> Insert:
    name = secrets.token_hex(4)
    return owners.insert().values(id=f"user:{name}", kind="user", name=name, created_at=utcnow())


async def _write_async(database: Database) -> None:
    async with database.write() as conn:
        await conn.execute(_new_owner())


async def _write_in_thread(database: Database) -> None:
    await database.write_in_thread(lambda conn: conn.execute(_new_owner()))


async def _write_grouped(database: Database) -> None:
    async def work(conn: Executor) -> None:
        await conn.execute(_new_owner())

    await database.write_grouped(work)


async def _write_alone_in_thread(database: Database) -> None:
    name = secrets.token_hex(4)
    await database.write_alone_in_thread(
        lambda cursor: cursor.execute(
            "INSERT INTO owners (id, kind, name, created_at) VALUES (?, 'user', ?, '2026-01-01 00:00:00.000000')",
            (f"user:{name}", name),
        )
    )


async def test_during_a_freeze_only_one_lookup_per_interval_waits_for_the_database(
    proxied_database: tuple[FaultProxy, Database, Database],
) -> None:
    proxy, proxied, direct = proxied_database
    now = [1000.0]
    keys = KeyStore(proxied, cache_ttl_s=5, outage_grace_s=60, outage_probe_interval_s=1, clock=lambda: now[0])
    owner = await ensure_owner(direct, "user", "probe")
    secrets_ = [(await KeyStore(direct).create_key(owner.id, f"k{i}"))[1] for i in range(3)]
    for secret in secrets_:
        await keys.authenticate(secret)
    proxy.freeze()
    now[0] += 10  # every entry is past its TTL

    started = time.monotonic()
    await keys.authenticate(secrets_[0])  # tries the database, gives up, answers from the cache
    assert STATEMENT_TIMEOUT_S <= time.monotonic() - started < WORST_CASE_S + MARGIN_S

    started = time.monotonic()
    for secret in secrets_[1:]:
        await keys.authenticate(secret)  # the database failed a moment ago: no waiting
    assert time.monotonic() - started < 0.5

    now[0] += 1.5  # the next interval: one lookup tries again
    started = time.monotonic()
    await keys.authenticate(secrets_[1])
    assert time.monotonic() - started >= min(CONNECT_TIMEOUT_S, STATEMENT_TIMEOUT_S)


async def test_stored_credentials_keep_serving_from_the_cache_during_an_outage(
    proxied_database: tuple[FaultProxy, Database, Database],
) -> None:
    """Each stored credential is a deployment (server.api.credential_deployments): a
    database outage must not take the provider's credentials away from calls."""
    proxy, proxied, direct = proxied_database
    master = os.urandom(32)
    stored = await CredentialVault(direct, master).add("openai", "sk-stored-" + secrets.token_hex(12))
    vault = CredentialVault(proxied, master, cache_ttl_s=0.05)
    assert [c.id for c in await vault.active("openai")] == [stored.id]
    await proxy.stop_server()
    await asyncio.sleep(0.1)  # past the cache's TTL: the next read tries the database
    assert [c.id for c in await vault.active("openai")] == [stored.id]
    with pytest.raises(StorageUnavailable):
        await vault.active("anthropic")  # never read: nothing to fall back on
    await proxy.resume()
    later = await CredentialVault(direct, master).add("openai", "sk-later-" + secrets.token_hex(12))
    await asyncio.sleep(0.1)
    assert [c.id for c in await vault.active("openai")] == [stored.id, later.id], "read again once back"
