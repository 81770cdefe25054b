"""The REST bridge's streams: events that are ready together leave the server together.

BridgeService (server.api.bridge) prints ChatServicer's chunks as SSE events; each
HttpBody it sends carries every event printed since the last one went out, so an
upstream read holding many events costs one gRPC message (and one Envoy write), not
one per event. These tests call BridgeService over gRPC, as Envoy does, against the
loopback OpenAI fake: a burst (the whole stream in one write) arrives in fewer
messages than events, byte for byte the events the REST client reads; a stream whose
chunks are spaced arrives one event per message (nothing waits to fill a batch); a
client that leaves mid-stream still cancels the upstream and is recorded as cancelled.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import grpc
import httpx
import pytest_asyncio
from google.api import httpbody_pb2

from aigne.hub.v1 import bridge_service_pb2_grpc as bridge_grpc
from server.app import Gateway, start_gateway
from server.config import Settings
from tests.conftest import Bridge, gateway_config, start_bridge
from tests.fakes import FakeOpenAI
from tests.helpers import chat_request

# What the bridge's Envoy adds to a streamed chat call (server.api.call_metadata).
BRIDGE_METADATA = (("x-aigne-bridge", "sse"), ("x-aigne-rest", "1"))
WORDS = " ".join(f"w{i}" for i in range(30))


@pytest_asyncio.fixture
async def spaced_fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key="sk-fake", chunk_delay=0.05) as fake:
        yield fake


@pytest_asyncio.fixture
async def hub(spaced_fake: FakeOpenAI, tmp_path) -> AsyncIterator[tuple[Gateway, Bridge]]:
    settings = Settings(grpc_port=0, auth_required=False, data_dir=tmp_path, upstream_read_timeout_s=20)
    gateway = await start_gateway(settings, gateway_config(spaced_fake.base_url))
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        yield gateway, bridge
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


async def bridge_messages(gateway: Gateway, model: str) -> list[bytes]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = bridge_grpc.BridgeServiceStub(channel)
        request = chat_request(model=f"openai/{model}", text=WORDS)
        request.stream = True
        messages: list[httpbody_pb2.HttpBody] = [
            message async for message in stub.StreamChatCompletion(request, metadata=BRIDGE_METADATA)
        ]
    assert {message.content_type for message in messages} == {"text/event-stream"}
    return [message.data for message in messages]


def events_of(data: bytes) -> list[str]:
    text = data.decode()
    assert text.endswith("\n\n"), text
    events = text.removesuffix("\n\n").split("\n\n")
    assert all(event.startswith("data: ") for event in events), text
    return events


async def test_a_burst_leaves_in_fewer_messages_than_events(hub) -> None:
    gateway, bridge = hub
    messages = await bridge_messages(gateway, "stream-burst")
    events = events_of(b"".join(messages))
    assert events[-1] == "data: [DONE]"
    words = "".join(
        choice["delta"].get("content") or "" for event in events[:-1] for choice in json.loads(event[6:])["choices"]
    )
    assert words.split() == ["echo:", *WORDS.split()]  # the fake echoes the prompt
    assert len(messages) < len(events) / 2, [len(events_of(m)) for m in messages]
    # What a REST client reads through Envoy (ids and times are the fake's, per call).
    body = {"model": "openai/stream-burst", "stream": True, "messages": [{"role": "user", "content": WORDS}]}
    async with httpx.AsyncClient(timeout=20) as client:
        response = await client.post(f"{bridge.rest_url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert comparable(events_of(response.content)) == comparable(events)


def comparable(events: list[str]) -> list[object]:
    parsed = [json.loads(event[6:]) if event != "data: [DONE]" else event for event in events]
    for event in parsed:
        if isinstance(event, dict):
            del event["id"], event["created"]
    return parsed


async def test_spaced_chunks_leave_one_event_per_message(hub) -> None:
    gateway, _ = hub
    messages = await bridge_messages(gateway, "stream-slow")
    assert len(messages) > 10
    # The role chunk may share its message with the first word (one upstream read);
    # after that each chunk waited 50 ms upstream and went out alone.
    assert [len(events_of(m)) for m in messages[2:]] == [1] * (len(messages) - 2)


async def test_a_client_leaving_mid_stream_cancels_the_upstream_and_is_recorded(hub, spaced_fake) -> None:
    gateway, bridge = hub
    body = {"model": "openai/stream-slow", "stream": True, "messages": [{"role": "user", "content": WORDS}]}
    async with (
        httpx.AsyncClient(timeout=20) as client,
        client.stream("POST", f"{bridge.rest_url}/v1/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: ") and "w1" in line:
                break
    deadline = time.monotonic() + 10
    while not (spaced_fake.cancelled_streams and await gateway.accounts.ledger.records()):
        assert time.monotonic() < deadline, "the upstream stream was not cancelled, or no record was written"
        await asyncio.sleep(0.05)
    (record,) = await gateway.accounts.ledger.records()
    assert record.outcome == "cancelled"
    assert record.output_tokens > 0
