"""The Gemini adapter, end to end: gRPC and REST (official openai SDK) in front, a fake
Gemini Developer API behind, whose answers are checked against the official google-genai
SDK's types and client so that the fake cannot drift from the real API.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
from google import genai
from google.genai import errors as genai_errors
from google.genai import types
from google.protobuf import json_format, struct_pb2

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import embedding_service_pb2_grpc as embedding_grpc
from server import errors
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings, config_from_environment
from server.providers.gemini import GeminiAdapter, mint_call_id, read_call_id
from server.providers.registry import SPECS, build_provider, catalog_models
from server.providers.transport import Transport
from tests.conftest import SINGLE_ATTEMPT, Bridge, start_bridge
from tests.fakes.gemini_upstream import CACHED_TOKENS, RETRY_DELAY_SECONDS, THOUGHT_TOKENS, FakeGemini
from tests.helpers import error_info, retry_info

KEY = "gm-test-key"
WEATHER_SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1}},
    "required": ["city"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather in a city", "parameters": WEATHER_SCHEMA},
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
ID_PATTERN = re.compile(r"call_[0-9a-f]{16}(_[A-Za-z0-9_-]+)?")


# ------------------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module")
async def gemini_fake() -> AsyncIterator[FakeGemini]:
    fake = FakeGemini(api_key=KEY, slow_seconds=5.0, chunk_delay=0.3)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(autouse=True)
def _reset_gemini_fake(request: pytest.FixtureRequest) -> None:
    """Each test sees only its own upstream requests."""
    if "gemini_fake" in request.fixturenames:
        request.getfixturevalue("gemini_fake").reset()


@pytest_asyncio.fixture(scope="module")
async def gemini_gateway(gemini_fake: FakeGemini) -> AsyncIterator[Gateway]:
    providers = {
        "gemini": ProviderConfig(type="gemini", base_url=gemini_fake.base_url, api_key=KEY),
        # The same fake behind a wrong key: Google answers it with 400 API_KEY_INVALID.
        "geminibad": ProviderConfig(type="gemini", base_url=gemini_fake.base_url, api_key="wrong-key"),
    }
    settings = Settings(grpc_port=0, auth_required=False, upstream_read_timeout_s=2.0, shutdown_grace_s=1.0)
    gateway = await start_gateway(settings, GatewayConfig(providers=providers, routing=SINGLE_ATTEMPT))
    yield gateway
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def gemini_channel(gemini_gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gemini_gateway.port}") as channel:
        yield channel


@pytest.fixture
def chat(gemini_channel: grpc.aio.Channel) -> chat_grpc.ChatServiceStub:
    return chat_grpc.ChatServiceStub(gemini_channel)


@pytest_asyncio.fixture(scope="module")
async def gemini_bridge(gemini_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(gemini_gateway.port, tmp_path_factory.mktemp("gemini-envoy"))
    yield bridge
    await bridge.envoy.stop()


@pytest_asyncio.fixture(scope="module")
async def oai(gemini_bridge: Bridge) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(base_url=f"{gemini_bridge.rest_url}/v1", api_key="x", max_retries=0, timeout=20)
    yield client
    await client.close()


@pytest.fixture
def sdk(gemini_fake: FakeGemini) -> genai.Client:
    """The official google-genai SDK pointed at the fake, on the adapter's API version."""
    options = types.HttpOptions(base_url=gemini_fake.base_url, api_version="v1beta")
    return genai.Client(api_key=KEY, http_options=options)


def chat_request(model: str = "gemini/gemini-2.5-flash", text: str = "hello", **fields: Any) -> Any:
    body = {"model": model, "messages": [{"role": "user", "content": text}], **fields}
    return json_format.ParseDict(body, chat_pb.CreateChatCompletionRequest())


def text_value(text: str) -> struct_pb2.Value:
    return struct_pb2.Value(string_value=text)


def sent(fake: FakeGemini) -> dict[str, Any]:
    body = fake.last_request.json
    assert isinstance(body, dict)
    return body


# ---------------------------------------------------- the fake, checked with the official SDK


async def raw_post(fake: FakeGemini, model: str, method: str, body: dict[str, Any], query: str = "") -> httpx.Response:
    url = f"{fake.base_url}/v1beta/models/{model}:{method}{query}"
    async with httpx.AsyncClient() as client:
        return await client.post(url, json=body, headers={"x-goog-api-key": KEY})


TOOLS_BODY = {"functionDeclarations": [{"name": "get_weather", "parametersJsonSchema": WEATHER_SCHEMA}]}


