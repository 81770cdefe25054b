"""The Anthropic adapter, end to end: the gateway (through gRPC, and through the REST
bridge with the official openai SDK) in front of a fake Anthropic API that the official
anthropic SDK vouches for.

The fake's answers are parsed strictly with the anthropic SDK's own types first, so
that what the adapter is tested against is what Anthropic sends.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import Any

import anthropic
import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from anthropic.types import Message, RawMessageStreamEvent
from anthropic.types.shared import ErrorResponse
from google.protobuf import json_format
from pydantic import TypeAdapter

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings, config_from_environment
from server.providers.anthropic import default_max_tokens
from tests.conftest import SINGLE_ATTEMPT, Bridge, start_bridge
from tests.fakes.anthropic_upstream import FakeAnthropic, signature_of
from tests.helpers import error_info, retry_info
from tests.test_fake_openai_upstream import strictly

KEY = "sk-ant-fake"
MODEL = "claude-sonnet-5-5"
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
USER = [{"role": "user", "content": "hello claude"}]
JSON = dict[str, Any]


# ------------------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeAnthropic]:
    async with FakeAnthropic(api_key=KEY, slow_seconds=5, chunk_delay=0.2) as server:
        yield server


@pytest.fixture(autouse=True)
def _reset(fake: FakeAnthropic) -> None:
    fake.reset()


@pytest_asyncio.fixture(scope="module")
async def claude_gateway(fake: FakeAnthropic) -> AsyncIterator[Gateway]:
    config = GatewayConfig(
        routing=SINGLE_ATTEMPT,
        providers={
            "anthropic": ProviderConfig(base_url=fake.base_url, api_key=KEY),
            # The same fake with a key it refuses: authentication failures.
            "claude-badkey": ProviderConfig(type="anthropic", base_url=fake.base_url, api_key="sk-ant-wrong"),
        },
    )
    settings = Settings(grpc_port=0, auth_required=False, upstream_read_timeout_s=2.0, shutdown_grace_s=1.0)
    gateway = await start_gateway(settings, config)
    yield gateway
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def claude_bridge(claude_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(claude_gateway.port, tmp_path_factory.mktemp("envoy-anthropic"))
    yield bridge
    await bridge.envoy.stop()


@pytest_asyncio.fixture(scope="module")
async def stub(claude_gateway: Gateway) -> AsyncIterator[chat_grpc.ChatServiceStub]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{claude_gateway.port}") as channel:
        yield chat_grpc.ChatServiceStub(channel)


@pytest_asyncio.fixture(scope="module")
async def rest(claude_bridge: Bridge) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{claude_bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=20)
    yield client
    await client.close()


@pytest_asyncio.fixture
async def sdk(fake: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(base_url=fake.base_url, api_key=KEY, max_retries=0)
    yield client
    await client.close()


@dataclass
class Failure:
    """How a failed call looked to the client: the ErrorReason and the status."""

    reason: str
    status: Any  # a grpc.StatusCode, or an HTTP status (None for a mid-stream error)


class Grpc:
    """Chat through the gRPC API; answers as dicts in OpenAI's field names."""

    def __init__(self, stub: chat_grpc.ChatServiceStub) -> None:
        self.stub = stub

    async def complete(self, **body: Any) -> JSON:
        return _as_dict(await self.stub.CreateChatCompletion(_request(body)))

    async def stream(self, **body: Any) -> list[JSON]:
        chunks = self.stub.StreamChatCompletion(_request({**body, "stream": True}))
        return [_as_dict(chunk) async for chunk in chunks]

    async def failure(self, call: Awaitable[Any]) -> Failure:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        return Failure(error_info(caught.value).reason, caught.value.code())


