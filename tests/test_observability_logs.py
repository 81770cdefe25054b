"""Logs through the real server and Envoy: one JSON line per call whose request id is
Envoy's `x-request-id` (also in the ledger record, the upstream request and Envoy's
JSON access log), and no secret in any log line (DEBUG included), metric or Envoy log."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import CooldownConfig, GatewayConfig, ProviderConfig, RoutingConfig, Settings
from server.observability.logs import CALLS_LOGGER, JsonFormatter, TurnBatchedHandler, ledger_request_id
from tests.conftest import Bridge, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors, chat_request

PROVIDER_KEY = "sk-provider-" + secrets.token_hex(16)
OTHER_PROVIDER_KEY = "sk-rejected-" + secrets.token_hex(16)
ADMIN_TOKEN = "admin-" + secrets.token_hex(16)
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()


class Lines(logging.Handler):
    """Every log record as the JSON formatter writes it."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.setFormatter(JsonFormatter())
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))

    def calls(self) -> list[dict[str, Any]]:
        parsed = [json.loads(line) for line in self.lines]
        return [line for line in parsed if line["logger"] == CALLS_LOGGER]


@pytest.fixture(scope="module")
def lines() -> Iterator[Lines]:
    handler = Lines()
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    yield handler
    root.removeHandler(handler)
    root.setLevel(level)


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=PROVIDER_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture(scope="module")
async def stack(
    upstream: FakeOpenAI, lines: Lines, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Bridge, str]]:
    settings = Settings(
        grpc_port=0,
        data_dir=tmp_path_factory.mktemp("logs-data"),
        admin_token=ADMIN_TOKEN,
        master_key=MASTER_KEY,
    )
    config = GatewayConfig(
        routing=RoutingConfig(max_attempts=1, cooldown=CooldownConfig(enabled=False)),
        providers={
            "openai": ProviderConfig(base_url=upstream.base_url, api_key=PROVIDER_KEY),
            "rejected": ProviderConfig(type="openai", base_url=upstream.base_url, api_key=OTHER_PROVIDER_KEY),
        },
    )
    gateway = await start_gateway(settings, config)
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("logs-envoy"))
    owner = await ensure_owner(gateway.accounts.db, "user", "logged")
    _, api_key = await gateway.accounts.keys.create_key(owner.id, "logs")
    yield gateway, bridge, api_key
    await bridge.envoy.stop()
    await gateway.stop(0.5)


async def test_one_json_line_per_call_with_envoys_request_id(
    stack: tuple[Gateway, Bridge, str], lines: Lines, upstream: FakeOpenAI
) -> None:
    gateway, bridge, api_key = stack
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}
    async with httpx.AsyncClient(trust_env=False, headers={"authorization": f"Bearer {api_key}"}) as client:
        answer = await client.post(f"{bridge.rest_url}/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text
    request_id = answer.headers["x-request-id"]
    assert upstream.last_request.headers.get("x-request-id") == request_id

    mine = [c for c in lines.calls() if c["request_id"].startswith(request_id + ":")]
    assert len(mine) == 1, lines.calls()
    line = mine[0]
    assert line["outcome"] == "ok" and line["model"] == "openai/gpt-4o-mini"
    assert line["deployment"] == "openai/gpt-4o-mini" and line["attempts"] == 1
    assert line["key_id"] and line["owner_id"] and line["input_tokens"] > 0 and line["output_tokens"] > 0
    assert line["latency_ms"] >= 0 and line["level"] == "INFO"
    record = await gateway.accounts.ledger.get(line["request_id"])
    assert record is not None and record.output_tokens == line["output_tokens"]

    access = await _envoy_line(bridge, request_id)
    assert access["status"] == 200 and access["path"] == "/v1/chat/completions"


async def test_a_request_id_sent_twice_still_leaves_two_records(
    stack: tuple[Gateway, Bridge, str], lines: Lines
) -> None:
    gateway, _, api_key = stack
    mine = "client-chosen-id-" + secrets.token_hex(4)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(api_key)
    ) as channel:
        chat = chat_grpc.ChatServiceStub(channel)
        for _ in range(2):
            await chat.CreateChatCompletion(chat_request(), metadata=(("x-request-id", mine),))
    ids = [c["request_id"] for c in lines.calls() if c["request_id"].startswith(mine + ":")]
    assert len(set(ids)) == 2
    for ledger_id in ids:
        assert await gateway.accounts.ledger.get(ledger_id) is not None


