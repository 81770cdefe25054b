"""State a conversation needs on its next turn travels with the conversation: a next
turn served by another replica or by a restarted gateway works the same.

Anthropic: a thinking model's tool-calling turn must come back with its thinking block
and signature (the fake refuses the turn otherwise, as Anthropic does). Turn 1 goes
to one gateway, turn 2 to another on the same database (SQLite across a restart;
SQLite and PostgreSQL for two replicas running at once), and the fake must receive
the exact block it issued. The store itself is checked against both backends too.

Gemini: a thinking model's function call carries a thought signature that must come
back on the next turn (the fake refuses the turn otherwise, as Gemini 3 does). A real
signature is too long for a tool call id a client may send back (OpenAI allows 64
characters), so the gateway hands out a short id and keeps the full one: turn 2 on a
restarted gateway must still carry the signature.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
import pytest_asyncio
from google.protobuf import json_format

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from server.errors import StorageUnavailable
from server.providers.anthropic_turns import ThinkingTurns
from server.providers.conversation_state import state_key
from server.storage import Database
from server.storage.conversation import DatabaseConversationStore
from tests.conftest import SINGLE_ATTEMPT, start_bridge
from tests.fakes.anthropic_upstream import FakeAnthropic, signature_of
from tests.fakes.gemini_upstream import FakeGemini
from tests.storage_fixtures import database_url, db  # noqa: F401

KEY = "sk-ant-fake"
THOUGHT = "The user wants the weather; the tool knows it."
THINKING_BLOCK = {"type": "thinking", "thinking": THOUGHT, "signature": signature_of(THOUGHT)}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
QUESTION = [{"role": "user", "content": "weather in Paris?"}]
JSON = dict[str, Any]


@pytest_asyncio.fixture
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY) as server:
        yield server


async def _gateway(fake: FakeAnthropic | FakeGemini, data_dir: Path, url: str | None = None) -> Gateway:
    name = "gemini" if isinstance(fake, FakeGemini) else "anthropic"
    config = GatewayConfig(
        routing=SINGLE_ATTEMPT, providers={name: ProviderConfig(base_url=fake.base_url, api_key=KEY)}
    )
    settings = Settings(
        grpc_port=0,
        auth_required=False,
        upstream_read_timeout_s=5.0,
        shutdown_grace_s=0.5,
        data_dir=data_dir,
        database_url=url,
    )
    return await start_gateway(settings, config)


async def _complete(gateway: Gateway, messages: list[JSON], model: str = "anthropic/thinking") -> JSON:
    request = chat_pb.CreateChatCompletionRequest()
    json_format.ParseDict({"model": model, "messages": messages, "tools": [WEATHER_TOOL]}, request)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        answer = await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(request, timeout=20)
    return json_format.MessageToDict(answer, preserving_proto_field_name=True)


def _follow_up(message: JSON, result: str) -> list[JSON]:
    """The next turn's messages, as a client builds them from the answer it got."""
    echoed = {"role": "assistant", "content": message.get("content"), "tool_calls": message["tool_calls"]}
    return [*QUESTION, echoed, {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": result}]


def _sent_back(fake: FakeAnthropic) -> JSON:
    """The first block of the assistant turn in the fake's last request."""
    block: JSON = fake.requests[-1].json["messages"][1]["content"][0]
    return block


async def test_a_restarted_gateway_sends_the_thinking_back_through_the_openai_sdk(
    fake: FakeAnthropic, tmp_path: Path
) -> None:
    """Turn 1 streamed through one gateway and its bridge; the gateway restarts; turn 2
    through the restarted one. The client is the official openai SDK, echoing what it
    received."""
    first = await _gateway(fake, tmp_path / "data")
    bridge = await start_bridge(first.port, tmp_path / "envoy-1")
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=20)
    try:
        stream = await client.chat.completions.create(
            model="anthropic/thinking", messages=QUESTION, tools=[WEATHER_TOOL], stream=True
        )
        calls: dict[int, dict[str, str]] = {}
        async for chunk in stream:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                entry = calls.setdefault(call.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] = call.id or entry["id"]
                entry["name"] = (call.function and call.function.name) or entry["name"]
                entry["arguments"] += (call.function and call.function.arguments) or ""
    finally:
        await client.close()
        await bridge.envoy.stop()
        await first.stop(0.5)
    [call] = calls.values()
    tool_calls = [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": call["arguments"]}}
    ]

    second = await _gateway(fake, tmp_path / "data")
    bridge = await start_bridge(second.port, tmp_path / "envoy-2")
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=20)
    try:
        answer = await client.chat.completions.create(
            model="anthropic/thinking",
            messages=_follow_up({"content": "Let me check.", "tool_calls": tool_calls}, "sunny"),  # type: ignore[arg-type]
            tools=[WEATHER_TOOL],  # type: ignore[list-item]
        )
    finally:
        await client.close()
        await bridge.envoy.stop()
        await second.stop(0.5)
    assert answer.choices[0].message.content == "tool result: sunny"
    assert _sent_back(fake) == THINKING_BLOCK