class Rest:
    """Chat through the REST bridge with the official openai SDK."""

    def __init__(self, client: openai.AsyncOpenAI) -> None:
        self.client = client

    async def complete(self, **body: Any) -> JSON:
        completion = await self.client.chat.completions.create(**body)
        return completion.model_dump(exclude_none=True)

    async def stream(self, **body: Any) -> list[JSON]:
        chunks = await self.client.chat.completions.create(stream=True, **body)
        return [chunk.model_dump(exclude_none=True) async for chunk in chunks]

    async def failure(self, call: Awaitable[Any]) -> Failure:
        with pytest.raises(openai.APIError) as caught:
            await call
        return Failure(str(caught.value.code), getattr(caught.value, "status_code", None))


@pytest.fixture(params=["grpc", "rest"])
def via(request: pytest.FixtureRequest) -> Grpc | Rest:
    if request.param == "grpc":
        return Grpc(request.getfixturevalue("stub"))
    return Rest(request.getfixturevalue("rest"))


def _request(body: JSON) -> chat_pb.CreateChatCompletionRequest:
    return json_format.ParseDict(body, chat_pb.CreateChatCompletionRequest())


def _as_dict(message: Any) -> JSON:
    result: JSON = json_format.MessageToDict(message, preserving_proto_field_name=True)
    return result


def _content(chunks: list[JSON]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))


def _finish(chunks: list[JSON]) -> str:
    return [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")][-1]


def _tool_calls(chunks: list[JSON]) -> dict[int, JSON]:
    """Tool calls reassembled from streamed deltas, by their index."""
    calls: dict[int, JSON] = {}
    for chunk in chunks:
        for choice in chunk.get("choices", []):
            for delta in choice["delta"].get("tool_calls", []):
                call = calls.setdefault(delta.get("index", 0), {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.get("id", "")
                call["name"] += delta.get("function", {}).get("name", "")
                call["arguments"] += delta.get("function", {}).get("arguments", "")
    return calls


def _weather(model: str = "tools", **fields: Any) -> JSON:
    return {
        "model": f"anthropic/{model}",
        "messages": [{"role": "user", "content": "weather in Paris?"}],
        "tools": [WEATHER_TOOL],
        **fields,
    }


# ------------------------------------------------------- the fake, judged by the anthropic SDK


@pytest.mark.parametrize(
    "model", ["claude-haiku-5-5", "tools", "tools-parallel", "tools-noargs", "thinking", "cached", "refusal"]
)
async def test_fake_messages_parse_strictly_as_sdk_types(sdk, model):
    tools = [{"name": "get_weather", "input_schema": {"type": "object"}}]
    params: JSON = {"model": model, "max_tokens": 100, "messages": [{"role": "user", "content": "hi there"}]}
    message = await sdk.messages.create(**params, tools=tools)
    strictly(Message, message)
    events = [event async for event in await sdk.messages.create(**params, tools=tools, stream=True)]
    for event in events:
        strictly(TypeAdapter(RawMessageStreamEvent).validate_python(event.model_dump()).__class__, event)
    assert events[0].type == "message_start"  # the SDK drops the ping that follows
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    async with sdk.messages.stream(**params, tools=tools) as stream:
        streamed = await stream.get_final_message()
    # The SDK's accumulator rebuilds from the events the message the fake sends whole.
    assert _without_ids(streamed.content) == _without_ids(message.content)
    assert streamed.stop_reason == message.stop_reason
    assert streamed.usage.output_tokens == message.usage.output_tokens


def _without_ids(blocks: list[Any]) -> list[JSON]:
    return [{k: v for k, v in block.model_dump().items() if k != "id"} for block in blocks]


@pytest.mark.parametrize(
    ("model", "exception", "status"),
    [
        ("error-400", anthropic.BadRequestError, 400),
        ("error-401", anthropic.AuthenticationError, 401),
        ("error-402", anthropic.APIStatusError, 402),
        ("error-403", anthropic.PermissionDeniedError, 403),
        ("error-404", anthropic.NotFoundError, 404),
        ("error-429", anthropic.RateLimitError, 429),
        ("error-500", anthropic.InternalServerError, 500),
        ("error-504", anthropic.InternalServerError, 504),
        ("error-529", anthropic.OverloadedError, 529),
    ],
)
async def test_fake_errors_are_what_the_sdk_expects(sdk, model, exception, status):
    with pytest.raises(exception) as caught:
        await sdk.messages.create(model=model, max_tokens=10, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    body = strictly(ErrorResponse, caught.value.body)
    assert body.type == "error" and body.request_id
    if status == 429:
        assert caught.value.response.headers["retry-after"] == "7"


async def test_fake_stream_error_event_raises_in_the_sdk(sdk):
    stream = await sdk.messages.create(
        model="stream-error", max_tokens=10, messages=[{"role": "user", "content": "a b c"}], stream=True
    )
    with pytest.raises(anthropic.APIStatusError) as caught:
        async for _ in stream:
            pass
    assert "overloaded_error" in str(caught.value)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 2}, "n: Extra inputs are not permitted"),
        ({"messages": [{"role": "system", "content": "x"}]}, "Input should be 'user' or 'assistant'"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": ""}]}]}, "must be non-empty"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_x"}]}]},
            "unexpected `tool_use_id`",
        ),
        ({"temperature": 1.5}, "temperature"),
    ],
)
async def test_fake_refuses_what_the_real_api_refuses(sdk, params, message):
    body = {"model": MODEL, "max_tokens": 10, "messages": [{"role": "user", "content": "x"}]}
    # extra_body: SDK 2.x has no parameter for n, nor any longer for temperature.
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk.messages.create(**body, extra_body=params)
    assert message in str(caught.value)