async def test_no_secret_in_logs_metrics_or_envoys_log(stack: tuple[Gateway, Bridge, str], lines: Lines) -> None:
    gateway, bridge, api_key = stack
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(trust_env=False, base_url=bridge.rest_url, timeout=20) as client:
        auth = {"authorization": f"Bearer {api_key}"}
        assert (await client.post("/v1/chat/completions", json=body, headers=auth)).status_code == 200
        streamed = await client.post("/v1/chat/completions", json={**body, "stream": True}, headers=auth)
        assert streamed.status_code == 200
        rejected = await client.post("/v1/chat/completions", json={**body, "model": "rejected/gpt-4o"}, headers=auth)
        assert rejected.status_code >= 400  # the upstream refuses that provider's key (and echoes part of it)
        wrong = await client.post("/v1/chat/completions", json=body, headers={"authorization": f"Bearer {api_key}x"})
        assert wrong.status_code == 401
        admin = await client.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert admin.status_code == 200
        added = await client.post(
            "/admin/credentials",
            json={"provider": "openai", "name": "logged", "secret": PROVIDER_KEY},
            headers={"authorization": f"Bearer {ADMIN_TOKEN}"},
        )
        assert added.status_code < 500, added.text
        assert gateway.metrics is not None
        metrics = (await client.get(f"http://127.0.0.1:{gateway.metrics.port}/metrics")).text
    await _envoy_line(bridge, streamed.headers["x-request-id"])
    envoy_log = bridge.envoy.log_path.read_text(errors="replace")
    assert any(line.startswith("{") for line in lines.lines) and len(lines.calls()) >= 3
    texts = {"log lines": "\n".join(lines.lines), "metrics": metrics, "envoy log": envoy_log}
    for secret in (api_key, PROVIDER_KEY, OTHER_PROVIDER_KEY, ADMIN_TOKEN, MASTER_KEY):
        for where, text in texts.items():
            assert secret not in text, f"a secret ({secret[:6]}...) in the {where}"
            assert secret[-16:] not in text, f"the end of a secret ({secret[:6]}...) in the {where}"


async def _envoy_line(bridge: Bridge, request_id: str) -> dict[str, Any]:
    """Envoy's access log line of that request (Envoy flushes its log within a second)."""
    for _ in range(100):
        for text in bridge.envoy.log_path.read_text(errors="replace").splitlines():
            if text.startswith("{") and request_id in text:
                line: dict[str, Any] = json.loads(text)
                if line.get("request_id") == request_id:
                    return line
        await asyncio.sleep(0.1)
    raise AssertionError(f"no access log line for {request_id}: {bridge.envoy.log_tail()}")


class _Writes:
    """A stream that keeps each write: how many syscalls a real stderr would make."""

    def __init__(self) -> None:
        self.writes: list[str] = []

    def write(self, text: str) -> None:
        self.writes.append(text)

    def flush(self) -> None:
        return None


def _batched_logger(stream: _Writes) -> logging.Logger:
    handler = TurnBatchedHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger(f"test.batched.{id(stream)}")
    logger.handlers[:] = [handler]
    logger.propagate = False
    logger.setLevel(logging.INFO)
    return logger


async def test_lines_of_one_loop_turn_are_written_together_in_order() -> None:
    stream = _Writes()
    logger = _batched_logger(stream)
    for n in range(5):
        logger.info("call %d", n)
    assert stream.writes == [], "written at the end of the turn, not line by line"
    await asyncio.sleep(0)
    assert stream.writes == ["call 0\ncall 1\ncall 2\ncall 3\ncall 4\n"]
    logger.info("next turn")
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["next turn\n"]


async def test_lines_outside_the_loop_thread_are_written_at_once_and_flush_writes_what_waits() -> None:
    stream = _Writes()
    logger = _batched_logger(stream)
    await asyncio.to_thread(logger.info, "from a thread")
    assert stream.writes == ["from a thread\n"]
    logger.info("waiting")
    logger.handlers[0].flush()  # logging.shutdown does this at exit
    assert stream.writes == ["from a thread\n", "waiting\n"]


def test_ledger_suffixes_are_unique_and_differ_in_a_forked_child() -> None:
    ids = [ledger_request_id("same") for _ in range(3 * 1024)]  # crosses the 1,024 batch
    assert len(set(ids)) == len(ids)
    assert all(i is not None and len(i.split(":")[1]) == 12 for i in ids)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.write(writer, (ledger_request_id("same") or "").encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(reader, 100).decode()
    os.close(reader)
    os.close(writer)
    assert child.startswith("same:") and child != ledger_request_id("same")
