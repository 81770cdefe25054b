"""AIGNE Hub's own client (`@aigne/aigne-hub`, unchanged, in Node) against the real
server and Envoy with the fake OpenAI upstream; raw HTTP checks of the discovery answer,
the stream frames and the error shape; one ledger record per call on both protocols."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format

from aigne.hub.v1 import agent_service_pb2 as agent_pb
from aigne.hub.v1 import agent_service_pb2_grpc as agent_grpc
from server.accounts.credits import rate_from_credits
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from tests.conftest import Bridge, gateway_config, start_bridge
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.openai_upstream import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
CLIENT = Path(__file__).parent / "aigne" / "client.mjs"
NODE = shutil.which("node")
HUB_DID = "z8ia3xzq2tMq8CRHfaXj1BTYJyYnEcHbqP8cJ"
pytestmark = pytest.mark.skipif(
    NODE is None or not (ROOT / "node_modules" / "@aigne" / "aigne-hub").is_dir(),
    reason="node or @aigne/aigne-hub (make setup) is missing",
)


async def run_client(base_url: str, api_key: str, *scenarios: str, **env: str) -> dict[str, Any]:
    assert NODE is not None
    process = await asyncio.create_subprocess_exec(
        NODE,
        str(CLIENT),
        base_url,
        api_key,
        *scenarios,
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    assert process.returncode == 0 and stdout, stderr.decode()[-3000:]
    results: dict[str, Any] = json.loads(stdout)
    return results


@pytest_asyncio.fixture(scope="module")
async def results(bridge: Bridge, api_key: str, fake_openai: FakeOpenAI) -> dict[str, Any]:
    """One client process runs the scenarios (it takes a second or two to load)."""
    scenarios = ["invoke", "stream", "tools", "toolsStream", "structured", "image", "gptImage", "models"]
    scenarios += ["badKey", "unknownModel", "streamError", "upstreamError"]
    return await run_client(bridge.rest_url, api_key, *scenarios)


def ok(results: dict[str, Any], name: str) -> Any:
    result = results[name]
    assert result["ok"], result
    return result["output"]


def failed(results: dict[str, Any], name: str) -> dict[str, Any]:
    result = results[name]
    assert not result["ok"], result
    return dict(result)


async def test_invoke(results: dict[str, Any]) -> None:
    output = ok(results, "invoke")
    assert output["text"] == "echo: hello from aigne"
    assert output["model"] == "openai/gpt-4o-mini"
    assert output["usage"]["inputTokens"] > 0 and output["usage"]["outputTokens"] > 0


async def test_stream(results: dict[str, Any]) -> None:
    streamed = ok(results, "stream")
    assert streamed["textEvents"] > 1, "text arrives in pieces"
    assert streamed["output"]["text"] == "echo: hello from aigne"
    assert streamed["output"]["model"] == "openai/gpt-4o-mini"
    assert streamed["output"]["usage"]["outputTokens"] > 0


async def test_tool_round_trip(results: dict[str, Any]) -> None:
    output = ok(results, "tools")
    [call] = output["first"]["toolCalls"]
    assert call["type"] == "function" and call["id"]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert output["second"]["text"] == 'tool result: {"sky":"sunny"}'


async def test_streamed_tool_calls_arrive_whole(results: dict[str, Any]) -> None:
    streamed = ok(results, "toolsStream")
    [call] = streamed["output"]["toolCalls"]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}


async def test_structured_output(results: dict[str, Any]) -> None:
    output = ok(results, "structured")
    assert output["json"] == {"echo": "hello from aigne"}
    assert "text" not in output


@pytest.mark.parametrize(("scenario", "model"), [("image", "openai/dall-e-3"), ("gptImage", "openai/gpt-image-1")])
async def test_image(results: dict[str, Any], scenario: str, model: str) -> None:
    output = ok(results, scenario)
    [image] = output["images"]
    # The gateway answers the image inline; the client stores it as a local file.
    assert image["type"] == "local" and image["mimeType"] == "image/png"
    png = await asyncio.to_thread(Path(image["path"]).read_bytes)
    assert png.startswith(b"\x89PNG")
    assert output["model"] == model


def by_address(models: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {f"{m['provider']}/{m['model']}": m for m in models}


async def test_model_list_passes_the_clients_schema(results: dict[str, Any]) -> None:
    models = ok(results, "models")  # parsed by the client's own schema (which drops "key")
    chat = by_address(models["chat"])
    assert chat["openai/gpt-4o-mini"]["model"] == "gpt-4o-mini"
    assert chat["openai/gpt-4o-mini"]["provider"] == "openai"
    assert chat["openai/gpt-4o-mini"]["providerDisplayName"] == "OpenAI"
    assert chat["openai/gpt-4o-mini"]["input_credits_per_token"] == "0"
    assert {m["type"] for m in models["chat"]} == {"chat"}
    assert "openai/dall-e-3" in by_address(models["image"])
    assert {m["type"] for m in models["image"]} == {"image"}


async def test_bad_key(results: dict[str, Any]) -> None:
    error = failed(results, "badKey")
    assert "key" in error["error"].lower()
    assert error["type"] in ("KEY_INVALID", "UNAUTHENTICATED")


async def test_unknown_model(results: dict[str, Any]) -> None:
    error = failed(results, "unknownModel")
    assert "unknown provider 'nosuch'" in error["error"]
    assert error["type"] == "MODEL_NOT_FOUND"


async def test_upstream_failure_mid_stream_reaches_the_client(results: dict[str, Any]) -> None:
    error = failed(results, "streamError")
    assert "The model crashed mid-stream (stream-error)." in error["error"], error


async def test_upstream_error_before_the_answer(results: dict[str, Any]) -> None:
    error = failed(results, "upstreamError")
    assert error["type"] == "UPSTREAM_BAD_REQUEST"


# -- raw HTTP ------------------------------------------------------------------------------


async def test_discovery_answer(bridge: Bridge) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{bridge.rest_url}/__blocklet__.js", params={"type": "json"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert {"did": HUB_DID, "mountPoint": "/"}.items() <= body["componentMountPoints"][0].items()


async def test_model_list_is_a_bare_array_without_a_key(bridge: Bridge) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"{bridge.rest_url}/api/ai/models", params={"type": "chat"})
        wrong = await client.get(f"{bridge.rest_url}/api/ai/models", params={"type": "audio"})
    assert response.status_code == 200
    models = {m["key"]: m for m in response.json()}
    assert "fast" not in models, "aliases are not listed: AIGNE clients build provider/model"
    assert set(models["openai/gpt-4o-mini"]) == {
        "key",
        "model",
        "type",
        "provider",
        "input_credits_per_token",
        "output_credits_per_token",
        "providerDisplayName",
        "modelMetadata",
        "status",
    }
    assert models["openai/gpt-4o-mini"]["modelMetadata"]["features"] == ["tools", "vision"]
    assert wrong.status_code == 400
    assert "type must be one of" in wrong.json()["error"]["message"]


def sse_events(text: str) -> list[tuple[str | None, str]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        name = None
        data = []
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line[len("event: ") :]
            elif line.startswith("data: "):
                data.append(line[len("data: ") :])
        events.append((name, "\n".join(data)))
    return events


def agent_body(model: str, **options: Any) -> dict[str, Any]:
    return {
        "input": {"messages": [{"role": "user", "content": "raw frames"}], "modelOptions": {"model": model}},
        "agent": "$CHAT_MODEL",
        "options": options,
    }


async def test_stream_frames(bridge: Bridge, auth_headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{bridge.rest_url}/api/v2/chat",
            json=agent_body("openai/gpt-4o-mini", streaming=True, userContext={}, memories=[]),
            headers=auth_headers,
        )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert all(name is None for name, _ in events)
    payloads = [json.loads(data) for _, data in events]  # every data line is JSON: no [DONE]
    texts = [p["delta"]["text"]["text"] for p in payloads[:-1]]
    assert "".join(texts) == "echo: raw frames"
    last = payloads[-1]["delta"]["json"]
    assert last["model"] == "openai/gpt-4o-mini" and set(last["usage"]) == {"inputTokens", "outputTokens"}


async def test_stream_failure_is_an_error_event(bridge: Bridge, auth_headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        body = agent_body("openai/stream-error", streaming=True)
        response = await client.post(f"{bridge.rest_url}/api/v2/chat", json=body, headers=auth_headers)
    events = sse_events(response.text)
    assert events[0][0] is None and "delta" in json.loads(events[0][1])
    name, data = events[-1]
    assert name == "error"
    assert json.loads(data) == {
        "message": "openai failed mid-stream: The model crashed mid-stream (stream-error).",
        "type": "UPSTREAM_UNAVAILABLE",
    }


async def test_error_shape(bridge: Bridge, auth_headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{bridge.rest_url}/api/v2/chat", json=agent_body("openai/no such model!"), headers={"x": "y"}
        )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "UNAUTHENTICATED"
    assert response.json()["error"]["message"]


async def test_one_ledger_record_per_call_on_both_protocols(
    gateway: Gateway, bridge: Bridge, fake_openai: FakeOpenAI
) -> None:
    owner = await ensure_owner(gateway.accounts.db, "user", "ledger-both")
    key, secret = await gateway.accounts.keys.create_key(owner.id, "both protocols")
    headers = {"authorization": f"Bearer {secret}"}
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "raw frames"}]}
    async with httpx.AsyncClient() as client:
        body = agent_body("openai/gpt-4o-mini")
        agent = await client.post(f"{bridge.rest_url}/api/v2/chat", json=body, headers=headers)
        streamed = await client.post(
            f"{bridge.rest_url}/api/v2/chat", json=agent_body("openai/gpt-4o-mini", streaming=True), headers=headers
        )
        refused = await client.post(f"{bridge.rest_url}/api/v2/chat", json=agent_body("nosuch/model"), headers=headers)
        openai_answer = await client.post(f"{bridge.rest_url}/v1/chat/completions", json=chat, headers=headers)
    assert (agent.status_code, streamed.status_code, refused.status_code, openai_answer.status_code) == (
        200,
        200,
        404,
        200,
    )
    records = await gateway.accounts.ledger.records(key_id=key.id)
    assert sorted((r.operation, r.outcome) for r in records) == [
        ("chat", "error"),
        ("chat", "ok"),
        ("chat", "ok"),
        ("chat_stream", "ok"),
    ]
    agent_record = next(r for r in records if r.operation == "chat_stream")
    assert agent_record.model == "openai/gpt-4o-mini" and agent_record.output_tokens > 0


# -- out of credits ------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def billing(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Bridge, str]]:
    data = tmp_path_factory.mktemp("billing")
    gateway = await start_gateway(
        Settings(grpc_port=0, database_url=f"sqlite:///{data / 'hub.db'}", billing_enabled=True),
        gateway_config(fake_openai.base_url),
    )
    await gateway.accounts.credits.set_rate(rate_from_credits("openai/*", {"input_per_million": 1}))
    owner = await ensure_owner(gateway.accounts.db, "user", "penniless")
    _, secret = await gateway.accounts.keys.create_key(owner.id, "no credits")
    bridge = await start_bridge(gateway.port, data)
    yield gateway, bridge, secret
    await bridge.envoy.stop()
    await gateway.stop(0.5)


async def test_out_of_credits_is_402_not_enough(billing: tuple[Gateway, Bridge, str]) -> None:
    _, bridge, secret = billing
    results = await run_client(bridge.rest_url, secret, "invoke", "stream")
    for name in ("invoke", "stream"):
        error = failed(results, name)
        assert error["type"] == "NOT_ENOUGH", error
    async with httpx.AsyncClient() as client:
        response = await client.post(
            f"{bridge.rest_url}/api/v2/chat",
            json=agent_body("openai/gpt-4o-mini"),
            headers={"authorization": f"Bearer {secret}"},
        )
        openai_route = await client.post(
            f"{bridge.rest_url}/v1/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {secret}"},
        )
    assert response.status_code == 402
    assert response.json()["error"]["type"] == "NOT_ENOUGH"
    assert openai_route.status_code == 429, "the OpenAI routes keep OpenAI's semantics"
    models = await run_client(bridge.rest_url, secret, "models")
    entry = by_address(ok(models, "models")["chat"])["openai/gpt-4o-mini"]
    assert entry["input_credits_per_token"] == "0.000001"


# -- bare model names ----------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module")
async def one_provider(
    fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Bridge, str]]:
    """A gateway with the openai provider only: its catalog's names are unambiguous."""
    data = tmp_path_factory.mktemp("one-provider")
    config = gateway_config(fake_openai.base_url)
    config.providers.pop("badkey")
    gateway = await start_gateway(Settings(grpc_port=0, database_url=f"sqlite:///{data / 'hub.db'}"), config)
    owner = await ensure_owner(gateway.accounts.db, "user", "bare")
    _, secret = await gateway.accounts.keys.create_key(owner.id, "bare names")
    bridge = await start_bridge(gateway.port, data)
    yield bridge, secret
    await bridge.envoy.stop()
    await gateway.stop(0.5)