async def test_fake_wants_the_api_version_header(fake):
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{fake.base_url}/v1/messages", headers={"x-api-key": KEY}, json={})
    assert response.status_code == 400
    assert response.json()["error"]["message"] == "anthropic-version: header is required"


async def test_fake_stream_wire_format(fake):
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": MODEL, "max_tokens": 10, "stream": True, "messages": USER}
    async with httpx.AsyncClient() as client:
        response = await client.post(f"{fake.base_url}/v1/messages", headers=headers, json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [event.split("\n") for event in response.text.split("\n\n") if event]
    names = [lines[0].removeprefix("event: ") for lines in events]
    assert names[:2] == ["message_start", "ping"] and names[-1] == "message_stop"
    assert all(
        json.loads(lines[1].removeprefix("data: "))["type"] == name for lines, name in zip(events, names, strict=True)
    )


# ---------------------------------------------------------------------- plain chat


async def test_plain_chat_is_translated_both_ways(via, fake):
    answer = await via.complete(
        model=f"anthropic/{MODEL}",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello claude"},
        ],
        temperature=0.5,
        top_p=0.9,
        stop="STOP",
        user="user-42",
    )
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "echo: hello claude"
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "stop"
    assert answer["id"].startswith("msg_01Fake")
    assert answer["model"] == f"anthropic/{MODEL}" and answer["object"] == "chat.completion"
    assert answer["usage"] == {"prompt_tokens": 4, "completion_tokens": 3, "total_tokens": 7} | _details(answer)
    sent = fake.requests[-1]
    assert sent.path == "/v1/messages"
    assert sent.headers["x-api-key"] == KEY and sent.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in sent.headers
    assert sent.json == {
        "model": MODEL,
        "max_tokens": 32000,
        "system": "be brief",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello claude"}]}],
        "temperature": 0.5,
        "top_p": 0.9,
        "stop_sequences": ["STOP"],
        "metadata": {"user_id": "user-42"},
    }


def _details(answer: JSON) -> JSON:
    """The usage details as the transport shows them (gRPC omits zero counts)."""
    usage = answer["usage"]
    return {key: usage[key] for key in ("prompt_tokens_details", "completion_tokens_details") if key in usage}


async def test_max_completion_tokens_wins_over_max_tokens(via, fake):
    await via.complete(model=f"anthropic/{MODEL}", messages=USER, max_tokens=50, max_completion_tokens=60)
    assert fake.requests[-1].json["max_tokens"] == 60
    await via.complete(model=f"anthropic/{MODEL}", messages=USER, max_tokens=50)
    assert fake.requests[-1].json["max_tokens"] == 50


