"""Failure paths of the ledger: no answer without a record.

- A database outage (a real PostgreSQL behind a TCP proxy that the test closes) spools
  the records of answered calls; the replay puts each into the database exactly once.
- With the database and the spool failing, the call in flight fails, then new calls are
  refused with STORAGE_UNAVAILABLE before the upstream sees them, until a record can be
  kept again.
- Streams still open when the shutdown grace ends get an error event (REST) or
  UNAVAILABLE (gRPC) and are recorded as "interrupted".
- A cut stream is billed for its prompt (estimated) when no usage arrived.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from sqlalchemy.engine import make_url

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.credits import CreditService, Rate
from server.accounts.ledger import Ledger, UsageRecord
from server.accounts.owners import ensure_owner
from server.accounts.spool import Spool, SpoolReplayer, spool_files
from server.app import Gateway, start_gateway
from server.config import Settings
from server.storage import Database
from tests.conftest import gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import chat_request, error_info, retry_info
from tests.storage_fixtures import POSTGRES_URL, _admin_connection

LONG_TEXT = " ".join(f"word{i}" for i in range(60))


class TcpProxy:
    """A TCP relay on loopback in front of the real PostgreSQL. `close` refuses new
    connections and cuts the open ones, as a database outage does; `open` restores it."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.port = 0

    async def open(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.update((writer, upstream_writer))
        await asyncio.gather(self._pipe(reader, upstream_writer), self._pipe(upstream_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.transport.abort()


@dataclass
class ProxiedPostgres:
    proxy: TcpProxy
    url: str  # through the proxy
    direct_url: str  # straight to PostgreSQL, for the test's own checks

    async def count(self, sql: str = "SELECT count(*) FROM usage_records") -> int:
        conn = await asyncpg.connect(self.direct_url, timeout=5)
        try:
            return int(await conn.fetchval(sql))
        finally:
            await conn.close()

    async def rows(self, sql: str) -> list[asyncpg.Record]:
        conn = await asyncpg.connect(self.direct_url, timeout=5)
        try:
            return list(await conn.fetch(sql))
        finally:
            await conn.close()


@pytest_asyncio.fixture
async def proxied_postgres() -> AsyncIterator[ProxiedPostgres]:
    """A fresh PostgreSQL database reached through a proxy the test can close."""
    name = f"aigne_test_{secrets.token_hex(6)}"
    admin = await _admin_connection()
    server = make_url(POSTGRES_URL)
    proxy = TcpProxy(server.host or "127.0.0.1", server.port or 5432)
    await proxy.open()
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        direct = server.set(database=name).render_as_string(hide_password=False)
        proxied = server.set(database=name, host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        await (await Database.open(direct, migrate=True)).close()
        yield ProxiedPostgres(proxy, proxied, direct)
    finally:
        await proxy.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


@pytest_asyncio.fixture
async def slow_fake() -> AsyncIterator[FakeOpenAI]:
    """Its own fake, streaming one word every 0.2 s (60 words: 12 s)."""
    async with FakeOpenAI(api_key="sk-fake", chunk_delay=0.2) as fake:
        yield fake


async def wait_for(predicate: Callable[[], object], seconds: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + seconds
    while not await _truthy(predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _truthy(value: object) -> bool:
    if asyncio.iscoroutine(value):
        value = await value
    return bool(value)


def spooled_lines(directory: Path) -> list[dict[str, object]]:
    return [json.loads(line) for path in spool_files(directory) for line in path.read_text().splitlines() if line]


async def outage_gateway(fake: FakeOpenAI, tmp_path: Path, database_url: str, spool_dir: Path) -> Gateway:
    settings = Settings(
        grpc_port=0,
        auth_required=False,
        database_url=database_url,
        data_dir=tmp_path,
        spool_dir=spool_dir,
        spool_replay_interval_s=0.1,
        upstream_read_timeout_s=5.0,
    )
    return await start_gateway(settings, gateway_config(fake.base_url))


async def stream_text(chat: chat_grpc.ChatServiceStub, text: str) -> str:
    call = chat.StreamChatCompletion(chat_request(text=text))
    chunks = [chunk async for chunk in call]
    assert await call.code() == grpc.StatusCode.OK
    assert chunks[-1].choices[0].finish_reason == "stop"
    return "".join(c.choices[0].delta.content for c in chunks if c.choices)


# -- item 5: database outage -----------------------------------------------------------


async def test_outage_spools_answered_calls_and_replay_records_each_once(fake_openai, tmp_path, proxied_postgres):
    spool_dir = tmp_path / "spool"
    gateway = await outage_gateway(fake_openai, tmp_path, proxied_postgres.url, spool_dir)
    try:
        await proxied_postgres.proxy.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            chat = chat_grpc.ChatServiceStub(channel)
            for n in range(3):
                answer = await chat.CreateChatCompletion(chat_request(text=f"unary {n}"), timeout=20)
                assert answer.choices[0].message.content == f"echo: unary {n}"
                assert await stream_text(chat, f"stream {n}") == f"echo: stream {n}"

        spooled = spooled_lines(spool_dir)
        assert len(spooled) == 6, "each answered call left one spooled record"
        assert sorted(str(r["operation"]) for r in spooled) == ["chat"] * 3 + ["chat_stream"] * 3
        assert all(r["outcome"] == "ok" for r in spooled)
        assert await proxied_postgres.count() == 0, "nothing reached the database during the outage"

        await proxied_postgres.proxy.open()
        await wait_for(lambda: not spool_files(spool_dir), what="the spool to be replayed")
        rows = await proxied_postgres.rows("SELECT request_id, operation, outcome FROM usage_records")
        assert sorted(r["request_id"] for r in rows) == sorted(str(r["request_id"]) for r in spooled)
        assert gateway.accounts.ledger.writable
    finally:
        await gateway.stop(0.5)


async def test_replay_settles_a_spooled_records_reservation_once(tmp_path, proxied_postgres):
    db = await Database.open(proxied_postgres.url, migrate=True)
    spool = Spool(tmp_path / "spool")
    ledger = Ledger(db, spool=spool)
    credits = CreditService(db, billing_enabled=True)
    try:
        owner = await ensure_owner(db, "user", "spooled")
        await credits.grant(owner.id, 10_000_000)
        await credits.set_rate(Rate("openai/*", input_per_million_micros=1_000_000_000))
        reservation = await credits.reserve(owner.id, 3_000_000, request_id="spooled-1")

        await proxied_postgres.proxy.close()
        usage = UsageRecord(
            "spooled-1", "openai", "openai/gpt-4o-mini", owner_id=owner.id, cost_micros=1_000_000, credential_id="cred1"
        )
        recorded = await ledger.record(usage, reservation=reservation)
        assert recorded.spooled
        # The same file replayed twice (a replayer that died before removing it).
        (copy,) = spool_files(spool.directory)
        duplicate = copy.with_name("ledger-0-copy.jsonl")
        duplicate.write_bytes(copy.read_bytes())

        await proxied_postgres.proxy.open()
        replayer = SpoolReplayer(ledger, spool)
        # A file another process holds (its writer, or another replica replaying it) is left alone.
        with duplicate.open("rb") as held:
            fcntl.flock(held.fileno(), fcntl.LOCK_EX)
            await wait_for(replayer.replay_once, what="a replay once the database is back")
            assert spool_files(spool.directory) == [duplicate]
        assert await replayer.replay_once() == 1, "the duplicate is read, and recorded nothing new"
        assert not spool_files(spool.directory)
        balance = await credits.balance(owner.id)
        assert (balance.balance_micros, balance.reserved_micros) == (9_000_000, 0), "charged once, hold released"
        stored = await ledger.get("spooled-1")
        assert stored is not None and stored.credits_micros == 1_000_000
        assert stored.credential_id == "cred1", "the serving credential survives the spool"
        assert await proxied_postgres.count() == 1
    finally:
        await ledger.close()
        await db.close()


async def test_with_database_and_spool_failing_calls_are_refused_before_the_provider(
    slow_fake, tmp_path, proxied_postgres
):
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("the spool cannot be created below a file")
    spool_dir = blocker / "spool"
    gateway = await outage_gateway(slow_fake, tmp_path, proxied_postgres.url, spool_dir)
    try:
        await proxied_postgres.proxy.close()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            chat = chat_grpc.ChatServiceStub(channel)
            # A stream under way (its meter has started) when records start failing.
            under_way = chat.StreamChatCompletion(chat_request(model="openai/stream-slow", text="one two three four"))
            assert (await under_way.read()).choices

            # The call whose record fails: its answer is withheld.
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await chat.CreateChatCompletion(chat_request(text="lost"), timeout=20)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "STORAGE_UNAVAILABLE"
            assert not gateway.accounts.ledger.writable

            # The remaining window: the stream's content is out, then its error.
            text = ""
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                while (chunk := await under_way.read()) is not grpc.aio.EOF:
                    text += "".join(c.delta.content for c in chunk.choices)
            assert text == "echo: one two three four"
            assert error_info(caught.value).reason == "STORAGE_UNAVAILABLE"

            seen = len(slow_fake.requests)
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await chat.CreateChatCompletion(chat_request(text="refused"), timeout=20)
            assert error_info(caught.value).reason == "STORAGE_UNAVAILABLE"
            assert "retry" in (caught.value.details() or "")
            hint = retry_info(caught.value)
            assert hint is not None and hint.retry_delay.seconds > 0
            stream = chat.StreamChatCompletion(chat_request(text="refused too"))
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                async for _ in stream:
                    pass
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert error_info(caught.value).reason == "STORAGE_UNAVAILABLE"
            assert len(slow_fake.requests) == seen, "refused before any provider was called"

            blocker.unlink()  # the spool can keep records again: the replay task notices
            await wait_for(lambda: gateway.accounts.ledger.writable, what="the ledger to be writable again")
            answer = await chat.CreateChatCompletion(chat_request(text="kept"), timeout=20)
            assert answer.choices[0].message.content == "echo: kept"
        assert [r["outcome"] for r in spooled_lines(spool_dir)] == ["ok"]
    finally:
        await gateway.stop(0.5)


# -- item 6: shutdown grace expiry -------------------------------------------------------


async def read_records(database_url: str) -> list[UsageRecord]:
    db = await Database.open(database_url)
    try:
        return list(await Ledger(db).records())
    finally:
        await db.close()


async def test_grace_expiry_ends_open_streams_with_an_error_and_records_them_interrupted(slow_fake, tmp_path):
    settings = Settings(grpc_port=0, auth_required=False, data_dir=tmp_path, upstream_read_timeout_s=20)
    gateway = await start_gateway(settings, gateway_config(slow_fake.base_url))
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    messages = [{"role": "user", "content": LONG_TEXT}]
    try:
        async with (
            grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel,
            openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=30) as oai,
        ):
            grpc_stream = chat_grpc.ChatServiceStub(channel).StreamChatCompletion(
                chat_request(model="openai/stream-slow", text=LONG_TEXT)
            )
            assert (await grpc_stream.read()).choices
            rest_stream = await oai.chat.completions.create(model="openai/stream-slow", messages=messages, stream=True)
            rest_chunks = [await anext(aiter(rest_stream))]

            started = time.monotonic()
            stopping = asyncio.create_task(gateway.stop(2.0))
            with pytest.raises(openai.APIError) as rest_error:
                async for chunk in rest_stream:
                    rest_chunks.append(chunk)
            with pytest.raises(grpc.aio.AioRpcError) as grpc_error:
                while await grpc_stream.read() is not grpc.aio.EOF:
                    pass
            await stopping
            elapsed = time.monotonic() - started
    finally:
        await bridge.envoy.stop()

    assert rest_error.value.code == "SHUTTING_DOWN"
    assert len(rest_chunks) < 30, "the stream was cut, not completed"
    assert grpc_error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(grpc_error.value).reason == "SHUTTING_DOWN"
    assert elapsed < 6, f"shutdown took {elapsed:.1f} s for a 2 s grace"
    records = await read_records(settings.resolved_database_url())
    assert [(r.operation, r.outcome, r.error_reason) for r in records] == [
        ("chat_stream", "interrupted", "SHUTTING_DOWN")
    ] * 2
    assert all(r.input_tokens > 0 and r.output_tokens > 0 for r in records), "cut streams pay for what they used"


# -- item 10: a cut stream's prompt ----------------------------------------------------------


@pytest.mark.parametrize(("model", "outcome"), [("stream-slow", "cancelled"), ("stream-cut", "error")])
async def test_cut_stream_records_its_prompt_tokens(slow_fake, tmp_path, model, outcome):
    settings = Settings(grpc_port=0, auth_required=False, data_dir=tmp_path, upstream_read_timeout_s=20)
    gateway = await start_gateway(settings, gateway_config(slow_fake.base_url))
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            call = chat_grpc.ChatServiceStub(channel).StreamChatCompletion(
                chat_request(model=f"openai/{model}", text=LONG_TEXT)
            )
            for _ in range(2):  # the role, then a word
                assert (await call.read()).choices
            if model == "stream-cut":  # the upstream drops the connection
                with pytest.raises(grpc.aio.AioRpcError):
                    await call.read()
            else:  # the client goes away
                call.cancel()
            await wait_for(gateway.accounts.ledger.records, what="the cut stream's record")
            (record,) = await gateway.accounts.ledger.records()
    finally:
        await gateway.stop(0.5)
    assert record.outcome == outcome
    # About 4 characters a token: the role and the text of the one message.
    assert record.input_tokens == -(-(len("user") + len(LONG_TEXT)) // 4)
    assert record.output_tokens > 0


async def test_sse_client_sees_the_shutdown_error_event_and_no_done(slow_fake, tmp_path):
    settings = Settings(grpc_port=0, auth_required=False, data_dir=tmp_path, upstream_read_timeout_s=20)
    gateway = await start_gateway(settings, gateway_config(slow_fake.base_url))
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    body = {"model": "openai/stream-slow", "stream": True, "messages": [{"role": "user", "content": LONG_TEXT}]}
    events: list[str] = []
    try:
        async with (
            httpx.AsyncClient(timeout=30) as client,
            client.stream("POST", f"{bridge.rest_url}/v1/chat/completions", json=body) as response,
        ):
            assert response.status_code == 200
            stopping: asyncio.Task[None] | None = None
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events.append(line.removeprefix("data: "))
                    if stopping is None:
                        stopping = asyncio.create_task(gateway.stop(1.0))
            assert stopping is not None
            await stopping
    finally:
        await bridge.envoy.stop()
    assert "[DONE]" not in events
    last = json.loads(events[-1])
    assert last["error"]["code"] == "SHUTTING_DOWN"
