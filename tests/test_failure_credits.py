"""Credits on the failure paths (issue 7): reservations are leases, so a killed server's
holds come back and a live call's hold never lapses; a refusal for credits or a cap
leaves exactly one ledger record; a key's cap holds under 100 concurrent calls through
the server; what is reserved can be listed (admin API, CLI) and released (CLI).

Library tests run on SQLite and PostgreSQL (tests/storage_fixtures.py); a database
failure is made for real by renaming a table away and back.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from sqlalchemy import text

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from aigne.hub.v1 import admin_service_pb2_grpc as admin_grpc
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.credits import CreditService, Rate, credits_to_micros
from server.accounts.keys import KeyStore
from server.accounts.ledger import Ledger, UsageRecord
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import Settings
from server.storage import Database
from server.storage.schema import utcnow
from tests.conftest import FAKE_KEY, free_port, gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors, chat_request, error_info
from tests.storage_fixtures import database_url, db  # noqa: F401 - the fixtures

CREDIT = 1_000_000
AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"
ADMIN_TOKEN = "admin-" + "r" * 32
# 1000 credits per million tokens: a chat call with max_tokens=100 reserves ~0.1 credit.
RATE = Rate(
    "openai/*", input_per_million_micros=credits_to_micros(1000), output_per_million_micros=credits_to_micros(1000)
)
# What such a call reserves at least: its 100 output tokens.
CALL_WORST_CASE = 100 * 1000


async def eventually(check: Callable[[], Awaitable[Any]], seconds: float, what: str) -> Any:
    """Polls `check` until it returns something true; fails after `seconds`."""
    deadline = time.monotonic() + seconds
    while not (result := await check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {seconds} s")
        await asyncio.sleep(0.05)
    return result


async def rename_table(database: Database, old: str, new: str) -> None:
    """A real database failure for whatever uses the table meanwhile."""
    async with database.write() as conn:
        await conn.execute(text(f"ALTER TABLE {old} RENAME TO {new}"))
    # asyncpg's statement cache would fail once more on a changed table: start afresh.
    await database.engine.dispose()


async def key_counters(database: Database, key_id: str) -> tuple[int, int, int]:
    """(spent, reserved, cap) of a key, as stored."""
    async with database.read() as conn:
        row = (
            await conn.execute(
                text("SELECT spent_micros, reserved_micros, spend_cap_micros FROM api_keys WHERE id = :k"),
                {"k": key_id},
            )
        ).one()
    return int(row[0]), int(row[1]), int(row[2])


# -- the library: leases, renewal, the sweeper ---------------------------------------------


async def test_renewal_keeps_held_reservations_and_the_sweeper_releases_the_rest(db: Database) -> None:  # noqa: F811
    owner = (await ensure_owner(db, "user", "lessee")).id
    key, _ = await KeyStore(db).create_key(owner, "k", spend_cap_micros=10 * CREDIT)
    short = CreditService(db, billing_enabled=True, reservation_lease_s=1)
    await short.grant(owner, 10 * CREDIT)
    kept = await short.reserve(owner, 2 * CREDIT, key_id=key.id)
    dropped = await short.reserve(owner, 3 * CREDIT, key_id=key.id)
    assert kept.id and dropped.id and short.held == {kept.id, dropped.id}
    short.forget(dropped.id)  # its call died
    # Another holder (a ledger spool, a second process) keeps `kept` alive, on a long lease.
    keeper = CreditService(db, billing_enabled=True, reservation_lease_s=3600)
    assert await keeper.renew_leases() == 0, "nothing held, nothing renewed"
    keeper.hold(kept.id)
    assert await keeper.renew_leases() == 1

    later = utcnow() + timedelta(seconds=60)
    assert await short.release_expired(now=later) == 1
    assert await short.release_expired(now=later) == 0, "released once"
    [left] = await short.list_reservations(owner)
    assert left.id == kept.id and left.expires_at is not None and left.expires_at > later + timedelta(minutes=50)
    balance = await short.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (10 * CREDIT, 2 * CREDIT)
    assert await key_counters(db, key.id) == (0, 2 * CREDIT, 10 * CREDIT)
    assert await short.settle(kept, CREDIT) == CREDIT and short.held == frozenset()


async def test_a_sweeper_never_releases_what_its_own_process_holds(db: Database) -> None:  # noqa: F811
    owner = (await ensure_owner(db, "user", "holder")).id
    credits = CreditService(db, billing_enabled=True, reservation_lease_s=1)
    await credits.grant(owner, CREDIT)
    mine = await credits.reserve(owner, CREDIT)
    later = utcnow() + timedelta(seconds=60)  # the lease lapsed (say, the database was out of reach)
    assert await credits.release_expired(now=later) == 0
    assert await CreditService(db).release_expired(now=later) == 1, "another replica's sweeper releases it"
    assert await credits.settle(mine, CREDIT) == 0, "then nothing is charged"
    assert (await credits.balance(owner)).balance_micros == CREDIT


async def test_the_ledger_ends_the_lease_of_a_record_written_or_failed(db: Database) -> None:  # noqa: F811
    owner = (await ensure_owner(db, "user", "recorder")).id
    credits = CreditService(db, billing_enabled=True)
    ledger = Ledger(db, credits=credits)
    await credits.grant(owner, CREDIT)
    settled = await credits.reserve(owner, CREDIT // 4)
    await ledger.record(UsageRecord("req-ok", "openai", "openai/m", cost_micros=1000), reservation=settled)
    assert credits.held == frozenset()

    lost = await credits.reserve(owner, CREDIT // 4)
    await rename_table(db, "usage_records", "usage_records_away")
    try:
        with pytest.raises(Exception, match=r"usage_records|unavailable"):
            await ledger.record(UsageRecord("req-lost", "openai", "openai/m", cost_micros=1000), reservation=lost)
    finally:
        await rename_table(db, "usage_records_away", "usage_records")
    assert credits.held == frozenset(), "an unwritten record's hold is left to lapse, not renewed forever"
    assert [r.id for r in await credits.list_reservations(owner)] == [lost.id]
    assert await credits.release_expired(now=utcnow() + timedelta(seconds=121)) == 1
    assert (await credits.balance(owner)).reserved_micros == 0


async def test_lease_loops_outlive_a_failing_database(db: Database, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.WARNING, "server.accounts.credits")
    owner = (await ensure_owner(db, "user", "outage")).id
    lease = 3.0
    credits = CreditService(db, billing_enabled=True, reservation_lease_s=lease)
    await credits.grant(owner, 10 * CREDIT)
    orphan = await credits.reserve(owner, 2 * CREDIT)
    assert orphan.id
    credits.forget(orphan.id)  # its process "died"
    await rename_table(db, "reservations", "reservations_away")
    credits.start_lease_keeping()
    try:

        async def both_failed() -> bool:
            return all(
                any(what in r.getMessage() and "failed" in r.getMessage() for r in caplog.records)
                for what in ("renewing credit reservation leases", "releasing expired credit reservations")
            )

        credits.hold("no-such-reservation")  # something to renew while the table is away
        await eventually(both_failed, 10, "both loops logged the failure")
        credits.forget("no-such-reservation")
        await rename_table(db, "reservations_away", "reservations")
        started = utcnow()
        live = await credits.reserve(owner, CREDIT)

        async def orphan_released_live_renewed() -> bool:
            held = {r.id: r.expires_at for r in await credits.list_reservations(owner)}
            expiry = held.get(live.id)
            return orphan.id not in held and expiry is not None and expiry > started + timedelta(seconds=lease + 1)

        await eventually(orphan_released_live_renewed, 20, "the orphan released and the live hold renewed")
    finally:
        await credits.stop_lease_keeping()
    balance = await credits.balance(owner)
    assert balance.reserved_micros == CREDIT


# -- through the server --------------------------------------------------------------------


@pytest.fixture(scope="module")
async def slow_upstream() -> AsyncIterator[FakeOpenAI]:
    """An upstream whose model "slow" keeps calls in flight (each test sets how long)."""
    async with FakeOpenAI(api_key=FAKE_KEY) as fake:
        yield fake


async def billing_gateway(url: str, upstream: FakeOpenAI, **settings: Any) -> Gateway:
    if url.startswith("postgresql"):
        await (await Database.open(url, migrate=True)).close()
    gateway = await start_gateway(
        Settings(grpc_port=0, database_url=url, billing_enabled=True, **settings), gateway_config(upstream.base_url)
    )
    await gateway.accounts.credits.set_rate(RATE)
    return gateway


async def test_a_keys_cap_holds_through_the_server_under_100_concurrent_calls(
    database_url: str,  # noqa: F811
    slow_upstream: FakeOpenAI,
) -> None:
    slow_upstream.slow_seconds = 2.0  # every call holds its reservation while the others reserve
    gateway = await billing_gateway(database_url, slow_upstream)
    try:
        owner = await ensure_owner(gateway.accounts.db, "project", "capped")
        await gateway.accounts.credits.grant(owner.id, 1000 * CREDIT)
        cap = 2 * CREDIT
        key, secret = await gateway.accounts.keys.create_key(owner.id, "capped", spend_cap_micros=cap)
        target = f"127.0.0.1:{gateway.port}"
        async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as channel:
            chat = chat_grpc.ChatServiceStub(channel)
            results = await asyncio.gather(
                *(
                    chat.CreateChatCompletion(chat_request("openai/slow", max_tokens=100), timeout=60)
                    for _ in range(100)
                ),
                return_exceptions=True,
            )
        served = [r for r in results if not isinstance(r, BaseException)]
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(served) + len(refused) == 100, [r for r in results if isinstance(r, Exception)][:3]
        assert served and refused, "the cap covers some of the calls, not all"
        assert {(e.code(), error_info(e).reason) for e in refused} == {
            (grpc.StatusCode.RESOURCE_EXHAUSTED, "SPENDING_CAP_REACHED")
        }
        spent, reserved, _ = await key_counters(gateway.accounts.db, key.id)
        assert 0 < spent <= cap and reserved == 0
        records = await gateway.accounts.ledger.records(key_id=key.id)
        assert len(records) == 100 and len({r.request_id for r in records}) == 100, "one record per call"
        outcomes = sorted((r.outcome, r.error_reason) for r in records)
        assert outcomes == sorted([("ok", None)] * len(served) + [("error", "SPENDING_CAP_REACHED")] * len(refused))
        assert sum(r.credits_micros for r in records) == spent
        balance = await gateway.accounts.credits.balance(owner.id)
        assert (balance.balance_micros, balance.reserved_micros) == (1000 * CREDIT - spent, 0)
    finally:
        await gateway.stop(0.5)


async def test_refusals_for_credits_are_recorded_once(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    gateway = await billing_gateway(f"sqlite:///{tmp_path / 'hub.db'}", fake_openai)
    try:
        owner = await ensure_owner(gateway.accounts.db, "user", "penniless")
        key, secret = await gateway.accounts.keys.create_key(owner.id, "no credits")
        target = f"127.0.0.1:{gateway.port}"
        async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as channel:
            chat = chat_grpc.ChatServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await chat.CreateChatCompletion(chat_request())
            stream = chat.StreamChatCompletion(chat_request())
            with pytest.raises(grpc.aio.AioRpcError) as streamed:
                await stream.read()
            with pytest.raises(grpc.aio.AioRpcError) as unpriced:  # "badkey/*" has no rate
                await chat.CreateChatCompletion(chat_request("badkey/gpt-4o"))
        assert error_info(unary.value).reason == error_info(streamed.value).reason == "INSUFFICIENT_CREDITS"
        assert error_info(unpriced.value).reason == "MODEL_NOT_ALLOWED"
        records = await gateway.accounts.ledger.records(key_id=key.id)
        assert sorted((r.operation, r.model, r.outcome, r.error_reason, r.credits_micros) for r in records) == [
            ("chat", "badkey/gpt-4o", "error", "MODEL_NOT_ALLOWED", 0),
            ("chat", "openai/gpt-4o-mini", "error", "INSUFFICIENT_CREDITS", 0),
            ("chat_stream", "openai/gpt-4o-mini", "error", "INSUFFICIENT_CREDITS", 0),
        ]
        assert await gateway.accounts.credits.list_reservations() == []
    finally:
        await gateway.stop(0.5)


async def test_a_call_longer_than_its_lease_keeps_its_hold_and_pays(
    database_url: str,  # noqa: F811
    slow_upstream: FakeOpenAI,
) -> None:
    slow_upstream.slow_seconds = 3.5  # over three leases, with the sweeper running every 1/3 s
    gateway = await billing_gateway(database_url, slow_upstream, reservation_lease_s=1)
    try:
        owner = await ensure_owner(gateway.accounts.db, "user", "patient")
        await gateway.accounts.credits.grant(owner.id, 10 * CREDIT)
        key, secret = await gateway.accounts.keys.create_key(owner.id, "slow")
        target = f"127.0.0.1:{gateway.port}"
        async with grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as channel:
            answer = await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(
                chat_request("openai/slow", max_tokens=100), timeout=30
            )
        [record] = await gateway.accounts.ledger.records(key_id=key.id)
        assert answer.usage.completion_tokens > 0 and record.outcome == "ok"
        assert record.credits_micros == record.cost_micros > 0, "the hold was still there to settle"
        balance = await gateway.accounts.credits.balance(owner.id)
        assert (balance.balance_micros, balance.reserved_micros) == (10 * CREDIT - record.credits_micros, 0)
    finally:
        await gateway.stop(0.5)


async def cli(env: dict[str, str], *args: str, ok: bool = True) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    if ok:
        assert process.returncode == 0, stderr.decode()
    return process.returncode, stdout.decode(), stderr.decode()


async def start_grpc_server(env: dict[str, str], port: int) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB),
        "grpc",
        f"--grpc-port={port}",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    while b"gRPC listening" not in (line := await asyncio.wait_for(process.stdout.readline(), 30)):
        assert line, "the server exited"
    return process


async def test_kill_9_with_calls_in_flight_then_restart_releases_their_holds(
    slow_upstream: FakeOpenAI, tmp_path: Path
) -> None:
    slow_upstream.slow_seconds = 120  # in flight until the server dies
    lease, in_flight, port = 2.0, 20, free_port()
    earlier = len(slow_upstream.requests)  # the fixture's upstream serves the whole module
    env = {
        **os.environ,
        "OPENAI_API_KEY": FAKE_KEY,
        "OPENAI_BASE_URL": slow_upstream.base_url,
        "AIGNE_HUB_DATA_DIR": str(tmp_path / "data"),
        "AIGNE_HUB_BILLING_ENABLED": "true",
        "AIGNE_HUB_RESERVATION_LEASE_S": str(lease),
        "AIGNE_HUB_SHUTDOWN_GRACE_S": "1",
    }
    env.pop("AIGNE_HUB_CONFIG", None)
    env.pop("AIGNE_HUB_DATABASE_URL", None)
    store = await Database.open(f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}")
    credits = CreditService(store, billing_enabled=True)
    owner = await ensure_owner(store, "user", "crash")
    key, secret = await KeyStore(store).create_key(owner.id, "k")
    await credits.grant(owner.id, 100 * CREDIT)
    await credits.set_rate(RATE)
    process = await start_grpc_server(env, port)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(secret)) as channel:
            chat = chat_grpc.ChatServiceStub(channel)
            calls = [
                asyncio.ensure_future(chat.CreateChatCompletion(chat_request("openai/slow", max_tokens=100)))
                for _ in range(in_flight)
            ]

            async def all_upstream() -> bool:
                return len(slow_upstream.requests) - earlier == in_flight

            await eventually(all_upstream, 30, "every call in flight reached the upstream")
            # Every call's worst case is held: each its own reservation, or draws from
            # the process's credit block (server.accounts.credit_blocks).
            holds = await credits.list_reservations("user:crash")
            assert sum(hold.amount_micros for hold in holds) >= in_flight * CALL_WORST_CASE
            # Long enough for the holds to lapse if nothing renewed them.
            await asyncio.sleep(lease * 1.5)
            renewed = await credits.list_reservations("user:crash")
            assert {hold.id for hold in renewed} == {hold.id for hold in holds}, "renewed while alive"
            process.kill()
            killed = time.monotonic()
            await process.wait()
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, grpc.aio.AioRpcError) for r in results)
        stuck = await credits.balance("user:crash")
        assert stuck.reserved_micros > 0, "the dead calls' holds are still there"

        process = await start_grpc_server(env, port)
        restarted = time.monotonic()

        async def released() -> bool:
            return (await credits.balance("user:crash")).reserved_micros == 0

        await eventually(released, 5 * lease + 10, "the dead calls' reservations released")
        now = time.monotonic()
        print(
            f"dead calls' holds released {now - killed:.1f} s after the kill, {now - restarted:.1f} s after the restart"
        )
        assert await credits.list_reservations() == []
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=bearer_interceptors(secret)) as channel:
            answer = await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(chat_request(max_tokens=100))
        assert answer.choices
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 20) == 0
        # Stopped, it gave back what it held for its next calls.
        after = await credits.balance("user:crash")
        [record] = await Ledger(store).records(key_id=key.id)
        assert record.outcome == "ok" and record.credits_micros > 0
        assert (after.balance_micros, after.reserved_micros) == (100 * CREDIT - record.credits_micros, 0)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        await store.close()


# -- the view: admin API and CLI -----------------------------------------------------------


async def test_list_reservations_over_grpc_and_rest(slow_upstream: FakeOpenAI, tmp_path: Path) -> None:
    slow_upstream.slow_seconds = 2.0
    gateway = await billing_gateway(f"sqlite:///{tmp_path / 'hub.db'}", slow_upstream, admin_token=ADMIN_TOKEN)
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        owner = await ensure_owner(gateway.accounts.db, "user", "viewer")
        other = await ensure_owner(gateway.accounts.db, "user", "bystander")
        await gateway.accounts.credits.grant(owner.id, 10 * CREDIT)
        await gateway.accounts.credits.grant(other.id, 10 * CREDIT)
        key, secret = await gateway.accounts.keys.create_key(owner.id, "viewed")
        elsewhere = await gateway.accounts.credits.reserve(other.id, CREDIT // 2, request_id="req-elsewhere")
        target = f"127.0.0.1:{gateway.port}"
        async with (
            grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as user_channel,
            grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(ADMIN_TOKEN)) as admin_channel,
            httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as rest,
        ):
            call = asyncio.ensure_future(
                chat_grpc.ChatServiceStub(user_channel).CreateChatCompletion(
                    chat_request("openai/slow", max_tokens=100), timeout=30
                )
            )

            async def listed_over_rest() -> list[dict[str, Any]]:
                answer = await rest.get("/admin/reservations", params={"owner": "user:viewer"})
                assert answer.status_code == 200, answer.text
                held: list[dict[str, Any]] = answer.json().get("reservations", [])
                return held

            [held] = await eventually(listed_over_rest, 10, "the call in flight is listed")
            over_grpc = await admin_grpc.AdminServiceStub(admin_channel).ListReservations(
                admin_pb.ListReservationsRequest()
            )
            await call
            after = await listed_over_rest()
            bad_owner = await rest.get("/admin/reservations", params={"owner": "viewer"})
        assert held["owner"] == "user:viewer" and held["key_id"] == key.id and held["request_id"]
        assert held["kind"] == "RESERVATION_KIND_CALL", "a balance of 10 is too small for a block"
        assert [r.kind for r in over_grpc.reservations] == [admin_pb.RESERVATION_KIND_CALL] * 2
        assert float(held["amount"]) > 0 and held["expire_time"] > held["create_time"]
        assert [(r.id, r.owner) for r in over_grpc.reservations] == [
            (elsewhere.id, "user:bystander"),
            (held["id"], "user:viewer"),
        ], "oldest first, every owner"
        assert over_grpc.reservations[0].amount == "0.500000"
        assert over_grpc.reservations[0].request_id == "req-elsewhere"
        assert after == [], "settled with its record"
        assert bad_owner.status_code == 400 and bad_owner.json()["error"]["param"] == "owner"
        assert "user:NAME" in bad_owner.json()["error"]["message"]
        [record] = await gateway.accounts.ledger.records(key_id=key.id)
        assert record.request_id == held["request_id"]
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


async def test_a_credit_block_is_listed_as_one(slow_upstream: FakeOpenAI, tmp_path: Path) -> None:
    # After a call, its process keeps the block it drew from (for the next calls) for a
    # few seconds: an idle owner then shows credits reserved, which the list must explain.
    slow_upstream.slow_seconds = 0.0
    gateway = await billing_gateway(f"sqlite:///{tmp_path / 'hub.db'}", slow_upstream, admin_token=ADMIN_TOKEN)
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        owner = await ensure_owner(gateway.accounts.db, "user", "blocky")
        await gateway.accounts.credits.grant(owner.id, 1_000_000 * CREDIT)
        key, secret = await gateway.accounts.keys.create_key(owner.id, "blocky")
        target = f"127.0.0.1:{gateway.port}"
        async with (
            grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(secret)) as user_channel,
            grpc.aio.insecure_channel(target, interceptors=bearer_interceptors(ADMIN_TOKEN)) as admin_channel,
            httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as rest,
        ):
            await chat_grpc.ChatServiceStub(user_channel).CreateChatCompletion(chat_request("openai/slow"), timeout=30)
            listed = await admin_grpc.AdminServiceStub(admin_channel).ListReservations(
                admin_pb.ListReservationsRequest()
            )
            over_rest = (await rest.get("/admin/reservations", params={"owner": "user:blocky"})).json()
        [block] = listed.reservations
        assert block.kind == admin_pb.RESERVATION_KIND_BLOCK and block.id.startswith("blk_")
        assert block.owner == "user:blocky" and block.key_id == key.id and block.request_id == ""
        assert float(block.amount) > 0, "what the next calls may draw"
        assert [(r["id"], r["kind"]) for r in over_rest["reservations"]] == [(block.id, "RESERVATION_KIND_BLOCK")]
        [record] = await gateway.accounts.ledger.records(key_id=key.id)
        assert record.credits_micros > 0, "the call was charged from the block"
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


async def test_cli_lists_and_releases_reservations(tmp_path: Path) -> None:
    env = {**os.environ, "AIGNE_HUB_DATA_DIR": str(tmp_path / "data")}
    env.pop("AIGNE_HUB_DATABASE_URL", None)
    store = await Database.open(f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}")
    try:
        for name in ("ann", "bob"):
            await CreditService(store).grant((await ensure_owner(store, "user", name)).id, 10 * CREDIT)
        # A lease that has already ended (its process is gone) and one that has not.
        lapsed = await CreditService(store, billing_enabled=True, reservation_lease_s=0.001).reserve(
            "user:ann", CREDIT, request_id="req-lapsed"
        )
        live = await CreditService(store, billing_enabled=True, reservation_lease_s=3600).reserve(
            "user:bob", 2 * CREDIT, request_id="req-live"
        )
    finally:
        await store.close()

    listed = json.loads((await cli(env, "credits", "reservations", "--json"))[1])
    assert [(r["id"], r["kind"], r["owner_id"], r["amount"], r["request_id"]) for r in listed] == [
        (lapsed.id, "call", "user:ann", "1.000000", "req-lapsed"),
        (live.id, "call", "user:bob", "2.000000", "req-live"),
    ]
    table = (await cli(env, "credits", "reservations", "--owner", "user:bob"))[1].splitlines()
    header = ["id", "kind", "owner_id", "key_id", "amount", "request_id", "created_at", "expires_at"]
    assert table[0].split() == header
    assert len(table) == 2 and live.id in table[1] and "2.000000" in table[1]
    code, _, stderr = await cli(env, "credits", "reservations", "--owner", "bob", ok=False)
    assert code != 0 and "user:NAME" in stderr

    released = json.loads((await cli(env, "credits", "release-expired", "--json"))[1])
    assert released == {"released": 1}
    store = await Database.open(f"sqlite:///{tmp_path / 'data' / 'aigne-hub.db'}")
    try:
        left = await CreditService(store).list_reservations()
        ann = await CreditService(store).balance("user:ann")
    finally:
        await store.close()
    assert [r.id for r in left] == [live.id]
    assert (ann.balance_micros, ann.reserved_micros) == (10 * CREDIT, 0)