def test_default_max_tokens_is_per_model():
    assert default_max_tokens("claude-3-haiku-20240307") == 4096
    assert default_max_tokens("claude-3-5-sonnet-20241022") == 8192
    assert default_max_tokens("claude-opus-4-1") == 32000
    assert default_max_tokens("claude-sonnet-5-5") == 32000


async def test_system_and_developer_messages_become_system_blocks(via, fake):
    await via.complete(
        model=f"anthropic/{MODEL}",
        messages=[
            {"role": "system", "content": "rule one"},
            {"role": "developer", "content": [{"type": "text", "text": "rule two"}]},
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "hello"},
            {"role": "user", "content": "again"},
        ],
    )
    sent = fake.requests[-1].json
    assert sent["system"] == [{"type": "text", "text": "rule one"}, {"type": "text", "text": "rule two"}]
    assert [m["role"] for m in sent["messages"]] == ["user", "assistant", "user"]


async def test_images_become_base64_and_url_sources(via, fake):
    parts = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
    ]
    await via.complete(model=f"anthropic/{MODEL}", messages=[{"role": "user", "content": parts}])
    assert fake.requests[-1].json["messages"][0]["content"] == [
        {"type": "text", "text": "compare"},
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
        {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
    ]


async def test_json_schema_and_effort_use_output_config(via, fake):
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "additionalProperties": False}
    answer = await via.complete(
        model=f"anthropic/{MODEL}",
        messages=USER,
        response_format={"type": "json_schema", "json_schema": {"name": "echo", "schema": schema, "strict": True}},
        reasoning_effort="minimal",
    )
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"echo": "hello claude"}
    assert fake.requests[-1].json["output_config"] == {
        "format": {"type": "json_schema", "schema": schema},
        "effort": "low",
    }


# ------------------------------------------------------------------------------ tools


async def test_multi_turn_tool_use(via, fake):
    first = await via.complete(**_weather(tool_choice="auto"))
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("toolu_01Fake") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert fake.requests[-1].json["tools"] == [
        {
            "name": "get_weather",
            "input_schema": WEATHER_TOOL["function"]["parameters"],
            "description": "Weather in a city",
        }
    ]
    assert fake.requests[-1].json["tool_choice"] == {"type": "auto"}

    follow_up = _weather()
    follow_up["messages"] += [
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"},
    ]
    second = await via.complete(**follow_up)
    assert second["choices"][0]["message"]["content"] == "tool result: sunny, 21C"
    assert second["choices"][0]["finish_reason"] == "stop"
    sent = fake.requests[-1].json["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me check."},
            {"type": "tool_use", "id": call["id"], "name": "get_weather", "input": {"city": "Paris"}},
        ],
    }
    assert sent[2] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": call["id"], "content": "sunny, 21C"}],
    }


async def test_parallel_tool_results_share_one_user_message(via, fake):
    first = await via.complete(**_weather("tools-parallel"))
    calls = first["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"])["city"] for c in calls] == ["Paris", "London"]
    follow_up = _weather("tools-parallel")
    follow_up["messages"] += [
        {"role": "assistant", "tool_calls": calls},
        {"role": "tool", "tool_call_id": calls[0]["id"], "content": "sunny"},
        {"role": "tool", "tool_call_id": calls[1]["id"], "content": "rainy"},
        {"role": "user", "content": "and tomorrow?"},
    ]
    await via.complete(**follow_up)
    sent = fake.requests[-1].json["messages"]
    assert len(sent) == 3 and sent[2]["role"] == "user"
    assert [b["type"] for b in sent[2]["content"]] == ["tool_result", "tool_result", "text"]
    assert [b.get("tool_use_id") for b in sent[2]["content"][:2]] == [calls[0]["id"], calls[1]["id"]]


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"tool_choice": "none"}, {"type": "none"}),
        ({"tool_choice": "required"}, {"type": "any"}),
        (
            {"tool_choice": {"type": "function", "function": {"name": "get_weather"}}},
            {"type": "tool", "name": "get_weather"},
        ),
        ({"parallel_tool_calls": False}, {"type": "auto", "disable_parallel_tool_use": True}),
        (
            {"tool_choice": "required", "parallel_tool_calls": False},
            {"type": "any", "disable_parallel_tool_use": True},
        ),
    ],
)
async def test_tool_choice_and_parallel_calls(via, fake, fields, expected):
    await via.complete(**_weather(MODEL, **fields))
    assert fake.requests[-1].json["tool_choice"] == expected


