"""Mistral through the gateway, over gRPC and over REST (the official openai SDK),
against a fake Mistral whose answers are checked with the official `mistralai` SDK."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
from collections.abc import AsyncIterator

import httpx
import pytest
import pytest_asyncio
from mistralai.client import Mistral, errors, models

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.config import ProviderConfig, config_from_environment
from server.providers.mistral import MistralAdapter, mistral_tool_call_id
from server.providers.registry import build_provider
from server.providers.transport import Transport
from tests.fakes.mistral_upstream import FakeMistral
from tests.helpers import chat_request
from tests.mistral_ollama_fixtures import Stack, assemble, start_stack
from tests.test_grpc_chat import WEATHER_TOOL

KEY = "mistral-test-key"
TRANSPORTS = ["grpc", "rest"]
MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")


@pytest_asyncio.fixture(scope="module")
async def fake() -> AsyncIterator[FakeMistral]:
    server = FakeMistral(api_key=KEY)
    await server.start()
    yield server
    await server.stop()


@pytest.fixture(autouse=True)
def _fresh(fake: FakeMistral) -> None:
    fake.reset()


@pytest_asyncio.fixture(scope="module")
async def stack(fake: FakeMistral, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stack]:
    providers = {
        # The base URL as people copy it for OpenAI SDKs, with /v1: the adapter copes.
        "mistral": ProviderConfig(base_url=fake.base_url + "/v1", api_key=KEY),
        "mistralbad": ProviderConfig(type="mistral", base_url=fake.base_url, api_key="wrong-key"),
    }
    running = await start_stack(providers, tmp_path_factory.mktemp("envoy-mistral"))
    yield running
    await running.stop()


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


# ----------------------------------------------------------------- the fake itself


async def test_fake_answers_parse_as_mistral_sdk_types(fake):
    sdk = Mistral(api_key=KEY, server_url=fake.base_url)
    tool = models.Tool(function=models.Function(name="get_weather", parameters={"type": "object"}))
    plain = await sdk.chat.complete_async(model="mistral-small-latest", messages=[user("hi there")])
    assert plain.choices[0].message.content == "echo: hi there" and plain.usage.total_tokens == 5
    called = await sdk.chat.complete_async(model="tools-parallel", messages=[user("x")], tools=[tool])
    assert [c.function.arguments for c in called.choices[0].message.tool_calls] == [
        '{"city": "Paris"}',
        '{"city": "London"}',
    ]
    thinking = await sdk.chat.complete_async(model="thinking", messages=[user("hi")])
    assert isinstance(thinking.choices[0].message.content[0], models.ThinkChunk)
    events = [
        e.data async for e in await sdk.chat.stream_async(model="tools-parallel", messages=[user("x")], tools=[tool])
    ]
    assert all(isinstance(e, models.CompletionChunk) for e in events)
    assert events[-1].usage.completion_tokens > 0 and events[-1].choices[0].finish_reason == "tool_calls"
    assert [c.index for c in events[-1].choices[0].delta.tool_calls] == [0, 0]  # Mistral's whole calls
    embedded = await sdk.embeddings.create_async(model="mistral-embed", inputs=["a b", "c"])
    assert isinstance(embedded, models.EmbeddingResponse) and len(embedded.data[1].embedding) == 8


async def test_fake_errors_parse_as_mistral_sdk_errors(fake):
    sdk = Mistral(api_key=KEY, server_url=fake.base_url)
    with pytest.raises(errors.HTTPValidationError) as invalid:
        await sdk.chat.complete_async(model="error-422", messages=[user("x")])
    assert invalid.value.data.detail[0].type == "extra_forbidden"
    with pytest.raises(errors.SDKError) as limited:
        await sdk.chat.complete_async(model="error-429", messages=[user("x")])
    assert limited.value.status_code == 429 and limited.value.raw_response.headers["retry-after"] == "7"
    with pytest.raises(errors.SDKError) as unauthorized:
        await Mistral(api_key="nope", server_url=fake.base_url).chat.complete_async(model="m", messages=[user("x")])
    assert unauthorized.value.status_code == 401


async def test_fake_is_as_strict_as_mistral(fake):
    url = f"{fake.base_url}/v1/chat/completions"
    async with httpx.AsyncClient(headers={"authorization": f"Bearer {KEY}"}) as client:
        top = await client.post(url, json={"model": "m", "messages": [user("x")], "user": "u"})
        named = await client.post(url, json={"model": "m", "messages": [{**user("x"), "name": "bob"}]})
        bad_id = await client.post(
            url,
            json={"model": "m", "messages": [user("x"), {"role": "tool", "content": "r", "tool_call_id": "call_1"}]},
        )
    assert top.status_code == 422 and [d["loc"] for d in top.json()["detail"]] == [["body", "user"]]
    assert named.status_code == 422 and [d["loc"] for d in named.json()["detail"]] == [
        ["body", "messages", 0, "user", "name"]
    ]
    assert bad_id.status_code == 400 and bad_id.json()["code"] == "3280"


# ------------------------------------------------------------------------- chat


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_plain_chat_translates_both_ways(stack, fake, transport):
    answer = await stack.via(transport).chat(
        model="mistral/mistral-small-latest",
        messages=[{"role": "developer", "content": "be brief"}, user("hello mistral")],
        temperature=0.3,
        seed=7,
        max_completion_tokens=64,
        stop=["\n\n"],
        user="end-user-1",
    )
    assert answer["model"] == "mistral/mistral-small-latest"
    assert answer["object"] == "chat.completion"
    choice = answer["choices"][0]
    assert choice["message"]["content"] == "echo: hello mistral" and choice["finish_reason"] == "stop"
    assert answer["usage"]["prompt_tokens"] == 4 and answer["usage"]["total_tokens"] == 7
    sent = fake.requests[-1]
    assert sent.path == "/v1/chat/completions" and sent.headers["authorization"] == f"Bearer {KEY}"
    assert sent.json == {
        "model": "mistral-small-latest",
        "messages": [{"role": "system", "content": "be brief"}, user("hello mistral")],
        "temperature": 0.3,
        "random_seed": 7,
        "max_tokens": 64,
        "stop": ["\n\n"],
        "stream": False,
    }


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_multi_turn_tool_use_with_foreign_tool_call_ids(stack, fake, transport):
    via = stack.via(transport)
    first = await via.chat(
        model="mistral/tools", messages=[user("weather in Paris?")], tools=[WEATHER_TOOL], tool_choice="required"
    )
    assert fake.requests[-1].json["tool_choice"] == "any"
    choice = first["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and not choice["message"].get("content")
    call = choice["message"]["tool_calls"][0]
    assert MISTRAL_ID.fullmatch(call["id"]) and call["type"] == "function"
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}

    # The conversation goes on with an id minted elsewhere (an OpenAI-style id).
    foreign = {**call, "id": "call_Xyz_0123456789abcdef"}
    second = await via.chat(
        model="mistral/tools",
        messages=[
            user("weather in Paris?"),
            {"role": "assistant", "tool_calls": [foreign]},
            {"role": "tool", "tool_call_id": foreign["id"], "content": "sunny, 21C"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert second["choices"][0]["message"]["content"] == "tool result: sunny, 21C"
    sent = fake.requests[-1].json["messages"]
    mapped = mistral_tool_call_id(foreign["id"])
    assert MISTRAL_ID.fullmatch(mapped)
    assert sent[1] == {
        "role": "assistant",
        "tool_calls": [{"id": mapped, "type": "function", "function": foreign["function"]}],
    }
    assert sent[2] == {"role": "tool", "content": "sunny, 21C", "tool_call_id": mapped}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_text_and_usage_only_when_asked(stack, fake, transport):
    via = stack.via(transport)
    plain = assemble(await via.stream(model="mistral/mistral-small-latest", messages=[user("one two three")]))
    assert plain.content == "echo: one two three" and plain.roles == ["assistant"]
    assert plain.finish_reasons == ["stop"] and plain.usage is None and len(plain.ids) == 1
    sent = fake.requests[-1].json
    assert sent["stream"] is True and "stream_options" not in sent

    counted = assemble(
        await via.stream(
            model="mistral/mistral-small-latest",
            messages=[user("one two three")],
            stream_options={"include_usage": True},
        )
    )
    assert counted.content == plain.content
    assert counted.usage["prompt_tokens"] == 3 and counted.usage["completion_tokens"] == 4
    assert counted.usage["total_tokens"] == 7


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_usage_chunk_is_last_and_has_no_choices(stack, transport):
    chunks = await stack.via(transport).stream(
        model="mistral/mistral-small-latest", messages=[user("a b")], stream_options={"include_usage": True}
    )
    assert not chunks[-1]["choices"] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(not c.get("usage") for c in chunks[:-1])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_parallel_tool_calls_get_their_own_indices(stack, transport):
    answer = assemble(
        await stack.via(transport).stream(model="mistral/tools-parallel", messages=[user("x")], tools=[WEATHER_TOOL])
    )
    assert answer.finish_reasons == ["tool_calls"]
    assert sorted(answer.tool_calls) == [0, 1]
    first, second = answer.tool_calls[0], answer.tool_calls[1]
    assert first["arguments"] == '{"city": "Paris"}' and second["arguments"] == '{"city": "London"}'
    assert first["name"] == second["name"] == "get_weather"
    assert first["id"] != second["id"] and MISTRAL_ID.fullmatch(first["id"])


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_fragmented_tool_call_reassembles_exactly(stack, transport):
    answer = assemble(
        await stack.via(transport).stream(model="mistral/tools-fragmented", messages=[user("x")], tools=[WEATHER_TOOL])
    )
    assert list(answer.tool_calls) == [0]
    call = answer.tool_calls[0]
    assert call["arguments"] == '{"city": "Paris"}' and call["pieces"] > 2
    assert call["name"] == "get_weather" and MISTRAL_ID.fullmatch(call["id"])


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(("model", "reason"), [("length", "length"), ("model-length", "length")])
async def test_finish_reasons(stack, transport, model, reason):
    via = stack.via(transport)
    answer = await via.chat(model=f"mistral/{model}", messages=[user("a b c d")])
    assert answer["choices"][0]["finish_reason"] == reason
    streamed = assemble(await via.stream(model=f"mistral/{model}", messages=[user("a b c d")]))
    assert streamed.finish_reasons == [reason] and streamed.content == "echo: a"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_finish_reason_error_is_an_upstream_failure(stack, transport):
    via = stack.via(transport)
    failure = await via.chat_failure(model="mistral/finish-error", messages=[user("a b c")])
    assert failure.reason == "UPSTREAM_UNAVAILABLE" and failure.status == failure.expected_status(transport)
    streamed = await via.stream_failure(model="mistral/finish-error", messages=[user("a b c")])
    assert streamed.reason == "UPSTREAM_UNAVAILABLE" and "finish_reason 'error'" in streamed.message
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in streamed.chunks if c["choices"]) == "echo: a"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_thinking_chunks_become_reasoning_content(stack, transport):
    via = stack.via(transport)
    answer = await via.chat(model="mistral/thinking", messages=[user("hi")])
    message = answer["choices"][0]["message"]
    assert message["content"] == "echo: hi" and message["reasoning_content"] == "the user said hi"
    streamed = assemble(await via.stream(model="mistral/thinking", messages=[user("hi")]))
    assert streamed.content == "echo: hi" and streamed.reasoning == "the user said hi"


async def test_vision_and_json_schema_requests(stack, fake):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}}
    await stack.rest.chat(
        model="mistral/pixtral-12b",
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is this?"},
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
                ],
            }
        ],
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": schema, "strict": True}},
    )
    sent = fake.requests[-1].json
    assert sent["messages"][0]["content"][1] == {
        "type": "image_url",
        "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"},
    }
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "n", "schema": schema, "strict": True},
    }


# ----------------------------------------------------------------------- errors


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    ("model", "reason", "message"),
    [
        ("mistral/error-400", "UPSTREAM_BAD_REQUEST", "Invalid model"),
        ("mistral/error-401", "UPSTREAM_AUTH_FAILED", "Unauthorized"),
        ("mistralbad/mistral-small-latest", "UPSTREAM_AUTH_FAILED", "Unauthorized"),
        ("mistral/error-403", "UPSTREAM_AUTH_FAILED", "Forbidden"),
        ("mistral/error-404", "UPSTREAM_NOT_FOUND", "Not Found"),
        ("mistral/error-422", "UPSTREAM_BAD_REQUEST", "body.scenario: Extra inputs are not permitted"),
        ("mistral/error-429", "UPSTREAM_RATE_LIMITED", "rate limit"),
        ("mistral/error-500", "UPSTREAM_UNAVAILABLE", "Internal server error"),
        ("mistral/error-503", "UPSTREAM_UNAVAILABLE", "Service unavailable"),
        ("mistral/slow", "UPSTREAM_TIMEOUT", "in time"),
        ("mistral/malformed", "UPSTREAM_MALFORMED_RESPONSE", "invalid JSON"),
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
    failure = await stack.via(transport).chat_failure(model="mistral/error-429", messages=[user("x")])
    assert failure.retry_after == "7"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_cut_in_the_middle(stack, transport):
    failure = await stack.via(transport).stream_failure(model="mistral/stream-cut", messages=[user("a b c d")])
    assert failure.reason == "UPSTREAM_UNAVAILABLE"
    assert failure.chunks and failure.chunks[0]["choices"][0]["delta"]["role"] == "assistant"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_unsupported_fields_are_refused_before_mistral(stack, fake, transport):
    failure = await stack.via(transport).chat_failure(
        model="mistral/mistral-small-latest", messages=[user("x")], logit_bias={"42": 5}
    )
    assert failure.reason == "UNSUPPORTED_FEATURE" and failure.status == failure.expected_status(transport)
    assert "logit_bias" in failure.message and fake.requests == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_logprobs_are_refused_before_mistral_but_false_is_the_default(stack, fake, transport):
    via = stack.via(transport)
    failure = await via.chat_failure(model="mistral/mistral-small-latest", messages=[user("x")], logprobs=True)
    assert failure.reason == "UNSUPPORTED_FEATURE" and "logprobs" in failure.message and fake.requests == []
    answer = await via.chat(model="mistral/mistral-small-latest", messages=[user("x")], logprobs=False)
    assert answer["choices"][0]["message"]["content"] and "logprobs" not in fake.requests[-1].json


async def test_client_cancellation_closes_the_upstream_stream(stack, fake):
    call = chat_grpc.ChatServiceStub(stack.channel).StreamChatCompletion(
        chat_request(model="mistral/stream-slow", text="one two three four five six seven")
    )
    first = await call.read()
    assert first.choices[0].delta.role == "assistant"
    call.cancel()
    async with asyncio.timeout(5):
        while fake.cancelled_streams == 0:  # noqa: ASYNC110 - the fake counts, nothing to await
            await asyncio.sleep(0.02)


# ------------------------------------------------------------------- embeddings


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_embeddings_float_and_base64(stack, fake, transport):
    via = stack.via(transport)
    floats = await via.embed(model="mistral/codestral-embed", input=["a b", "c"], dimensions=4, encoding_format="float")
    assert [d["index"] for d in floats["data"]] == [0, 1] and len(floats["data"][0]["embedding"]) == 4
    assert floats["usage"]["prompt_tokens"] == 3 and floats["model"] == "mistral/codestral-embed"
    assert fake.requests[-1].json == {"model": "codestral-embed", "input": ["a b", "c"], "output_dimension": 4}

    packed = await via.embed(model="mistral/codestral-embed", input="a b", dimensions=4, encoding_format="base64")
    decoded = struct.unpack("<4f", base64.b64decode(packed["data"][0]["embedding"]))
    assert decoded == pytest.approx(floats["data"][0]["embedding"], rel=1e-6)
    assert "encoding_format" not in fake.requests[-1].json


async def test_embeddings_default_of_the_openai_sdk(stack):
    # The openai SDK asks for base64 by default and decodes it: the floats must survive.
    result = await stack.oai.embeddings.create(model="mistral/mistral-embed", input="a b")
    assert len(result.data[0].embedding) == 8 and all(isinstance(v, float) for v in result.data[0].embedding)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_embeddings_of_token_arrays_are_refused(stack, fake, transport):
    failure = await stack.via(transport).embed_failure(model="mistral/mistral-embed", input=[[1, 2, 3]])
    assert failure.reason == "UNSUPPORTED_FEATURE" and fake.requests == []


# ----------------------------------------------------------------------- config


async def test_environment_enables_mistral_with_its_defaults(monkeypatch):
    monkeypatch.setenv("MISTRAL_API_KEY", "from-env")
    config = config_from_environment({"MISTRAL_API_KEY": "from-env"})
    assert config.providers["mistral"].api_key_env == "MISTRAL_API_KEY"
    async with Transport() as transport:
        adapter = build_provider("mistral", config.providers["mistral"], transport)
    assert isinstance(adapter, MistralAdapter)
    assert adapter._base_url == "https://api.mistral.ai"
    assert adapter._http.headers["authorization"] == "Bearer from-env"
    assert "mistral" not in config_from_environment({}).providers


def test_tool_call_ids_are_stable_and_valid():
    assert mistral_tool_call_id("abcDEF123") == "abcDEF123"
    mapped = mistral_tool_call_id("toolu_01VpEm654HvfMoRcrE3Hgdc6")
    assert MISTRAL_ID.fullmatch(mapped) and mapped == mistral_tool_call_id("toolu_01VpEm654HvfMoRcrE3Hgdc6")
    assert mapped != mistral_tool_call_id("toolu_01VpEm654HvfMoRcrE3Hgdc7")