@pytest.mark.parametrize(
    "model", ["gemini-2.5-flash", "tools", "tools-parallel", "length", "safety", "recitation", "blocked", "thinking"]
)
async def test_fake_answers_parse_strictly_as_sdk_types(gemini_fake, model):
    """The SDK's types forbid unknown fields at every level: a drifted fake fails here."""
    body = {
        "contents": [{"role": "user", "parts": [{"text": "weather in Paris"}]}],
        "tools": [TOOLS_BODY],
        "generationConfig": {"candidateCount": 2},
    }
    answer = await raw_post(gemini_fake, model, "generateContent", body)
    assert answer.status_code == 200
    parsed = types.GenerateContentResponse.model_validate_json(answer.content)
    assert parsed.usage_metadata and parsed.usage_metadata.prompt_token_count == 3
    assert parsed.candidates or parsed.prompt_feedback.block_reason == types.BlockedReason.SAFETY

    stream = await raw_post(gemini_fake, model, "streamGenerateContent", body, "?alt=sse")
    assert stream.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in stream.text.split("\r\n\r\n") if line]
    assert events and all(line.startswith("{") for line in events)
    last = types.GenerateContentResponse.model_validate_json(events[-1])
    for event in events:
        types.GenerateContentResponse.model_validate_json(event)
    assert last.candidates is None or all(c.finish_reason for c in last.candidates)


async def test_fake_embeddings_parse_as_sdk_types(gemini_fake):
    one = await raw_post(gemini_fake, "gemini-embedding-001", "embedContent", {"content": {"parts": [{"text": "a"}]}})
    assert len(types.SingleEmbedContentResponse.model_validate_json(one.content).embedding.values) == 16
    batch = {"requests": [{"model": "models/e", "content": {"parts": [{"text": t}]}} for t in "ab"]}
    many = await raw_post(gemini_fake, "e", "batchEmbedContents", batch)
    assert len(types.EmbedContentResponse.model_validate_json(many.content).embeddings) == 2


async def test_fake_refuses_unknown_fields_as_the_api_does(gemini_fake):
    body = {"contents": [{"role": "user", "parts": [{"text": "x"}]}], "generationConfig": {"maxTokens": 5}}
    answer = await raw_post(gemini_fake, "gemini-2.5-flash", "generateContent", body)
    assert answer.status_code == 400
    assert answer.json()["error"]["status"] == "INVALID_ARGUMENT"
    bad_signature = {"contents": [{"role": "model", "parts": [{"text": "x", "thoughtSignature": "not base64!"}]}]}
    assert (await raw_post(gemini_fake, "gemini-2.5-flash", "generateContent", bad_signature)).status_code == 400


async def test_official_sdk_works_against_the_fake(sdk, gemini_fake):
    answer = await sdk.aio.models.generate_content(model="gemini-2.5-flash", contents="hello there")
    assert answer.text == "echo: hello there"
    pieces = [c.text async for c in await sdk.aio.models.generate_content_stream(model="thinking", contents="a b c")]
    assert "".join(p for p in pieces if p) == "echo: a b c"
    embedded = await sdk.aio.models.embed_content(
        model="gemini-embedding-001", contents=["a", "b"], config=types.EmbedContentConfig(output_dimensionality=4)
    )
    assert [len(e.values) for e in embedded.embeddings] == [4, 4]
    counted = await sdk.aio.models.count_tokens(model="gemini-2.5-flash", contents="one two three")
    assert isinstance(counted, types.CountTokensResponse) and counted.total_tokens == 3


async def test_official_sdk_tool_round_trip_satisfies_the_fakes_signature_check(sdk, gemini_fake):
    """The SDK echoes the thought signature (as URL-safe base64) and ids: the fake's
    Gemini-3-like check accepts exactly that, and refuses a turn without the signature."""
    tool = types.Tool(function_declarations=[types.FunctionDeclaration(name="get_weather")])
    config = types.GenerateContentConfig(
        tools=[tool], automatic_function_calling=types.AutomaticFunctionCallingConfig(disable=True)
    )
    session = sdk.aio.chats.create(model="tools-parallel", config=config)
    first = await session.send_message("weather?")
    calls = first.function_calls
    assert [c.id for c in calls] == ["fc-1", "fc-2"]
    answers = [types.Part.from_function_response(name=c.name, response={"output": "sunny"}) for c in calls]
    for part, call in zip(answers, calls, strict=True):
        part.function_response.id = call.id
    second = await session.send_message(answers)
    assert second.text == 'tool result: {"output": "sunny"} | {"output": "sunny"}'

    unsigned = [
        types.Content(role="user", parts=[types.Part(text="weather?")]),
        types.Content(role="model", parts=[types.Part(function_call=types.FunctionCall(name="get_weather", args={}))]),
        types.Content(role="user", parts=[types.Part.from_function_response(name="get_weather", response={})]),
    ]
    with pytest.raises(genai_errors.ClientError) as caught:
        await sdk.aio.models.generate_content(model="tools", contents=unsigned, config=config)
    assert caught.value.code == 400 and "thought_signature" in caught.value.message