async def test_invalid_tool_call_arguments_are_refused_before_upstream(via, fake):
    request = _weather()
    bad_call = {"id": "toolu_1", "type": "function", "function": {"name": "get_weather", "arguments": "{city"}}
    request["messages"] += [
        {"role": "assistant", "tool_calls": [bad_call]},
        {"role": "tool", "tool_call_id": "toolu_1", "content": "x"},
    ]
    failure = await via.failure(via.complete(**request))
    assert failure.reason == "INVALID_REQUEST"
    assert failure.status in (grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert not fake.requests


# ---------------------------------------------------------------------------- thinking


async def test_thinking_blocks_go_back_with_tool_results(via, fake):
    first = await via.complete(**_weather("thinking"))
    message = first["choices"][0]["message"]
    assert message["reasoning_content"] == "The user wants the weather; the tool knows it."
    follow_up = _weather("thinking")
    follow_up["messages"] += [
        {"role": "assistant", "content": message["content"], "tool_calls": message["tool_calls"]},
        {"role": "tool", "tool_call_id": message["tool_calls"][0]["id"], "content": "sunny"},
    ]
    second = await via.complete(**follow_up)
    assert second["choices"][0]["message"]["content"] == "tool result: sunny"
    thinking = fake.requests[-1].json["messages"][1]["content"][0]
    assert thinking["type"] == "thinking" and thinking["signature"] == signature_of(thinking["thinking"])


async def test_thinking_from_a_stream_goes_back_too(via, fake):
    chunks = await via.stream(**_weather("thinking"))
    reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content", "") for c in chunks if c.get("choices"))
    assert reasoning == "The user wants the weather; the tool knows it."
    [call] = _tool_calls(chunks).values()
    follow_up = _weather("thinking")
    tool_call = {
        "id": call["id"],
        "type": "function",
        "function": {"name": call["name"], "arguments": call["arguments"]},
    }
    follow_up["messages"] += [
        {"role": "assistant", "content": _content(chunks), "tool_calls": [tool_call]},
        {"role": "tool", "tool_call_id": call["id"], "content": "cloudy"},
    ]
    second = await via.complete(**follow_up)
    assert second["choices"][0]["message"]["content"] == "tool result: cloudy"


# ---------------------------------------------------------------------------- streaming


async def test_streaming_text(via, fake):
    chunks = await via.stream(model=f"anthropic/{MODEL}", messages=[{"role": "user", "content": "one two three"}])
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert _content(chunks) == "echo: one two three"
    assert _finish(chunks) == "stop"
    assert len({c["id"] for c in chunks}) == 1 and chunks[0]["id"].startswith("msg_01Fake")
    assert all(c["model"] == f"anthropic/{MODEL}" for c in chunks)
    assert all("usage" not in c for c in chunks), "usage only when the client asks for it"
    assert fake.requests[-1].json["stream"] is True


async def test_streamed_usage_is_the_cumulative_total(via):
    chunks = await via.stream(
        model="anthropic/cached", messages=USER, stream_options={"include_usage": True}, max_tokens=100
    )
    usage = chunks[-1]["usage"]
    assert not chunks[-1].get("choices")
    # input 2 + cache reads 100 + cache writes 20; output from message_delta, not message_start's 1.
    assert usage["prompt_tokens"] == 122 and usage["completion_tokens"] == 3 and usage["total_tokens"] == 125
    assert usage["prompt_tokens_details"]["cached_tokens"] == 100


async def test_usage_counts_cache_reads_and_writes(via):
    answer = await via.complete(model="anthropic/cached", messages=USER)
    assert answer["usage"]["prompt_tokens"] == 122 and answer["usage"]["completion_tokens"] == 3
    assert answer["usage"]["prompt_tokens_details"]["cached_tokens"] == 100


async def test_streaming_parallel_tool_calls_reassemble_exactly(via):
    chunks = await via.stream(**_weather("tools-parallel"))
    # Block 0 is text: the calls are blocks 1 and 2 but must be tool calls 0 and 1.
    calls = _tool_calls(chunks)
    assert sorted(calls) == [0, 1]
    assert [calls[i]["arguments"] for i in (0, 1)] == [json.dumps({"city": "Paris"}), json.dumps({"city": "London"})]
    assert all(c["name"] == "get_weather" and c["id"].startswith("toolu_01Fake") for c in calls.values())
    assert _content(chunks) == "Let me check."
    assert _finish(chunks) == "tool_calls"


async def test_streamed_call_without_arguments_has_an_empty_object(via):
    chunks = await via.stream(**_weather("tools-noargs"))
    assert [call["arguments"] for call in _tool_calls(chunks).values()] == ["{}"]


async def test_streaming_tool_calls_via_the_openai_accumulator(rest):
    async with rest.chat.completions.stream(**_weather("tools-parallel")) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "London"}]