async def test_another_replica_sends_the_thinking_back(
    fake: FakeAnthropic,
    database_url: str,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Two gateways on one database (SQLite file, PostgreSQL), both running: turn 1 on
    the first, turn 2 on the second."""
    migrated = await Database.open(database_url, migrate=True)
    await migrated.close()
    url = None if database_url.startswith("sqlite") else database_url
    replicas = [await _gateway(fake, tmp_path / "data", url) for _ in range(2)]
    if url is None:  # SQLite: both replicas open the file in the shared data dir
        assert all(g.accounts.db.backend == "sqlite" for g in replicas)
    try:
        first = await _complete(replicas[0], QUESTION)
        message = first["choices"][0]["message"]
        assert message["reasoning_content"] == THOUGHT
        second = await _complete(replicas[1], _follow_up(message, "cloudy"))
        assert second["choices"][0]["message"]["content"] == "tool result: cloudy"
        assert _sent_back(fake) == THINKING_BLOCK
    finally:
        await asyncio.gather(*(g.stop(0.5) for g in replicas))


async def test_an_edited_turn_is_sent_without_the_stored_thinking(db: Database) -> None:  # noqa: F811
    turns = ThinkingTurns(DatabaseConversationStore(db))
    await turns.remember(
        [
            {"type": "thinking", "thinking": "hmm", "signature": "sig"},
            {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
        ]
    )

    async def sent(arguments: str) -> list[str]:
        call = {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": arguments}}
        request = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [call]}]}
        recall = await turns.recall_for(request)
        blocks = recall.recall([{"type": "tool_use", "id": "toolu_1", "name": "f", "input": json.loads(arguments)}])
        return [b["type"] for b in blocks]

    assert await sent('{"a": 1}') == ["thinking", "tool_use"]
    assert await sent('{"a": 2}') == ["tool_use"]


async def test_stored_state_expires(db: Database) -> None:  # noqa: F811
    store = DatabaseConversationStore(db)
    key = state_key("test", "a", "b")
    await store.put_many({key: "kept", state_key("test", "gone"): "short"}, ttl_s=60)
    await store.put_many({state_key("test", "gone"): "short"}, ttl_s=0.2)  # replaced, shorter
    await asyncio.sleep(0.4)
    assert await store.get_many([key, state_key("test", "gone"), state_key("test", "never")]) == {key: "kept"}


class _Unreachable:
    """A store whose database is down."""

    async def put_many(self, values: object, ttl_s: float) -> None:
        raise StorageUnavailable("the gateway's database is unreachable; retry later")

    async def get_many(self, keys: object) -> dict[str, str]:
        raise StorageUnavailable("the gateway's database is unreachable; retry later")


async def test_a_failing_store_does_not_fail_the_turn(caplog: pytest.LogCaptureFixture) -> None:
    turns = ThinkingTurns(_Unreachable())
    blocks = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        {"type": "tool_use", "id": "toolu_9", "name": "f", "input": {}},
    ]
    await turns.remember(blocks)
    call = {"id": "toolu_9", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    recall = await turns.recall_for({"messages": [{"role": "assistant", "tool_calls": [call]}]})
    assert recall.recall(blocks[1:]) == blocks[1:]
    assert any("conversation state" in r.getMessage() for r in caplog.records)


async def test_a_restarted_gateway_sends_geminis_thought_signature_back(tmp_path: Path) -> None:
    fake = FakeGemini(api_key=KEY)
    await fake.start()
    try:
        first = await _gateway(fake, tmp_path / "data")
        try:
            answer = await _complete(first, QUESTION, "gemini/tools")
        finally:
            await first.stop(0.5)
        message = answer["choices"][0]["message"]
        [signature] = fake.signatures
        assert all(len(call["id"]) <= 64 and signature not in call["id"] for call in message["tool_calls"])

        second = await _gateway(fake, tmp_path / "data")
        try:
            follow_up = await _complete(second, _follow_up(message, "sunny"), "gemini/tools")
        finally:
            await second.stop(0.5)
        assert follow_up["choices"][0]["finish_reason"] == "stop"
        turn = fake.last_request.json["contents"][1]
        assert turn["parts"][0]["thoughtSignature"] == signature
    finally:
        await fake.stop()
