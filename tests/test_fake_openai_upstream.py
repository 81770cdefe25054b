"""The fake OpenAI upstream, checked against the official SDK and its types.

Every response is re-validated strictly against the SDK's pydantic type, refusing
fields the SDK does not know, so that the fake cannot drift from the real API.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import statistics
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import openai
import pydantic
import pytest
from openai.types import CreateEmbeddingResponse, ImagesResponse, Model
from openai.types.audio import Transcription, TranscriptionVerbose
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.fakes import SCENARIO_MODELS, FakeOpenAI
from tests.fakes.openai_upstream import IMAGE_OUTPUT_TOKENS
from tests.openapi_spec import assert_conforms

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-fake"
USER = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

M = TypeVar("M", bound=pydantic.BaseModel)


def strictly(model_type: type[M], data: Any, real_extras: frozenset[str] = frozenset()) -> M:
    """Validates `data` as `model_type`, refusing fields the SDK does not know.

    `real_extras` names top-level fields the real API sends although the SDK's type
    omits them (e.g. verbose_json's "task").
    """
    if isinstance(data, pydantic.BaseModel):
        data = data.model_dump(mode="json", exclude_unset=True)  # the fields as received
    parsed = model_type.model_validate(data)
    extras = set(parsed.model_extra or {}) - real_extras
    assert not extras, f"{model_type.__name__}: fields unknown to the SDK: {sorted(extras)}"
    for name in model_type.model_fields:
        _assert_no_extra_fields(getattr(parsed, name), f"{model_type.__name__}.{name}")
    return parsed


def _assert_no_extra_fields(value: Any, path: str) -> None:
    if isinstance(value, pydantic.BaseModel):
        assert not value.model_extra, f"{path}: fields unknown to the SDK: {sorted(value.model_extra)}"
        for name in type(value).model_fields:
            _assert_no_extra_fields(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for index, item in enumerate(value):
            _assert_no_extra_fields(item, f"{path}[{index}]")


@pytest.fixture
async def fake() -> AsyncIterator[FakeOpenAI]:
    async with FakeOpenAI(api_key=KEY, slow_seconds=5, chunk_delay=0.05) as server:
        yield server


@pytest.fixture
async def client(fake: FakeOpenAI) -> AsyncIterator[openai.AsyncOpenAI]:
    # No retries: the SDK would otherwise retry 429/5xx, honouring retry-after: 7.
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key=KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


async def collect(stream: openai.AsyncStream[ChatCompletionChunk]) -> list[ChatCompletionChunk]:
    return [strictly(ChatCompletionChunk, chunk) async for chunk in stream]


def streamed_text(chunks: list[ChatCompletionChunk]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


# ------------------------------------------------------------------------------- chat


async def test_chat_echoes_the_last_user_message_with_word_usage(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    completion = strictly(ChatCompletion, await client.chat.completions.create(model="gpt-4o-mini", messages=USER))

    choice = completion.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == (
        "assistant",
        "echo: hello there",
        "stop",
    )
    assert completion.model == "gpt-4o-mini"
    assert completion.object == "chat.completion"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens, completion.usage.total_tokens) == (
        2,
        3,
        5,
    )


async def test_records_what_the_client_sent(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=USER, temperature=0.5)

    request = fake.last_request
    assert (request.method, request.path, request.model) == ("POST", "/v1/chat/completions", "gpt-4o-mini")
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert request.json == {"model": "gpt-4o-mini", "messages": USER, "temperature": 0.5}
    assert json.loads(request.body) == request.json


async def test_chat_with_content_parts_and_n_choices(client: openai.AsyncOpenAI) -> None:
    parts = [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "https://x.invalid/a.png"}}]
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": parts}], n=2
    )

    strictly(ChatCompletion, completion)
    assert [c.index for c in completion.choices] == [0, 1]
    assert {c.message.content for c in completion.choices} == {"echo: look"}


async def test_json_response_format_answers_json(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini", messages=USER, response_format={"type": "json_object"}
    )

    assert json.loads(completion.choices[0].message.content or "") == {"echo": "hello there"}


@pytest.mark.parametrize(("model", "finish_reason"), [("length", "length"), ("content-filter", "content_filter")])
async def test_finish_reason_scenarios(client: openai.AsyncOpenAI, model: str, finish_reason: str) -> None:
    completion = strictly(ChatCompletion, await client.chat.completions.create(model=model, messages=USER))
    chunks = await collect(await client.chat.completions.create(model=model, messages=USER, stream=True))

    assert completion.choices[0].finish_reason == finish_reason
    assert chunks[-1].choices[0].finish_reason == finish_reason
    if model == "length":
        assert completion.choices[0].message.content == "echo: hello"  # the first 2 words
    else:
        assert completion.choices[0].message.content is None


# -------------------------------------------------------------------------- streaming


async def test_stream_sends_role_then_pieces_then_finish_reason_without_usage(
    fake: FakeOpenAI, client: openai.AsyncOpenAI
) -> None:
    chunks = await collect(await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))

    assert chunks[0].choices[0].delta.role == "assistant"
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2, "the text comes in pieces"
    assert streamed_text(chunks) == "echo: hello there"
    assert [c.choices[0].finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert all(c.usage is None and c.choices for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert fake.completed_streams == 1


async def test_stream_with_include_usage_ends_with_a_usage_chunk(client: openai.AsyncOpenAI) -> None:
    chunks = await collect(
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=USER, stream=True, stream_options={"include_usage": True}
        )
    )

    *content_chunks, last = chunks
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (2, 3, 5)
    assert all(c.usage is None for c in content_chunks)
    assert content_chunks[-1].choices[0].finish_reason == "stop"


# -------------------------------------------------------------------------- tool calls


async def test_tools_model_calls_the_first_tool(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="tools", messages=USER, tools=[WEATHER_TOOL, TIME_TOOL])

    strictly(ChatCompletion, completion)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}


async def test_tools_model_answers_a_tool_result_in_text(client: openai.AsyncOpenAI) -> None:
    call = {"id": "call_fake0", "type": "function", "function": {"name": "get_weather", "arguments": "{}"}}
    messages = [
        *USER,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_fake0", "content": "22C and sunny"},
    ]
    completion = await client.chat.completions.create(model="tools", messages=messages, tools=[WEATHER_TOOL])

    assert completion.choices[0].finish_reason == "stop"
    assert "22C and sunny" in (completion.choices[0].message.content or "")


async def test_tools_without_tools_in_the_request_echo(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="tools", messages=USER)

    assert completion.choices[0].message.content == "echo: hello there"


async def test_tools_parallel_makes_two_calls(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="tools-parallel", messages=USER, tools=[WEATHER_TOOL])

    strictly(ChatCompletion, completion)
    calls = completion.choices[0].message.tool_calls or []
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "London"]
    assert len({c.id for c in calls}) == 2


def assemble_tool_calls(chunks: list[ChatCompletionChunk]) -> dict[int, dict[str, str]]:
    """Joins streamed tool call pieces by index, checking OpenAI's piece layout."""
    calls: dict[int, dict[str, str]] = {}
    for chunk in chunks:
        for piece in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            assert piece.function is not None
            if piece.index not in calls:  # the first piece names the call...
                assert piece.id and piece.type == "function" and piece.function.name
                calls[piece.index] = {"id": piece.id, "name": piece.function.name, "arguments": ""}
            else:  # ...later ones carry only the index and an arguments fragment
                assert (piece.id, piece.type, piece.function.name) == (None, None, None)
            calls[piece.index]["arguments"] += piece.function.arguments or ""
    return calls


@pytest.mark.parametrize(("model", "cities"), [("tools", ["Paris"]), ("tools-parallel", ["Paris", "London"])])
async def test_streamed_tool_calls_come_in_openai_pieces(
    client: openai.AsyncOpenAI, model: str, cities: list[str]
) -> None:
    chunks = await collect(
        await client.chat.completions.create(model=model, messages=USER, tools=[WEATHER_TOOL], stream=True)
    )

    calls = assemble_tool_calls(chunks)
    assert [json.loads(calls[i]["arguments"])["city"] for i in sorted(calls)] == cities
    assert {c["name"] for c in calls.values()} == {"get_weather"}
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.tool_calls) > len(cities), "arguments in pieces"
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