@pytest.mark.parametrize(
    ("model", "fields", "reason"),
    [
        (MODEL, {}, "stop"),
        (MODEL, {"stop": ["claude"]}, "stop"),
        (MODEL, {"max_tokens": 1}, "length"),
        ("max-tokens", {}, "length"),
        ("context-window", {}, "length"),
        ("tools", {"tools": [WEATHER_TOOL]}, "tool_calls"),
        ("refusal", {}, "content_filter"),
        ("pause-turn", {}, "stop"),
    ],
)
async def test_each_finish_reason(via, fake, model, fields, reason):
    answer = await via.complete(model=f"anthropic/{model}", messages=USER, **fields)
    assert answer["choices"][0]["finish_reason"] == reason
    chunks = await via.stream(model=f"anthropic/{model}", messages=USER, **fields)
    assert _finish(chunks) == reason
    if "stop" in fields:
        assert answer["choices"][0]["message"]["content"] == "echo: hello "


# ------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("model", "reason", "code", "http"),
    [
        ("anthropic/error-400", "UPSTREAM_BAD_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, 400),
        ("anthropic/error-401", "UPSTREAM_AUTH_FAILED", grpc.StatusCode.PERMISSION_DENIED, 403),
        ("claude-badkey/claude-haiku-5-5", "UPSTREAM_AUTH_FAILED", grpc.StatusCode.PERMISSION_DENIED, 403),
        ("anthropic/error-402", "UPSTREAM_AUTH_FAILED", grpc.StatusCode.PERMISSION_DENIED, 403),
        ("anthropic/error-403", "UPSTREAM_AUTH_FAILED", grpc.StatusCode.PERMISSION_DENIED, 403),
        ("anthropic/error-404", "UPSTREAM_NOT_FOUND", grpc.StatusCode.NOT_FOUND, 404),
        ("anthropic/error-413", "UPSTREAM_BAD_REQUEST", grpc.StatusCode.INVALID_ARGUMENT, 400),
        ("anthropic/error-429", "UPSTREAM_RATE_LIMITED", grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
        ("anthropic/error-500", "UPSTREAM_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, 503),
        ("anthropic/error-504", "UPSTREAM_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, 504),
        ("anthropic/error-529", "UPSTREAM_UNAVAILABLE", grpc.StatusCode.UNAVAILABLE, 503),
        ("anthropic/malformed", "UPSTREAM_MALFORMED_RESPONSE", grpc.StatusCode.UNAVAILABLE, 503),
        ("anthropic/slow", "UPSTREAM_TIMEOUT", grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    ],
)
async def test_upstream_errors(via, model, reason, code, http):
    failure = await via.failure(via.complete(model=model, messages=USER))
    assert failure.reason == reason
    assert failure.status == (code if isinstance(via, Grpc) else http)
    streamed = await via.failure(via.stream(model=model, messages=USER))
    assert streamed.reason == reason


async def test_rate_limit_keeps_the_retry_hint(stub, rest):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.CreateChatCompletion(_request({"model": "anthropic/error-429", "messages": USER}))
    hint = retry_info(caught.value)
    assert hint is not None and hint.retry_delay.seconds == 7
    with pytest.raises(openai.RateLimitError) as rest_caught:
        await rest.chat.completions.create(model="anthropic/error-429", messages=USER)
    assert rest_caught.value.response.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    ("model", "reason"), [("stream-cut", "UPSTREAM_UNAVAILABLE"), ("stream-error", "UPSTREAM_UNAVAILABLE")]
)
async def test_stream_broken_midway_is_an_error(via, model, reason):
    received: list[JSON] = []

    async def consume() -> None:
        if isinstance(via, Grpc):
            async for chunk in via.stub.StreamChatCompletion(
                _request({"model": f"anthropic/{model}", "messages": USER})
            ):
                received.append(_as_dict(chunk))
        else:
            stream = await via.client.chat.completions.create(model=f"anthropic/{model}", messages=USER, stream=True)
            async for chunk in stream:
                received.append(chunk.model_dump())

    failure = await via.failure(consume())
    assert received, "the chunks before the break are delivered"
    assert failure.reason == reason


async def test_cancelled_stream_cancels_the_upstream(stub, fake):
    call = stub.StreamChatCompletion(_request({"model": "anthropic/stream-slow", "messages": USER}))
    assert (await call.read()).choices
    call.cancel()
    await fake.wait_until(lambda: fake.cancelled_streams >= 1)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"n": 2}, "UNSUPPORTED_FEATURE"),
        ({"seed": 7}, "UNSUPPORTED_FEATURE"),
        ({"presence_penalty": 0.5}, "UNSUPPORTED_FEATURE"),
        ({"logit_bias": {"50256": -100}}, "UNSUPPORTED_FEATURE"),
        ({"logprobs": True, "top_logprobs": 2}, "UNSUPPORTED_FEATURE"),
        ({"response_format": {"type": "json_object"}}, "UNSUPPORTED_FEATURE"),
        ({"temperature": 1.5}, "INVALID_REQUEST"),
        (
            {"messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]},
            "UNSUPPORTED_FEATURE",
        ),
    ],
)
async def test_what_anthropic_cannot_do_is_refused_not_dropped(via, fake, fields, reason):
    failure = await via.failure(via.complete(**{"model": f"anthropic/{MODEL}", "messages": USER, **fields}))
    assert failure.reason == reason
    assert failure.status in (grpc.StatusCode.INVALID_ARGUMENT, 400)
    assert not fake.requests


async def test_structured_outputs_on_an_old_model_are_refused(via, fake):
    schema = {"name": "x", "schema": {"type": "object"}}
    request = {"model": "anthropic/claude-3-5-haiku-20241022", "messages": USER}
    failure = await via.failure(via.complete(**request, response_format={"type": "json_schema", "json_schema": schema}))
    assert failure.reason == "UNSUPPORTED_FEATURE"
    assert not fake.requests


# ------------------------------------------------------------------------ configuration


def test_environment_enables_anthropic():
    assert "anthropic" not in config_from_environment({}).providers
    by_key = config_from_environment({"ANTHROPIC_API_KEY": "k"}).providers["anthropic"]
    assert by_key.api_key_env == "ANTHROPIC_API_KEY" and by_key.base_url is None
    by_url = config_from_environment({"ANTHROPIC_BASE_URL": "http://proxy:8080"}).providers["anthropic"]
    assert by_url.base_url == "http://proxy:8080"


async def test_catalog_lists_the_preset_models(rest):
    models = {model.id async for model in rest.models.list()}
    assert {"anthropic/claude-sonnet-5-5", "anthropic/claude-haiku-4-5"} <= models