@pytest.mark.parametrize(
    ("model", "code", "status"),
    [("error-429", 429, "RESOURCE_EXHAUSTED"), ("error-503", 503, "UNAVAILABLE"), ("error-404", 404, "NOT_FOUND")],
)
async def test_fake_error_bodies_parse_as_sdk_errors(sdk, model, code, status):
    with pytest.raises(genai_errors.APIError) as caught:
        await sdk.aio.models.generate_content(model=model, contents="x")
    assert caught.value.code == code and caught.value.status == status and caught.value.message


async def test_fake_answers_a_wrong_key_like_google(gemini_fake):
    options = types.HttpOptions(base_url=gemini_fake.base_url, api_version="v1beta")
    bad = genai.Client(api_key="nope", http_options=options)
    with pytest.raises(genai_errors.ClientError) as caught:
        await bad.aio.models.generate_content(model="gemini-2.5-flash", contents="x")
    assert caught.value.code == 400
    assert caught.value.details["error"]["details"][0]["reason"] == "API_KEY_INVALID"


# -------------------------------------------------------------------------- chat over gRPC


async def test_plain_chat_is_translated_both_ways(chat, gemini_fake):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "developer", "content": "in English"},
        {"role": "user", "content": "ping pong"},
    ]
    request = chat_request(
        messages=messages,
        temperature=0.5,
        top_p=0.9,
        max_tokens=10,
        max_completion_tokens=50,
        stop=["END"],
        n=1,
        seed=7,
        presence_penalty=0.25,
        frequency_penalty=0.5,
        user="u1",
    )
    response = await chat.CreateChatCompletion(request)

    assert response.model == "gemini/gemini-2.5-flash"
    assert response.id.startswith("chatcmpl-fakeResp")
    choice = response.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "echo: ping pong",
        "stop",
    )
    assert (response.usage.prompt_tokens, response.usage.completion_tokens, response.usage.total_tokens) == (6, 3, 9)
    request_sent = gemini_fake.last_request
    assert request_sent.path == "/v1beta/models/gemini-2.5-flash:generateContent"
    assert request_sent.headers["x-goog-api-key"] == KEY and "authorization" not in request_sent.headers
    assert sent(gemini_fake) == {
        "contents": [{"role": "user", "parts": [{"text": "ping pong"}]}],
        "systemInstruction": {"parts": [{"text": "be brief"}, {"text": "in English"}]},
        "generationConfig": {
            "temperature": 0.5,
            "topP": 0.9,
            "candidateCount": 1,
            "seed": 7,
            "presencePenalty": 0.25,
            "frequencyPenalty": 0.5,
            "maxOutputTokens": 50,  # max_completion_tokens wins over max_tokens
            "stopSequences": ["END"],
        },
    }


async def test_multi_turn_tool_use_carries_the_thought_signature(chat, gemini_fake):
    first = await chat.CreateChatCompletion(
        chat_request(model="gemini/tools", text="weather in Paris?", tools=[WEATHER_TOOL])
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.HasField("content")
    call = choice.message.tool_calls[0]
    assert ID_PATTERN.fullmatch(call.id)
    assert (call.type, call.function.name, json.loads(call.function.arguments)) == (
        "function",
        "get_weather",
        {"city": "Paris"},
    )
    declared = sent(gemini_fake)["tools"]
    assert declared == [
        {
            "functionDeclarations": [
                {"name": "get_weather", "description": "Weather in a city", "parametersJsonSchema": WEATHER_SCHEMA}
            ]
        }
    ]
    signature = gemini_fake.signatures[-1]
    # The signature is too long to carry in an id OpenAI would accept: kept by the gateway.
    assert len(call.id) <= 64 and signature not in call.id

    follow_up = chat_request(model="gemini/tools", text="weather in Paris?", tools=[WEATHER_TOOL])
    follow_up.messages.add(role="assistant", tool_calls=[call])
    follow_up.messages.add(role="tool", tool_call_id=call.id, content=text_value("sunny, 21C"))
    second = await chat.CreateChatCompletion(follow_up)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == 'tool result: {"output": "sunny, 21C"}'
    contents = sent(gemini_fake)["contents"]
    assert contents[1] == {
        "role": "model",
        "parts": [{"functionCall": {"name": "get_weather", "args": {"city": "Paris"}}, "thoughtSignature": signature}],
    }
    assert contents[2] == {
        "role": "user",
        "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sunny, 21C"}}}],
    }