# ------------------------------------------------------------------ broken streams


async def test_stream_cut_drops_the_connection_after_two_chunks(client: openai.AsyncOpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in await client.chat.completions.create(model="stream-cut", messages=USER, stream=True):
            received.append(chunk)

    assert len(received) == 2


async def test_stream_error_sends_an_error_event_after_two_chunks(client: openai.AsyncOpenAI) -> None:
    received: list[ChatCompletionChunk] = []
    with pytest.raises(openai.APIError, match="mid-stream") as caught:
        async for chunk in await client.chat.completions.create(model="stream-error", messages=USER, stream=True):
            received.append(chunk)

    assert len(received) == 2
    assert isinstance(caught.value.body, dict)
    assert caught.value.body["type"] == "server_error"


async def test_stream_slow_chunks_arrive_one_by_one(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.chunk_delay = 0.1
    started = time.monotonic()
    arrivals = [
        time.monotonic() - started
        async for _ in await client.chat.completions.create(model="stream-slow", messages=USER, stream=True)
    ]

    assert len(arrivals) >= 4
    # Spread out by the delay, not delivered in one burst. The median (with slack)
    # tolerates one late read on a loaded machine.
    gaps = [later - earlier for earlier, later in itertools.pairwise(arrivals)]
    assert statistics.median(gaps) > fake.chunk_delay / 2, gaps


async def test_client_hanging_up_mid_stream_is_counted(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="stream-slow", messages=USER, stream=True)
    async for _ in stream:
        break
    await stream.close()

    await fake.wait_until(lambda: fake.cancelled_streams == 1)
    assert fake.completed_streams == 0


async def test_slow_waits_and_a_client_timeout_is_counted(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="slow", messages=USER, timeout=0.3)

    assert time.monotonic() - started < fake.slow_seconds
    await fake.wait_until(lambda: fake.cancelled_requests == 1)


async def test_slow_answers_after_slow_seconds(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    fake.slow_seconds = 0.3
    started = time.monotonic()
    completion = await client.chat.completions.create(model="slow", messages=USER)

    assert time.monotonic() - started >= 0.3
    assert completion.choices[0].message.content == "echo: hello there"


async def test_malformed_answers_invalid_json(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(json.JSONDecodeError):
        await client.chat.completions.create(model="malformed", messages=USER)
    with pytest.raises(json.JSONDecodeError):
        await collect(await client.chat.completions.create(model="malformed", messages=USER, stream=True))


# -------------------------------------------------------------------------- errors


ERROR_CASES = [
    ("error-400", openai.BadRequestError, 400, None),
    ("error-401", openai.AuthenticationError, 401, "invalid_api_key"),
    ("error-403", openai.PermissionDeniedError, 403, "unsupported_country_region_territory"),
    ("error-404", openai.NotFoundError, 404, "model_not_found"),
    ("error-429", openai.RateLimitError, 429, "rate_limit_exceeded"),
    ("error-500", openai.InternalServerError, 500, None),
    ("error-503", openai.InternalServerError, 503, None),
]


@pytest.mark.parametrize(("model", "error_type", "status", "code"), ERROR_CASES)
async def test_error_models_raise_the_matching_sdk_error(
    client: openai.AsyncOpenAI, model: str, error_type: type[openai.APIStatusError], status: int, code: str | None
) -> None:
    with pytest.raises(error_type) as caught:
        await client.chat.completions.create(model=model, messages=USER)

    error = caught.value
    assert error.status_code == status
    assert error.code == code
    assert error.message.endswith(error.body["message"])  # type: ignore[index]
    assert set(error.body) == {"message", "type", "param", "code"}  # type: ignore[arg-type]


async def test_rate_limit_carries_retry_after_and_ratelimit_headers(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.embeddings.create(model="error-429", input="x")

    headers = caught.value.response.headers
    assert headers["retry-after"] == "7"
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert {"x-ratelimit-limit-tokens", "x-ratelimit-reset-requests"} <= set(headers)


async def test_error_models_apply_to_every_endpoint(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.InternalServerError):
        await client.images.generate(model="error-500", prompt="a cat")
    with pytest.raises(openai.NotFoundError):
        await client.audio.speech.create(model="error-404", input="hi", voice="alloy")
    with pytest.raises(openai.BadRequestError):
        await client.audio.transcriptions.create(model="error-400", file=("a.wav", b"hi"))


async def test_wrong_key_is_refused_with_openais_body(fake: FakeOpenAI) -> None:
    async with openai.AsyncOpenAI(base_url=fake.base_url, api_key="sk-wrong", max_retries=0) as wrong:
        with pytest.raises(openai.AuthenticationError) as caught:
            await wrong.models.list()

    assert caught.value.code == "invalid_api_key"
    assert caught.value.body == {
        "message": "Incorrect API key provided: sk-wrong***.",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }


async def test_missing_key_and_unknown_path_over_plain_http(fake: FakeOpenAI) -> None:
    async with httpx.AsyncClient(base_url=fake.base_url) as http:
        no_key = await http.get("/models")
        unknown = await http.post("/nothing", json={}, headers={"authorization": f"Bearer {KEY}"})

    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert unknown.status_code == 404
    assert unknown.json()["error"] == {
        "message": "Invalid URL (POST /v1/nothing)",
        "type": "invalid_request_error",
        "param": None,
        "code": None,
    }


async def test_missing_required_parameter_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=[])

    assert caught.value.param == "messages"
    assert caught.value.code == "missing_required_parameter"


# ---------------------------------------------------------------------- embeddings


def norm(vector: list[float]) -> float:
    return math.sqrt(sum(v * v for v in vector))


async def test_embeddings_float_for_a_list_of_strings(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    response = strictly(
        CreateEmbeddingResponse,
        await client.embeddings.create(model="text-embedding-3-small", input=["a b", "c"], encoding_format="float"),
    )

    assert [d.index for d in response.data] == [0, 1]
    assert all(len(d.embedding) == fake.embedding_dimensions for d in response.data)
    assert all(math.isclose(norm(d.embedding), 1.0, rel_tol=1e-5) for d in response.data)
    assert response.data[0].embedding != response.data[1].embedding
    assert (response.usage.prompt_tokens, response.usage.total_tokens) == (3, 3)


async def test_embeddings_base64_is_little_endian_float32(client: openai.AsyncOpenAI) -> None:
    as_floats = await client.embeddings.create(model="text-embedding-3-small", input="a b", encoding_format="float")
    as_base64 = await client.embeddings.create(model="text-embedding-3-small", input="a b", encoding_format="base64")
    # Without encoding_format the SDK asks for base64 itself and decodes it.
    decoded_by_sdk = await client.embeddings.create(model="text-embedding-3-small", input="a b")

    raw = base64.b64decode(str(as_base64.data[0].embedding))
    assert list(struct.unpack(f"<{len(raw) // 4}f", raw)) == as_floats.data[0].embedding
    assert decoded_by_sdk.data[0].embedding == as_floats.data[0].embedding


async def test_embeddings_respect_dimensions_and_token_arrays(client: openai.AsyncOpenAI) -> None:
    sized = await client.embeddings.create(model="text-embedding-3-small", input="a", dimensions=4)
    tokens = await client.embeddings.create(model="text-embedding-3-small", input=[[1, 2, 3], [4, 5]])
    one_array = await client.embeddings.create(model="text-embedding-3-small", input=[1, 2, 3])

    assert len(sized.data[0].embedding) == 4
    assert len(tokens.data) == 2
    assert tokens.usage.prompt_tokens == 5
    assert one_array.data[0].embedding == tokens.data[0].embedding


# -------------------------------------------------------------------------- images


async def test_images_as_urls(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    response = strictly(ImagesResponse, await client.images.generate(model="dall-e-3", prompt="a cat", n=2))

    urls = [image.url for image in response.data or []]
    assert len(urls) == 2
    assert all(url and url.startswith("https://") and url.endswith(".png") for url in urls)
    assert fake.last_request.json["n"] == 2


async def test_images_as_b64_json_are_pngs(client: openai.AsyncOpenAI) -> None:
    response = strictly(
        ImagesResponse,
        await client.images.generate(model="dall-e-3", prompt="a cat", response_format="b64_json"),
    )

    [image] = response.data or []
    assert image.url is None
    assert base64.b64decode(image.b64_json or "").startswith(b"\x89PNG\r\n\x1a\n")


async def test_logprobs_as_the_sdk_types_them(client: openai.AsyncOpenAI) -> None:
    completion = strictly(
        ChatCompletion,
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER, logprobs=True, top_logprobs=2),
    )
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None and logprobs.content is not None
    assert [entry.token for entry in logprobs.content] == ["echo: ", "hello ", "there"]
    assert all(len(entry.top_logprobs) == 2 for entry in logprobs.content)


async def test_gpt_image_answers_carry_image_gen_usage(client: openai.AsyncOpenAI) -> None:
    response = strictly(ImagesResponse, await client.images.generate(model="gpt-image-1", prompt="a red fox", n=2))

    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (3, 2 * IMAGE_OUTPUT_TOKENS)
    assert response.usage.total_tokens == 3 + 2 * IMAGE_OUTPUT_TOKENS
    assert (response.background, response.output_format, response.size) == ("opaque", "png", "1024x1024")


# ------------------------------------------------------------------- OpenAPI spec


async def test_answers_follow_openais_published_spec(fake: FakeOpenAI) -> None:
    """The fake's raw answers validate against the response schemas of OpenAI's
    OpenAPI description, as the gateway's are checked in test_openapi_conformance."""
    chat = {"model": "gpt-4o-mini", "messages": USER}
    async with httpx.AsyncClient(base_url=fake.base_url, headers={"authorization": f"Bearer {KEY}"}) as http:
        answers = {
            "CreateChatCompletionResponse": [
                await http.post("/chat/completions", json=chat),
                await http.post("/chat/completions", json={**chat, "model": "tools", "tools": [WEATHER_TOOL]}),
                await http.post("/chat/completions", json={**chat, "model": "content-filter"}),
                await http.post("/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2}),
            ],
            "CreateEmbeddingResponse": [await http.post("/embeddings", json={"model": "e", "input": ["a", "b"]})],
            "ImagesResponse": [
                await http.post("/images/generations", json={"model": "dall-e-3", "prompt": "a fox"}),
                await http.post("/images/generations", json={"model": "gpt-image-1", "prompt": "a fox"}),
            ],
            "ListModelsResponse": [await http.get("/models")],
        }
        streamed = await http.post("/chat/completions", json={**chat, "stream": True, "n": 2, "logprobs": True})
    for schema, responses in answers.items():
        for response in responses:
            assert response.status_code == 200, response.text
            assert_conforms(schema, response.json())
    events = [line[6:] for line in streamed.text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    for event in events[:-1]:
        assert_conforms("CreateChatCompletionStreamResponse", json.loads(event))


# --------------------------------------------------------------------------- audio


@pytest.mark.parametrize(
    ("response_format", "content_type"),
    [
        ("mp3", "audio/mpeg"),
        ("opus", "audio/opus"),
        ("aac", "audio/aac"),
        ("flac", "audio/flac"),
        ("wav", "audio/wav"),
        ("pcm", "audio/pcm"),
    ],
)
async def test_speech_bytes_and_content_type(
    client: openai.AsyncOpenAI, response_format: Any, content_type: str
) -> None:
    first = await client.audio.speech.create(
        model="tts-1", input="hello", voice="alloy", response_format=response_format
    )
    again = await client.audio.speech.create(
        model="tts-1", input="hello", voice="alloy", response_format=response_format
    )

    assert first.response.headers["content-type"] == content_type
    assert first.content == again.content, "deterministic"
    assert first.content.endswith(b"|tts-1|alloy|hello")


async def test_transcription_json_is_the_uploaded_text(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    result = strictly(
        Transcription,
        await client.audio.transcriptions.create(model="whisper-1", file=("speech.wav", b"hello world", "audio/wav")),
    )

    assert result.text == "hello world"
    request = fake.last_request
    assert request.form["model"] == "whisper-1"
    assert (request.files["file"].filename, request.files["file"].data) == ("speech.wav", b"hello world")


async def test_transcription_verbose_json_with_words_and_segments(client: openai.AsyncOpenAI) -> None:
    result = strictly(
        TranscriptionVerbose,
        await client.audio.transcriptions.create(
            model="whisper-1",
            file=("speech.wav", b"hello big world"),
            response_format="verbose_json",
            timestamp_granularities=["word", "segment"],
        ),
        real_extras=frozenset({"task"}),
    )

    assert (result.text, result.language, result.duration) == ("hello big world", "english", 1.5)
    assert [w.word for w in result.words or []] == ["hello", "big", "world"]
    assert [s.text.strip() for s in result.segments or []] == ["hello big world"]


@pytest.mark.parametrize(
    ("response_format", "expected"),
    [
        ("text", "hello world\n"),
        ("srt", "1\n00:00:00,000 --> 00:00:01,000\nhello world\n\n"),
        ("vtt", "WEBVTT\n\n00:00:00.000 --> 00:00:01.000\nhello world\n\n"),
    ],
)
async def test_transcription_text_formats(client: openai.AsyncOpenAI, response_format: Any, expected: str) -> None:
    raw = await client.audio.transcriptions.with_raw_response.create(
        model="whisper-1", file=("speech.wav", b"hello world"), response_format=response_format
    )

    assert raw.headers["content-type"].startswith("text/plain")
    assert raw.parse() == expected


async def test_transcription_of_binary_audio(client: openai.AsyncOpenAI) -> None:
    result = await client.audio.transcriptions.create(model="whisper-1", file=("a.mp3", bytes(range(256)) * 4))

    assert result.text == "fake transcript of 1024 bytes"


# ------------------------------------------------------------------- models & http


async def test_models_list_names_the_scenarios(client: openai.AsyncOpenAI) -> None:
    models = [strictly(Model, m) async for m in client.models.list()]
    one = await client.models.retrieve("gpt-4o-mini")

    assert {"gpt-4o-mini", *SCENARIO_MODELS} <= {m.id for m in models}
    assert (one.id, one.object) == ("gpt-4o-mini", "model")


async def test_connections_are_kept_alive(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    for _ in range(3):
        await client.chat.completions.create(model="gpt-4o-mini", messages=USER)
    await collect(await client.chat.completions.create(model="gpt-4o-mini", messages=USER, stream=True))
    await client.embeddings.create(model="text-embedding-3-small", input="x")

    assert fake.connections == 1
    assert [r.path for r in fake.requests].count("/v1/chat/completions") == 4


async def test_chunked_request_bodies_are_read(fake: FakeOpenAI) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"model": "gpt-4o-mini", '
        yield b'"messages": [{"role": "user", "content": "chunked"}]}'

    async with httpx.AsyncClient(base_url=fake.base_url, headers={"authorization": f"Bearer {KEY}"}) as http:
        response = await http.post("/chat/completions", content=body(), headers={"content-type": "application/json"})

    assert fake.last_request.headers["transfer-encoding"] == "chunked"
    assert response.json()["choices"][0]["message"]["content"] == "echo: chunked"


async def test_reset_forgets_requests_and_counters(fake: FakeOpenAI, client: openai.AsyncOpenAI) -> None:
    await client.models.list()
    fake.reset()

    assert (fake.requests, fake.connections, fake.cancelled_streams) == ([], 0, 0)


async def test_runs_standalone() -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tests.fakes.openai_upstream", "--port", "0", cwd=ROOT, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = await asyncio.wait_for(process.stdout.readline(), timeout=20)
        base_url = line.decode().rsplit(" ", 1)[-1].strip()  # "fake OpenAI listening on URL"
        async with openai.AsyncOpenAI(base_url=base_url, api_key=KEY, max_retries=0) as sdk:
            completion = await sdk.chat.completions.create(model="gpt-4o-mini", messages=USER)
        assert completion.choices[0].message.content == "echo: hello there"
    finally:
        process.terminate()
        exit_code = await asyncio.wait_for(process.wait(), timeout=10)
    assert exit_code == 0, "SIGTERM stops it cleanly"