async def test_a_bare_name_reaches_the_one_provider_that_lists_it(
    one_provider: tuple[Bridge, str], fake_openai: FakeOpenAI
) -> None:
    bridge, secret = one_provider
    # "openai/gpt-4o-mini" makes the client talk OpenAI's protocol with "gpt-4o-mini".
    output = ok(await run_client(bridge.rest_url, secret, "bareName"), "bareName")
    assert output["text"] == "echo: hello from aigne"
    assert output["model"] == "openai/gpt-4o-mini"
    assert fake_openai.last_request.path == "/v1/chat/completions"
    assert fake_openai.last_request.json["model"] == "gpt-4o-mini"


async def test_an_ambiguous_bare_name_is_refused_naming_the_candidates(
    bridge: Bridge, auth_headers: dict[str, str]
) -> None:
    chat = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{bridge.rest_url}/chat/completions", json=chat, headers=auth_headers)
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert "badkey/gpt-4o-mini" in message and "openai/gpt-4o-mini" in message


# -- gRPC callers and what is not offered --------------------------------------------------


async def test_grpc_callers_get_typed_answers_and_statuses(channel: grpc.aio.Channel) -> None:
    stub = agent_grpc.AgentServiceStub(channel)
    request = json_format.ParseDict(agent_body("openai/gpt-4o-mini"), agent_pb.InvokeChatModelRequest())
    answer = await stub.InvokeChatModel(request)
    assert answer.text == "echo: raw frames" and answer.model == "openai/gpt-4o-mini"
    events = [event async for event in stub.StreamChatModel(request)]
    assert "".join(e.delta.text.text for e in events) == "echo: raw frames"
    failing = json_format.ParseDict(agent_body("openai/stream-error"), agent_pb.InvokeChatModelRequest())
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for event in stub.StreamChatModel(failing):
            received.append(event)
    assert received and not any(e.HasField("error") for e in received), "gRPC gets the status, not an event"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    models = await stub.ListAgentModels(agent_pb.ListAgentModelsRequest(type="image"))
    assert models.content_type == "application/json"
    assert {m["type"] for m in json.loads(models.data)} == {"image"}


