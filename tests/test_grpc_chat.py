"""ChatService over gRPC, against the real server and the fake OpenAI upstream."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from tests.helpers import chat_request, error_info, retry_info, value

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "minLength": 1}},
            "required": ["city"],
        },
    },
}


@pytest.fixture
def chat(channel: grpc.aio.Channel) -> chat_grpc.ChatServiceStub:
    return chat_grpc.ChatServiceStub(channel)


async def test_completion_is_translated_both_ways(chat, fake_openai):
    response = await chat.CreateChatCompletion(chat_request(text="ping", temperature=0.7, seed=42, user="u1"))

    assert response.object == "chat.completion"
    assert response.model.startswith("openai/")
    assert response.choices[0].message.role == "assistant"
    assert "ping" in response.choices[0].message.content
    assert response.choices[0].finish_reason == "stop"
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens > 0
    sent = fake_openai.requests[-1]
    assert sent.path == "/v1/chat/completions"
    assert sent.headers["authorization"] == "Bearer sk-fake"
    assert sent.json["model"] == "gpt-4o-mini"
    assert sent.json["messages"] == [{"role": "user", "content": "ping"}]
    assert sent.json["temperature"] == 0.7
    assert sent.json["seed"] == 42 and isinstance(sent.json["seed"], int)
    assert sent.json["user"] == "u1"
    assert "stream" not in sent.json


async def test_alias_resolves_to_its_target(chat, fake_openai):
    response = await chat.CreateChatCompletion(chat_request(model="fast"))
    assert fake_openai.requests[-1].json["model"] == "gpt-4o-mini"
    assert response.model.startswith("openai/gpt-4o-mini")


async def test_content_parts_and_tool_schema_reach_upstream_unchanged(chat, fake_openai):
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
    ]
    request = chat_pb.CreateChatCompletionRequest(
        model="openai/gpt-4o",
        messages=[chat_pb.ChatMessage(role="user", content=value(parts))],
    )
    tool = dict(WEATHER_TOOL)
    tool["function"] = {**WEATHER_TOOL["function"], "parameters": {"type": "array", "minItems": 2}}
    request.tools.add().CopyFrom(chat_request(tools=[tool]).tools[0])
    await chat.CreateChatCompletion(request)
    sent = fake_openai.requests[-1].json
    assert sent["messages"][0]["content"] == parts
    # Struct stores numbers as doubles; the gateway must send 2, not 2.0.
    parameters = sent["tools"][0]["function"]["parameters"]
    assert parameters == {"type": "array", "minItems": 2}
    assert isinstance(parameters["minItems"], int)


async def test_multi_turn_tool_use(chat, fake_openai):
    first = await chat.CreateChatCompletion(
        chat_request(model="openai/tools", text="weather in Paris?", tools=[WEATHER_TOOL])
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert not choice.message.HasField("content")

    follow_up = chat_request(model="openai/tools", text="weather in Paris?", tools=[WEATHER_TOOL])
    follow_up.messages.add(role="assistant", tool_calls=[call])
    follow_up.messages.add(role="tool", tool_call_id=call.id, content=value("sunny, 21C"))
    second = await chat.CreateChatCompletion(follow_up)
    assert second.choices[0].finish_reason == "stop"
    assert "sunny, 21C" in second.choices[0].message.content
    sent = fake_openai.requests[-1].json["messages"]
    assert sent[1]["tool_calls"][0]["id"] == call.id
    assert sent[2] == {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21C"}


@pytest.mark.parametrize(
    ("model", "reason"), [("openai/length", "length"), ("openai/content-filter", "content_filter")]
)
async def test_finish_reasons(chat, model, reason):
    response = await chat.CreateChatCompletion(chat_request(model=model))
    assert response.choices[0].finish_reason == reason


async def test_stream_text_hides_usage_unless_asked(chat, fake_openai):
    chunks = [c async for c in chat.StreamChatCompletion(chat_request(text="one two three"))]
    assert len(chunks) > 2
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert "one two three" in text
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(not c.HasField("usage") for c in chunks)
    assert all(c.object == "chat.completion.chunk" and c.model.startswith("openai/") for c in chunks)
    assert len({c.id for c in chunks}) == 1
    # Billing needs usage: it is always asked for upstream.
    assert fake_openai.requests[-1].json["stream_options"] == {"include_usage": True}


async def test_stream_with_include_usage_ends_with_usage_chunk(chat):
    request = chat_request(text="count my tokens", stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in chat.StreamChatCompletion(request)]
    last = chunks[-1]
    assert not last.choices
    assert last.usage.completion_tokens > 0 and last.usage.total_tokens > last.usage.completion_tokens


async def test_stream_tool_call_arguments_reassemble_exactly(chat):
    request = chat_request(model="openai/tools-parallel", text="weather?", tools=[WEATHER_TOOL])
    calls: dict[int, dict[str, str]] = {}
    finish = None
    async for chunk in chat.StreamChatCompletion(request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                if delta.HasField("id"):
                    call["id"] = delta.id
                if delta.function.HasField("name"):
                    call["name"] = delta.function.name
                call["arguments"] += delta.function.arguments
            if choice.HasField("finish_reason"):
                finish = choice.finish_reason
    assert finish == "tool_calls"
    assert len(calls) >= 2
    for call in calls.values():
        assert call["id"] and call["name"] == "get_weather"
        assert isinstance(json.loads(call["arguments"]), dict)


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("openai/error-400", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST"),
        ("openai/error-401", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
        ("openai/error-403", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
        ("openai/error-404", grpc.StatusCode.NOT_FOUND, "UPSTREAM_NOT_FOUND"),
        ("openai/error-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        ("openai/error-500", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("openai/error-503", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("openai/malformed", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_MALFORMED_RESPONSE"),
        ("openai/slow", grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"),
        ("badkey/gpt-4o", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
    ],
)
async def test_upstream_errors_map_to_codes_with_error_info(chat, model, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(chat_request(model=model))
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason and info.domain == "hub.aigne.io"
    assert info.metadata["provider"] == model.split("/")[0]
    assert caught.value.details()


async def test_upstream_rate_limit_keeps_retry_hint(chat):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(chat_request(model="openai/error-429"))
    hint = retry_info(caught.value)
    assert hint is not None and hint.retry_delay.seconds == 7
    assert ("retry-after", "7") in tuple(caught.value.trailing_metadata())
    assert error_info(caught.value).metadata["retry_after_seconds"] == "7"


@pytest.mark.parametrize(
    ("request_fields", "code", "field"),
    [
        ({"model": "openai/gpt-4o", "messages": []}, grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "wizard", "content": "x"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].role",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "user"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].content",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "tool", "content": "x"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].tool_call_id",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": 5}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "messages[0].content",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": 3},
            grpc.StatusCode.INVALID_ARGUMENT,
            "temperature",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}], "stop": [1]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "stop",
        ),
        (
            {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}], "tool_choice": "sometimes"},
            grpc.StatusCode.INVALID_ARGUMENT,
            "tool_choice",
        ),
        (
            {
                "model": "openai/gpt-4o",
                "messages": [{"role": "user", "content": "x"}],
                "response_format": {"type": "yaml"},
            },
            grpc.StatusCode.INVALID_ARGUMENT,
            "response_format.type",
        ),
        ({"model": "", "messages": [{"role": "user", "content": "x"}]}, grpc.StatusCode.INVALID_ARGUMENT, "model"),
        ({"model": "gpt-nowhere", "messages": [{"role": "user", "content": "x"}]}, grpc.StatusCode.NOT_FOUND, "model"),
        (
            {"model": "nosuch/gpt-4o", "messages": [{"role": "user", "content": "x"}]},
            grpc.StatusCode.NOT_FOUND,
            "model",
        ),
        (
            # A known provider without a credential: a precondition, and the message says
            # which variable to set.
            {"model": "anthropic/claude", "messages": [{"role": "user", "content": "x"}]},
            grpc.StatusCode.FAILED_PRECONDITION,
            "model",
        ),
        (
            {"model": "openai/text-embedding-3-small", "messages": [{"role": "user", "content": "x"}]},
            grpc.StatusCode.INVALID_ARGUMENT,
            None,
        ),
    ],
)
async def test_bad_requests_name_the_problem(chat, fake_openai, request_fields, code, field):
    from google.protobuf import json_format

    request = json_format.ParseDict(request_fields, chat_pb.CreateChatCompletionRequest())
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(request)
    assert caught.value.code() == code
    if field is not None:
        assert error_info(caught.value).metadata["field"] == field
    assert not fake_openai.requests, "a rejected request must not reach the upstream"


async def test_stream_flag_must_match_method(chat):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(chat_request(stream=True))
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "StreamChatCompletion" in caught.value.details()


async def test_stream_cut_midway_is_an_error_not_a_short_answer(chat):
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in chat.StreamChatCompletion(chat_request(model="openai/stream-cut")):
            received.append(chunk)
    assert received, "the chunks before the cut are delivered"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"


async def test_stream_error_event_midway_is_an_error(chat):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in chat.StreamChatCompletion(chat_request(model="openai/stream-error")):
            pass
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_stream_error_before_first_chunk_is_the_status(chat):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in chat.StreamChatCompletion(chat_request(model="openai/error-429")):
            pass
    assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_cancelled_stream_cancels_upstream(chat, fake_openai):
    call = chat.StreamChatCompletion(chat_request(model="openai/stream-slow", text="a b c d e f g h"))
    first = await call.read()
    assert first.choices
    call.cancel()
    for _ in range(100):
        if fake_openai.cancelled_streams:
            break
        await asyncio.sleep(0.02)
    assert fake_openai.cancelled_streams >= 1
