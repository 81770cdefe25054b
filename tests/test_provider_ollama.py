"""Ollama (native API) through the gateway, over gRPC and over REST (the official
openai SDK), against a fake Ollama whose answers are checked against the documented
wire format (pydantic models in tests/fakes/ollama_upstream.py)."""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio

from server.config import ProviderConfig, config_from_environment
from server.providers.ollama import OllamaAdapter, ollama_base_url
from server.providers.registry import build_provider
from server.providers.transport import Transport
from tests.fakes.ollama_upstream import ChatResponse, EmbedResponse, ErrorResponse, FakeOllama
from tests.mistral_ollama_fixtures import Stack, assemble, start_stack
from tests.test_grpc_chat import WEATHER_TOOL

TRANSPORTS = ["grpc", "rest"]
PNG = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOllama]:
    server = FakeOllama()
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeOllama) -> None:
    fake.reset()


@pytest_asyncio.fixture(scope="module")
async def stack(fake: FakeOllama, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    # The base URL as OLLAMA_HOST gives it: host:port, no scheme, no key.
    providers = {"ollama": ProviderConfig(base_url=fake.host)}
    running = await start_stack(providers, tmp_path_factory.mktemp("envoy-ollama"))
    yield running
    await running.stop()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ----------------------------------------------------------------- the fake itself


async def test_fake_answers_have_the_documented_shapes(fake):
    async with httpx.AsyncClient(base_url=fake.base_url) as client:
        whole = await client.post("/api/chat", json={"model": "llama3.2", "messages": [user("hi")], "stream": False})
        streamed = await client.post(
            "/api/chat", json={"model": "tools", "messages": [user("hi")], "tools": [WEATHER_TOOL]}
        )
        embedded = await client.post("/api/embed", json={"model": "nomic-embed-text", "input": ["a", "b c"]})
        missing = await client.post("/api/chat", json={"model": "nope", "messages": [user("hi")]})
        unknown_field = await client.post("/api/chat", json={"model": "llama3.2", "messages": [user("hi")], "n": 2})
    assert ChatResponse.model_validate(whole.json()).message.content == "echo: hi"
    lines = [ChatResponse.model_validate_json(line) for line in streamed.text.splitlines()]
    assert streamed.headers["content-type"] == "application/x-ndjson"
    assert lines[0].message.tool_calls[0].function.arguments == {"city": "Paris"}
    assert lines[-1].done and lines[-1].done_reason == "stop" and lines[-1].eval_count > 0
    assert EmbedResponse.model_validate(embedded.json()).prompt_eval_count == 3
    assert missing.status_code == 404
    assert ErrorResponse.model_validate(missing.json()).error == 'model "nope" not found, try pulling it first'
    assert unknown_field.status_code == 400 and "n" in unknown_field.json()["error"]


# ------------------------------------------------------------------------- chat


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_plain_chat_translates_both_ways(stack, fake, transport):
    answer = await stack.via(transport).chat(
        model="ollama/llama3.2",
        messages=[{"role": "developer", "content": "be brief"}, user("hello ollama")],
        temperature=0.3,
        seed=7,
        max_completion_tokens=64,
        stop="\n\n",
        user="end-user-1",
    )
    assert answer["model"] == "ollama/llama3.2" and answer["id"].startswith("chatcmpl-")
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "echo: hello ollama" and choice["finish_reason"] == "stop"
    assert answer["usage"] == {
        **answer["usage"],
        "prompt_tokens": 4,
        "completion_tokens": 3,
        "total_tokens": 7,
    }
    assert answer["created"] == 1721680408  # Ollama's created_at
    sent = fake.requests[-1]
    assert sent.path == "/api/chat" and "authorization" not in sent.headers
    assert sent.json == {
        "model": "llama3.2",
        "messages": [{"role": "system", "content": "be brief"}, user("hello ollama")],
        "stream": False,
        "options": {"temperature": 0.3, "seed": 7, "num_predict": 64, "stop": ["\n\n"]},
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_multi_turn_tool_use(stack, fake, transport):
    via = stack.via(transport)
    strict_tool = {**WEATHER_TOOL, "function": {**WEATHER_TOOL["function"], "strict": True}}
    first = await via.chat(model="ollama/tools", messages=[user("weather in Paris?")], tools=[strict_tool])
    assert fake.requests[-1].json["tools"] == [WEATHER_TOOL]  # Ollama's tool shape: no `strict`
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content")
    call = choice["message"]["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    second = await via.chat(
        model="ollama/tools",
        messages=[
            user("weather in Paris?"),
            {"role": "assistant", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 21C"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert second["choices"][0]["message"]["content"] == "tool result: get_weather=sunny, 21C"
    sent = fake.requests[-1].json["messages"]
    assert sent[1] == {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
    }
    assert sent[2] == {"role": "tool", "content": "sunny, 21C", "tool_name": "get_weather"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_text_and_usage_only_when_asked(stack, fake, transport):
    via = stack.via(transport)
    plain = assemble(await via.stream(model="ollama/llama3.2", messages=[user("one two three")]))
    assert plain.content == "echo: one two three" and plain.roles == ["assistant"]
    assert plain.finish_reasons == ["stop"] and plain.usage is None and len(plain.ids) == 1
    assert fake.requests[-1].json["stream"] is True

    chunks = await via.stream(
        model="ollama/llama3.2", messages=[user("one two three")], stream_options={"include_usage": True}
    )
    counted = assemble(chunks)
    assert counted.content == plain.content and not chunks[-1]["choices"]
    assert counted.usage["prompt_tokens"] == 3 and counted.usage["completion_tokens"] == 4
    assert counted.usage["total_tokens"] == 7


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_tool_calls_reassemble_exactly(stack, transport):
    answer = assemble(
        await stack.via(transport).stream(model="ollama/tools-parallel", messages=[user("x")], tools=[WEATHER_TOOL])
    )
    assert answer.finish_reasons == ["tool_calls"] and sorted(answer.tool_calls) == [0, 1]
    first, second = answer.tool_calls[0], answer.tool_calls[1]
    assert first["arguments"] == '{"city": "Paris"}' and second["arguments"] == '{"city": "London"}'
    assert first["name"] == second["name"] == "get_weather" and first["id"] != second["id"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_finish_reason_length(stack, fake, transport):
    via = stack.via(transport)
    answer = await via.chat(model="ollama/llama3.2", messages=[user("a b c d")], max_tokens=2)
    assert answer["choices"][0]["finish_reason"] == "length"
    assert answer["choices"][0]["message"]["content"] == "echo: a"
    assert fake.requests[-1].json["options"] == {"num_predict": 2}
    streamed = assemble(await via.stream(model="ollama/llama3.2", messages=[user("a b c d")], max_tokens=2))
    assert streamed.finish_reasons == ["length"] and streamed.content == "echo: a"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_thinking_becomes_reasoning_content(stack, fake, transport):
    via = stack.via(transport)
    answer = await via.chat(model="ollama/thinking", messages=[user("hi")], reasoning_effort="high")
    assert fake.requests[-1].json["think"] == "high"
    message = answer["choices"][0]["message"]
    assert message["content"] == "echo: hi" and message["reasoning_content"] == "the user said something"
    streamed = assemble(await via.stream(model="ollama/thinking", messages=[user("hi")], reasoning_effort="minimal"))
    assert fake.requests[-1].json["think"] == "low"
    assert streamed.reasoning == "the user said something" and streamed.content == "echo: hi"


async def test_images_go_as_base64_and_urls_are_refused(stack, fake):
    parts = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{PNG}"}},
    ]
    answer = await stack.rest.chat(model="ollama/llava", messages=[{"role": "user", "content": parts}])
    assert answer["choices"][0]["message"]["content"] == "echo: what is this? (and 1 image)"
    assert fake.requests[-1].json["messages"] == [{"role": "user", "content": "what is this?", "images": [PNG]}]

    fake.reset()
    remote = [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]
    failure = await stack.rest.chat_failure(model="ollama/llava", messages=[{"role": "user", "content": remote}])
    assert failure.reason == "UNSUPPORTED_FEATURE" and "data: URLs" in failure.message and fake.requests == []


async def test_response_formats_become_ollama_format(stack, fake):
    await stack.rest.chat(model="ollama/llama3.2", messages=[user("x")], response_format={"type": "json_object"})
    assert fake.requests[-1].json["format"] == "json"
    schema = {"type": "object", "properties": {"echo": {"type": "string"}}, "required": ["echo"]}
    answer = await stack.grpc.chat(
        model="ollama/llama3.2",
        messages=[user("x")],
        response_format={"type": "json_schema", "json_schema": {"name": "e", "schema": schema}},
    )
    assert fake.requests[-1].json["format"] == schema
    assert json.loads(answer["choices"][0]["message"]["content"]) == {"echo": "x"}


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "reason", "message"),
    [
        ("ollama/error-400", "UPSTREAM_BAD_REQUEST", "does not support tools"),
        ("ollama/error-401", "UPSTREAM_AUTH_FAILED", "unauthorized"),
        ("ollama/error-403", "UPSTREAM_AUTH_FAILED", "forbidden"),
        ("ollama/mistral-nemo", "UPSTREAM_NOT_FOUND", 'model "mistral-nemo" not found, try pulling it first'),
        ("ollama/error-429", "UPSTREAM_RATE_LIMITED", "too many requests"),
        ("ollama/error-500", "UPSTREAM_UNAVAILABLE", "llama runner process has terminated"),
        ("ollama/error-502", "UPSTREAM_UNAVAILABLE", "bad gateway"),
        ("ollama/error-503", "UPSTREAM_UNAVAILABLE", "server busy"),
        ("ollama/slow", "UPSTREAM_TIMEOUT", "in time"),
        ("ollama/malformed", "UPSTREAM_MALFORMED_RESPONSE", "invalid JSON"),
    ],
)
async def test_upstream_errors(stack, transport, model, reason, message):
    via = stack.via(transport)
    failure = await via.chat_failure(model=model, messages=[user("x")])
    assert failure.reason == reason and failure.status == failure.expected_status(transport)
    assert message in failure.message
    streamed = await via.stream_failure(model=model, messages=[user("x")])
    assert streamed.reason == reason and message in streamed.message


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rate_limit_keeps_the_retry_hint(stack, transport):
    failure = await stack.via(transport).chat_failure(model="ollama/error-429", messages=[user("x")])
    assert failure.retry_after == "7"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "message"), [("stream-cut", "could not be reached"), ("stream-error", "unexpected EOF")]
)
async def test_stream_failures_in_the_middle(stack, transport, model, message):
    failure = await stack.via(transport).stream_failure(model=f"ollama/{model}", messages=[user("a b c d")])
    assert failure.reason == "UPSTREAM_UNAVAILABLE" and message in failure.message
    assert failure.chunks and failure.chunks[0]["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("fields", "feature"),
    [
        ({"n": 2}, "n > 1"),
        ({"tools": [WEATHER_TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"logit_bias": {"42": 5}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [WEATHER_TOOL], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ],
)
async def test_unsupported_features_are_refused_before_ollama(stack, fake, transport, fields, feature):
    failure = await stack.via(transport).chat_failure(model="ollama/llama3.2", messages=[user("x")], **fields)
    assert failure.reason == "UNSUPPORTED_FEATURE" and failure.status == failure.expected_status(transport)
    assert feature in failure.message and fake.requests == []


async def test_tool_choice_none_sends_no_tools(stack, fake):
    await stack.rest.chat(model="ollama/tools", messages=[user("x")], tools=[WEATHER_TOOL], tool_choice="none")
    assert "tools" not in fake.requests[-1].json


# ------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_embeddings_float_and_base64(stack, fake, transport):
    via = stack.via(transport)
    floats = await via.embed(model="ollama/nomic-embed-text", input=["a b", "c"], dimensions=4, encoding_format="float")
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(floats["data"][1]["embedding"]) == 4
    assert floats["usage"]["prompt_tokens"] == 3 and floats["model"] == "ollama/nomic-embed-text"
    assert fake.requests[-1].json == {
        "model": "nomic-embed-text",
        "input": ["a b", "c"],
        "truncate": False,
        "dimensions": 4,
    }

    packed = await via.embed(model="ollama/nomic-embed-text", input="a b", dimensions=4, encoding_format="base64")
    decoded = struct.unpack("<4f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("fields", "feature"),
    [({"model": "ollama/old-embed", "input": "a", "dimensions": 4}, "dimensions"), ({"input": [[1, 2]]}, "token")],
)
async def test_embeddings_that_cannot_be_honoured(stack, transport, fields, feature):
    request = {"model": "ollama/nomic-embed-text", **fields}
    failure = await stack.via(transport).embed_failure(**request)
    assert failure.reason == "UNSUPPORTED_FEATURE" and feature in failure.message


# ----------------------------------------------------------------------- config


@pytest.mark.parametrize(
    ("host", "url"),
    [
        (None, "http://127.0.0.1:11434"),
        ("", "http://127.0.0.1:11434"),
        ("1.2.3.4", "http://1.2.3.4:11434"),
        (":56789", "http://127.0.0.1:56789"),
        ("example.com:56789", "http://example.com:56789"),
        ("http://example.com", "http://example.com:80"),
        ("https://example.com", "https://example.com:443"),
        ("https://example.com:56789/path/", "https://example.com:56789/path"),
        ("[0001:002:003:0004::1]:56789", "http://[0001:002:003:0004::1]:56789"),
    ],
)
def test_ollama_host_is_read_like_the_official_client(host, url):
    assert ollama_base_url(host) == url


async def test_environment_enables_ollama_by_its_host(monkeypatch):
    monkeypatch.setenv("OLLAMA_API_KEY", "cloud-key")
    config = config_from_environment({"OLLAMA_HOST": "0.0.0.0:11500"})
    async with Transport() as transport:
        adapter = build_provider("ollama", config.providers["ollama"], transport)
        local = build_provider("ollama", ProviderConfig(base_url="localhost"), transport)
    assert isinstance(adapter, OllamaAdapter) and adapter._base_url == "http://0.0.0.0:11500"
    assert adapter._http.headers["authorization"] == "Bearer cloud-key"
    assert local._base_url == "http://localhost:11434"
    assert "ollama" not in config_from_environment({"OLLAMA_API_KEY": "k"}).providers