async def test_parallel_calls_keep_their_ids_and_the_first_calls_signature(chat, gemini_fake):
    first = await chat.CreateChatCompletion(
        chat_request(model="gemini/tools-parallel", text="weather?", tools=[WEATHER_TOOL])
    )
    calls = first.choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "London"]
    assert len({c.id for c in calls}) == 2
    follow_up = chat_request(model="gemini/tools-parallel", text="weather?", tools=[WEATHER_TOOL])
    follow_up.messages.add(role="assistant", tool_calls=calls)
    follow_up.messages.add(role="tool", tool_call_id=calls[0].id, content=text_value('{"temp": 21}'))
    follow_up.messages.add(role="tool", tool_call_id=calls[1].id, content=text_value("rainy"))
    second = await chat.CreateChatCompletion(follow_up)
    assert second.choices[0].message.content == 'tool result: {"temp": 21} | {"output": "rainy"}'
    model_turn, results = sent(gemini_fake)["contents"][1:]
    assert [p["functionCall"]["id"] for p in model_turn["parts"]] == ["fc-1", "fc-2"]
    assert ["thoughtSignature" in p for p in model_turn["parts"]] == [True, False]
    assert [p["functionResponse"]["id"] for p in results["parts"]] == ["fc-1", "fc-2"]
    assert results["parts"][0]["functionResponse"]["response"] == {"temp": 21}  # a JSON object result as is


async def test_a_call_id_minted_elsewhere_carries_no_signature(chat, gemini_fake):
    """Gemini 3 refuses a call turn without its signature: the gateway cannot invent one."""
    request = chat_request(model="gemini/tools", text="weather?", tools=[WEATHER_TOOL])
    call = chat_pb.ToolCall(id="call_abc", type="function")
    call.function.name, call.function.arguments = "get_weather", '{"city": "Rome"}'
    request.messages.add(role="assistant", tool_calls=[call])
    request.messages.add(role="tool", tool_call_id="call_abc", content=text_value("hot"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(request)
    assert error_info(caught.value).reason == "UPSTREAM_BAD_REQUEST"
    assert "thoughtSignature" not in sent(gemini_fake)["contents"][1]["parts"][0]


async def test_tool_result_for_an_unknown_call_is_refused_before_upstream(chat, gemini_fake):
    request = chat_request(model="gemini/tools", text="weather?", tools=[WEATHER_TOOL])
    request.messages.add(role="tool", tool_call_id="call_nowhere", content=text_value("x"))
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).metadata["field"] == "messages[1].tool_call_id"
    assert not gemini_fake.requests


@pytest.mark.parametrize(
    ("tool_choice", "config", "called"),
    [
        ("auto", {"mode": "AUTO"}, "get_weather"),
        ("none", {"mode": "NONE"}, None),
        ("required", {"mode": "ANY"}, "get_weather"),
        (
            {"type": "function", "function": {"name": "get_time"}},
            {"mode": "ANY", "allowedFunctionNames": ["get_time"]},
            "get_time",
        ),
    ],
)
async def test_tool_choice_and_schema_cleaning(chat, gemini_fake, tool_choice, config, called):
    weather = json.loads(json.dumps(WEATHER_TOOL))
    weather["function"]["parameters"] = {"$schema": "https://json-schema.org/draft/2020-12/schema", **WEATHER_SCHEMA}
    response = await chat.CreateChatCompletion(
        chat_request(model="gemini/tools", tools=[weather, TIME_TOOL], tool_choice=tool_choice)
    )
    body = sent(gemini_fake)
    assert body["toolConfig"] == {"functionCallingConfig": config}
    declarations = body["tools"][0]["functionDeclarations"]
    # `$schema` is refused by Gemini; additionalProperties is fine in parametersJsonSchema.
    assert declarations[0]["parametersJsonSchema"] == WEATHER_SCHEMA
    assert declarations[1] == {"name": "get_time", "parametersJsonSchema": {"type": "object"}}
    calls = response.choices[0].message.tool_calls
    assert (calls[0].function.name if calls else None) == called


async def test_response_formats(chat, gemini_fake):
    schema = {"$schema": "x", "type": "object", "properties": {"echo": {"type": "string"}}}
    json_schema = {"type": "json_schema", "json_schema": {"name": "echo", "schema": schema, "strict": True}}
    response = await chat.CreateChatCompletion(chat_request(text="hi", response_format=json_schema))
    assert json.loads(response.choices[0].message.content) == {"echo": "hi"}
    assert sent(gemini_fake)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object", "properties": {"echo": {"type": "string"}}},
    }
    await chat.CreateChatCompletion(chat_request(text="hi", response_format={"type": "json_object"}))
    assert sent(gemini_fake)["generationConfig"] == {"responseMimeType": "application/json"}