async def test_video_is_not_offered(bridge: Bridge, auth_headers: dict[str, str]) -> None:
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{bridge.rest_url}/api/v2/video", json={}, headers=auth_headers)
    assert response.status_code == 501, response.text
    assert response.json()["error"]["message"] == "video generation is not offered by this gateway"


# -- another provider: Anthropic's Messages API behind the same protocol -------------------


@pytest_asyncio.fixture(scope="module")
async def claude(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[tuple[Bridge, str]]:
    data = tmp_path_factory.mktemp("claude")
    async with FakeAnthropic(api_key="sk-ant-fake") as fake:
        config = GatewayConfig(providers={"anthropic": ProviderConfig(base_url=fake.base_url, api_key="sk-ant-fake")})
        gateway = await start_gateway(Settings(grpc_port=0, database_url=f"sqlite:///{data / 'hub.db'}"), config)
        owner = await ensure_owner(gateway.accounts.db, "user", "claude")
        _, secret = await gateway.accounts.keys.create_key(owner.id, "claude")
        bridge = await start_bridge(gateway.port, data)
        yield bridge, secret
        await bridge.envoy.stop()
        await gateway.stop(0.5)


async def test_tools_and_structured_output_through_anthropic(claude: tuple[Bridge, str]) -> None:
    bridge, secret = claude
    env = {"AIGNE_TEST_PROVIDER": "anthropic", "AIGNE_TEST_CHAT_MODEL": "claude-sonnet-4-5"}
    results = await run_client(bridge.rest_url, secret, "stream", "tools", "toolsStream", "structured", **env)
    assert ok(results, "stream")["output"]["text"] == "echo: hello from aigne"
    tools = ok(results, "tools")
    [call] = tools["first"]["toolCalls"]
    assert call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert "sunny" in tools["second"]["text"]
    [streamed_call] = ok(results, "toolsStream")["output"]["toolCalls"]
    assert streamed_call["function"] == {"name": "get_weather", "arguments": {"city": "Paris"}}
    assert ok(results, "structured")["json"] == {"echo": "hello from aigne"}


async def test_a_client_that_hangs_up_mid_stream_is_recorded_as_cancelled(gateway: Gateway, bridge: Bridge) -> None:
    owner = await ensure_owner(gateway.accounts.db, "user", "hangs-up")
    key, secret = await gateway.accounts.keys.create_key(owner.id, "hangs up")
    body = agent_body("openai/stream-stall", streaming=True)  # 2 chunks, then silence
    async with (
        httpx.AsyncClient(timeout=30) as client,
        client.stream(
            "POST", f"{bridge.rest_url}/api/v2/chat", json=body, headers={"authorization": f"Bearer {secret}"}
        ) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break  # the first event: hang up
    for _ in range(200):  # poll: the record is written once the server sees the hang-up
        records = await gateway.accounts.ledger.records(key_id=key.id)
        if records:
            break
        await asyncio.sleep(0.05)
    assert [(r.operation, r.outcome) for r in records] == [("chat_stream", "cancelled")]