@pytest.mark.parametrize(
    ("model", "effort", "thinking"),
    [
        ("gemini-2.5-flash", "low", {"thinkingBudget": 1024}),
        ("gemini-2.5-pro", "minimal", {"thinkingBudget": 512}),
        ("gemini-3-pro-preview", "high", {"thinkingLevel": "HIGH"}),
    ],
)
async def test_reasoning_effort_becomes_the_thinking_config(chat, gemini_fake, model, effort, thinking):
    await chat.CreateChatCompletion(chat_request(model=f"gemini/{model}", reasoning_effort=effort))
    assert sent(gemini_fake)["generationConfig"] == {"thinkingConfig": thinking}


async def test_images_and_audio_become_parts(chat, gemini_fake):
    files_uri = "https://generativelanguage.googleapis.com/v1beta/files/abc123"
    content = [
        {"type": "text", "text": "compare"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "detail": "low"}},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.JPG?size=2"}},
        {"type": "image_url", "image_url": {"url": files_uri}},
        {"type": "input_audio", "input_audio": {"data": "UklGRg==", "format": "wav"}},
    ]
    request = json_format.ParseDict(
        {"model": "gemini/gemini-2.5-flash", "messages": [{"role": "user", "content": content}]},
        chat_pb.CreateChatCompletionRequest(),
    )
    await chat.CreateChatCompletion(request)
    assert sent(gemini_fake)["contents"][0]["parts"] == [
        {"text": "compare"},
        {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
        {"fileData": {"mimeType": "image/jpeg", "fileUri": "https://example.com/cat.JPG?size=2"}},
        {"fileData": {"fileUri": files_uri}},
        {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
    ]


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "https://x.test/img"}}]}
                ]
            },
            "messages[0].content[0].image_url.url",
        ),
        ({"logit_bias": {"50256": -100}}, "logit_bias"),
        ({"logprobs": True}, "logprobs"),
        ({"tools": [WEATHER_TOOL], "parallel_tool_calls": False}, "parallel_tool_calls"),
    ],
)
async def test_what_gemini_cannot_do_is_refused_before_upstream(chat, gemini_fake, fields, field):
    body = {"model": "gemini/gemini-2.5-flash", "messages": [{"role": "user", "content": "x"}], **fields}
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(json_format.ParseDict(body, chat_pb.CreateChatCompletionRequest()))
    info = error_info(caught.value)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (info.reason, info.metadata["field"], info.metadata["provider"]) == ("UNSUPPORTED_FEATURE", field, "gemini")
    assert not gemini_fake.requests


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        ("gemini-2.5-flash", "stop"),
        ("tools", "tool_calls"),
        ("length", "length"),
        ("safety", "content_filter"),
        ("recitation", "content_filter"),
        ("blocked", "content_filter"),
    ],
)
async def test_finish_reasons(chat, model, reason):
    response = await chat.CreateChatCompletion(chat_request(model=f"gemini/{model}", tools=[WEATHER_TOOL]))
    choice = response.choices[0]
    assert choice.finish_reason == reason
    if model == "blocked":
        assert choice.message.refusal == "the prompt was blocked (SAFETY)"
        assert response.usage.prompt_tokens == 1 and response.usage.completion_tokens == 0


async def test_usage_counts_thoughts_and_cache(chat):
    response = await chat.CreateChatCompletion(chat_request(model="gemini/thinking", text="deep question"))
    usage = response.usage
    assert usage.completion_tokens == 3 + THOUGHT_TOKENS  # "echo: deep question" + thoughts
    assert usage.completion_tokens_details.reasoning_tokens == THOUGHT_TOKENS
    assert usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    message = response.choices[0].message
    assert (message.content, message.reasoning_content) == ("echo: deep question", "Let me think about it.")


# --------------------------------------------------------------------- streaming over gRPC


async def test_stream_text_hides_usage_unless_asked(chat, gemini_fake):
    chunks = [c async for c in chat.StreamChatCompletion(chat_request(text="one two three"))]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content for c in chunks) == "echo: one two three"
    assert [c.choices[0].HasField("finish_reason") for c in chunks][-2:] == [False, True]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(not c.HasField("usage") for c in chunks) and len({c.id for c in chunks}) == 1
    assert gemini_fake.last_request.path == "/v1beta/models/gemini-2.5-flash:streamGenerateContent"
    assert gemini_fake.last_request.query == "alt=sse"


async def test_stream_ends_with_the_usage_chunk_when_asked(chat):
    request = chat_request(model="gemini/thinking", text="a b", stream=True, stream_options={"include_usage": True})
    chunks = [c async for c in chat.StreamChatCompletion(request)]
    assert "".join(c.choices[0].delta.reasoning_content for c in chunks if c.choices) == "Let me think about it."
    last = chunks[-1]
    assert not last.choices
    assert last.usage.prompt_tokens == 2
    assert last.usage.completion_tokens == 3 + THOUGHT_TOKENS
    assert last.usage.completion_tokens_details.reasoning_tokens == THOUGHT_TOKENS
    assert last.usage.prompt_tokens_details.cached_tokens == CACHED_TOKENS


async def test_stream_tool_calls_arrive_whole_with_indices(chat):
    request = chat_request(model="gemini/tools-parallel", text="weather?", tools=[WEATHER_TOOL], n=2)
    calls: dict[tuple[int, int], dict[str, str]] = {}
    finish: dict[int, str] = {}
    async for chunk in chat.StreamChatCompletion(request):
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls:
                call = calls.setdefault((choice.index, delta.index), {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id
                call["name"] += delta.function.name
                call["arguments"] += delta.function.arguments
            if choice.HasField("finish_reason"):
                finish[choice.index] = choice.finish_reason
    assert finish == {0: "tool_calls", 1: "tool_calls"}
    assert sorted(calls) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    for (_, index), call in calls.items():
        assert ID_PATTERN.fullmatch(call["id"]) and call["name"] == "get_weather"
        assert call["arguments"] == json.dumps({"city": ["Paris", "London"][index]})


@pytest.mark.parametrize("model", ["stream-cut", "stream-error", "stream-error-event", "stream-truncated"])
async def test_stream_broken_midway_is_an_error_not_a_short_answer(chat, model):
    received = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in chat.StreamChatCompletion(chat_request(model=f"gemini/{model}", text="a b c d e f")):
            received.append(chunk)
    assert received, "the chunks before the failure are delivered"
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    if model.startswith("stream-error"):
        assert "The model crashed mid-stream." in caught.value.details()


@pytest.mark.parametrize(
    ("model", "code"),
    [("error-429", grpc.StatusCode.RESOURCE_EXHAUSTED), ("malformed", grpc.StatusCode.UNAVAILABLE)],
)
async def test_stream_failure_before_the_first_chunk_is_the_status(chat, model, code):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in chat.StreamChatCompletion(chat_request(model=f"gemini/{model}")):
            pass
    assert caught.value.code() == code


async def test_cancelled_stream_cancels_upstream(chat, gemini_fake):
    call = chat.StreamChatCompletion(chat_request(model="gemini/stream-slow", text="a b c d e f g h"))
    assert (await call.read()).choices
    call.cancel()
    for _ in range(150):
        if gemini_fake.cancelled_streams:
            break
        await asyncio.sleep(0.02)
    assert gemini_fake.cancelled_streams == 1 and gemini_fake.completed_streams == 0


# -------------------------------------------------------------------------- errors over gRPC


@pytest.mark.parametrize(
    ("model", "code", "reason"),
    [
        ("gemini/error-400", grpc.StatusCode.INVALID_ARGUMENT, "UPSTREAM_BAD_REQUEST"),
        ("gemini/error-401", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
        ("gemini/error-403", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
        ("gemini/error-404", grpc.StatusCode.NOT_FOUND, "UPSTREAM_NOT_FOUND"),
        ("gemini/error-429", grpc.StatusCode.RESOURCE_EXHAUSTED, "UPSTREAM_RATE_LIMITED"),
        ("gemini/error-500", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("gemini/error-503", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_UNAVAILABLE"),
        ("gemini/error-504", grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"),
        ("gemini/malformed", grpc.StatusCode.UNAVAILABLE, "UPSTREAM_MALFORMED_RESPONSE"),
        ("gemini/slow", grpc.StatusCode.DEADLINE_EXCEEDED, "UPSTREAM_TIMEOUT"),
        # Google answers a bad API key with 400 INVALID_ARGUMENT + ErrorInfo API_KEY_INVALID.
        ("geminibad/gemini-2.5-flash", grpc.StatusCode.PERMISSION_DENIED, "UPSTREAM_AUTH_FAILED"),
    ],
)
async def test_upstream_errors_map_to_codes(chat, model, code, reason):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(chat_request(model=model))
    assert caught.value.code() == code
    info = error_info(caught.value)
    assert info.reason == reason and info.metadata["provider"] == model.split("/")[0]


async def test_rate_limit_hint_comes_from_the_body(chat):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await chat.CreateChatCompletion(chat_request(model="gemini/error-429"))
    hint = retry_info(caught.value)
    assert hint is not None and hint.retry_delay.seconds == RETRY_DELAY_SECONDS
    assert "RESOURCE_EXHAUSTED" in caught.value.details()


# ------------------------------------------------------------------- embeddings over gRPC


def embed_request(fake: FakeGemini) -> Any:
    """The embedding call among the requests (the token count runs beside it)."""
    [request] = [r for r in fake.requests if ":countTokens" not in r.path]
    return request


async def test_embeddings_use_embed_content_for_one_and_batch_for_several(gemini_channel, gemini_fake):
    stub = embedding_grpc.EmbeddingServiceStub(gemini_channel)
    one = await stub.CreateEmbedding(
        json_format.ParseDict(
            {"model": "gemini/gemini-embedding-001", "input": "hello", "dimensions": 8},
            embedding_pb.CreateEmbeddingRequest(),
        )
    )
    assert len(one.data) == 1 and len(one.data[0].floats.values) == 8
    assert embed_request(gemini_fake).path == "/v1beta/models/gemini-embedding-001:embedContent"
    assert embed_request(gemini_fake).json == {"content": {"parts": [{"text": "hello"}]}, "outputDimensionality": 8}
    assert one.usage.prompt_tokens == 1

    gemini_fake.reset()
    many = await stub.CreateEmbedding(
        json_format.ParseDict(
            {"model": "gemini/gemini-embedding-001", "input": ["hello big", "world"]},
            embedding_pb.CreateEmbeddingRequest(),
        )
    )
    assert [len(d.floats.values) for d in many.data] == [16, 16]
    # embedContent reports no usage: the inputs were counted by countTokens.
    assert many.usage.prompt_tokens == 3 and many.usage.total_tokens == 3
    [count] = [r for r in gemini_fake.requests if ":countTokens" in r.path]
    assert count.path == "/v1beta/models/gemini-3.5-flash-lite:countTokens"
    assert embed_request(gemini_fake).path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert embed_request(gemini_fake).json == {
        "requests": [
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "hello big"}]}},
            {"model": "models/gemini-embedding-001", "content": {"parts": [{"text": "world"}]}},
        ]
    }


# --------------------------------------------------------- REST with the official openai SDK


async def test_rest_chat(oai, gemini_fake):
    completion = await oai.chat.completions.create(
        model="gemini/gemini-2.5-flash", messages=[{"role": "user", "content": "over REST"}]
    )
    assert completion.choices[0].message.content == "echo: over REST"
    assert completion.model == "gemini/gemini-2.5-flash"
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert sent(gemini_fake)["contents"] == [{"role": "user", "parts": [{"text": "over REST"}]}]


async def test_rest_tool_round_trip(oai, gemini_fake):
    messages: list[Any] = [{"role": "user", "content": "weather?"}]
    first = await oai.chat.completions.create(model="gemini/tools", messages=messages, tools=[WEATHER_TOOL])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    messages += [
        {"role": "assistant", "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "rainy"},
    ]
    second = await oai.chat.completions.create(model="gemini/tools", messages=messages, tools=[WEATHER_TOOL])
    assert second.choices[0].message.content == 'tool result: {"output": "rainy"}'
    assert sent(gemini_fake)["contents"][1]["parts"][0]["thoughtSignature"] == gemini_fake.signatures[-1]


async def test_rest_streaming_with_usage(oai):
    stream = await oai.chat.completions.create(
        model="gemini/gemini-2.5-flash",
        messages=[{"role": "user", "content": "stream this please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "echo: stream this please"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 4


async def test_rest_streaming_tool_calls_via_sdk_accumulator(oai):
    async with oai.chat.completions.stream(
        model="gemini/tools-parallel", messages=[{"role": "user", "content": "weather?"}], tools=[WEATHER_TOOL]
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert [json.loads(c.function.arguments) for c in calls] == [{"city": "Paris"}, {"city": "London"}]


@pytest.mark.parametrize(
    ("model", "exception", "status"),
    [
        ("gemini/error-400", openai.BadRequestError, 400),
        ("gemini/error-401", openai.PermissionDeniedError, 403),
        ("gemini/error-403", openai.PermissionDeniedError, 403),
        ("geminibad/gemini-2.5-flash", openai.PermissionDeniedError, 403),
        ("gemini/error-404", openai.NotFoundError, 404),
        ("gemini/error-429", openai.RateLimitError, 429),
        ("gemini/error-500", openai.InternalServerError, 503),
        ("gemini/error-503", openai.InternalServerError, 503),
        ("gemini/malformed", openai.InternalServerError, 503),
        ("gemini/slow", openai.InternalServerError, 504),
    ],
)
async def test_rest_errors_raise_the_matching_sdk_exception(oai, model, exception, status):
    with pytest.raises(exception) as caught:
        await oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    assert caught.value.code  # the ErrorReason


async def test_rest_rate_limit_carries_retry_after(oai):
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(model="gemini/error-429", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == str(RETRY_DELAY_SECONDS)


async def test_rest_stream_cut_raises_in_the_sdk(oai):
    stream = await oai.chat.completions.create(
        model="gemini/stream-cut", messages=[{"role": "user", "content": "a b c d e"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert received and caught.value.code == "UPSTREAM_UNAVAILABLE"


async def test_rest_embeddings_base64_is_float32_of_the_floats(oai, gemini_fake):
    # The openai SDK asks for base64 by default and decodes it itself.
    default = await oai.embeddings.create(model="gemini/gemini-embedding-001", input=["a", "b"], dimensions=4)
    assert embed_request(gemini_fake).path.endswith(":batchEmbedContents")
    assert default.usage.prompt_tokens == 2  # counted by countTokens
    floats = await oai.embeddings.create(
        model="gemini/gemini-embedding-001", input=["a", "b"], dimensions=4, encoding_format="float"
    )
    assert [d.embedding for d in default.data] == [d.embedding for d in floats.data]
    assert default.model == "gemini/gemini-embedding-001" and len(default.data[1].embedding) == 4


async def test_embeddings_are_estimated_when_count_tokens_fails(oai, gemini_fake):
    gemini_fake.count_tokens_down = True
    try:
        result = await oai.embeddings.create(model="gemini/gemini-embedding-001", input=["abcdefghi", "ab"])
    finally:
        gemini_fake.count_tokens_down = False
    assert len(result.data) == 2
    assert result.usage.prompt_tokens == 3 + 1  # 4 characters a token, rounded up per input


async def test_rest_token_array_embeddings_are_unsupported(oai, gemini_fake):
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.embeddings.create(model="gemini/gemini-embedding-001", input=[[1, 2, 3]])
    assert caught.value.code == "UNSUPPORTED_FEATURE"
    assert not gemini_fake.requests


# ---------------------------------------------------------- pieces: ids, registry, config


def test_call_ids_carry_id_and_signature_in_a_portable_alphabet():
    signature = base64.b64encode(b"\xfb\xff\xfe" * 40).decode()
    call_id = mint_call_id("fc-9", signature)
    assert ID_PATTERN.fullmatch(call_id)
    assert read_call_id(call_id).signature == signature
    assert read_call_id(call_id).upstream_id == "fc-9"
    assert mint_call_id(None, None) != mint_call_id(None, None)  # identical calls stay apart
    for foreign in ("call_abc", "toolu_01", "call_0123456789abcdef_!!", "call_0123456789abcdef_bm90IGpzb24"):
        assert read_call_id(foreign).signature is None


def test_base64_encoding_is_little_endian_float32():
    from server.providers.base import floats_to_base64

    assert struct.unpack("<2f", base64.b64decode(floats_to_base64([0.5, -2.0]))) == (0.5, -2.0)


def test_environment_enables_gemini_like_the_google_genai_sdk():
    assert "gemini" not in config_from_environment({}).providers
    only_gemini = config_from_environment({"GEMINI_API_KEY": "a"}).providers["gemini"]
    assert (only_gemini.api_key_env, only_gemini.base_url) == ("GEMINI_API_KEY", None)
    both = config_from_environment(
        {"GEMINI_API_KEY": "a", "GOOGLE_API_KEY": "b", "GOOGLE_GEMINI_BASE_URL": "http://proxy.test"}
    ).providers["gemini"]
    assert (both.api_key_env, both.base_url) == ("GOOGLE_API_KEY", "http://proxy.test")


async def test_registry_builds_the_gemini_preset():
    async with Transport() as transport:
        adapter = build_provider("gemini", ProviderConfig(api_key="k"), transport)
        assert isinstance(adapter, GeminiAdapter)
        assert adapter._url("gemini-2.5-flash", "generateContent") == (
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent"
        )
        versioned = build_provider("g", ProviderConfig(type="gemini", base_url="http://p.test/v1beta/"), transport)
        assert isinstance(versioned, GeminiAdapter)
        assert versioned._url("m", "embedContent") == "http://p.test/v1beta/models/m:embedContent"
    assert SPECS["gemini"].api_key_env == "GEMINI_API_KEY"
    ids = {entry.id for entry in catalog_models("gemini", ProviderConfig())}
    assert {"gemini-3.5-flash", "gemini-3.1-pro-preview", "gemini-embedding-001"} <= ids


def test_unknown_reasoning_effort_is_an_invalid_request():
    from server.providers.gemini import generate_content_request

    with pytest.raises(errors.InvalidRequest):
        generate_content_request(
            {"messages": [{"role": "user", "content": "x"}], "reasoning_effort": "extreme"}, "gemini-2.5-flash", "g"
        )
