"""The official OpenAI Python SDK against the REST bridge: every endpoint, streaming
and errors. The SDK is the judge of whether the bridge speaks OpenAI's API."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest

from tests.test_grpc_chat import WEATHER_TOOL


async def test_chat_completion(oai, fake_openai):
    completion = await oai.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello bridge"}],
        temperature=0.2,
        max_completion_tokens=50,
        stop=["\n\n"],
    )
    assert completion.object == "chat.completion"
    assert isinstance(completion.created, int) and completion.created > 0
    assert completion.model.startswith("openai/gpt-4o-mini")
    assert completion.choices[0].index == 0
    assert completion.choices[0].finish_reason == "stop"
    assert "hello bridge" in completion.choices[0].message.content
    assert completion.usage.prompt_tokens > 0
    sent = fake_openai.requests[-1].json
    assert sent["max_completion_tokens"] == 50 and sent["stop"] == ["\n\n"] and sent["temperature"] == 0.2


async def test_chat_completion_with_base_url_without_v1(bridge, api_key):
    client = openai.AsyncOpenAI(base_url=bridge.rest_url, api_key=api_key, max_retries=0)
    completion = await client.chat.completions.create(
        model="openai/gpt-4o-mini", messages=[{"role": "user", "content": "no v1"}]
    )
    assert "no v1" in completion.choices[0].message.content
    await client.close()


async def test_camel_case_input_is_accepted(bridge, fake_openai, auth_headers):
    async with httpx.AsyncClient(headers=auth_headers) as client:
        response = await client.post(
            f"{bridge.rest_url}/chat/completions",
            json={"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "maxTokens": 7},
        )
    assert response.status_code == 200, response.text
    assert fake_openai.requests[-1].json["max_tokens"] == 7
    body = response.json()
    assert body["choices"][0]["finish_reason"] == "stop"
    assert isinstance(body["created"], int)


async def test_streaming_chat(oai):
    stream = await oai.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [chunk async for chunk in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "stream me please" in text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0
    assert all(c.object == "chat.completion.chunk" for c in chunks)


async def test_stream_wire_format_ends_with_done(bridge, auth_headers):
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "wire"}], "stream": True}
    async with httpx.AsyncClient(headers=auth_headers) as client:
        response = await client.post(f"{bridge.rest_url}/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [e for e in response.text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert response.text.endswith("data: [DONE]\n\n")
    for event in events[:-1]:
        chunk = json.loads(event.removeprefix("data: "))
        assert chunk["object"] == "chat.completion.chunk"
        assert "usage" not in chunk


async def test_stream_word_in_content_does_not_switch_to_streaming(oai):
    completion = await oai.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": 'please set "stream": true in my config'}],
    )
    assert completion.object == "chat.completion"


async def test_streaming_tool_calls_via_sdk_accumulator(oai):
    async with oai.chat.completions.stream(
        model="openai/tools-parallel",
        messages=[{"role": "user", "content": "weather in two cities"}],
        tools=[WEATHER_TOOL],
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert len(calls) >= 2
    assert final.choices[0].finish_reason == "tool_calls"
    for call in calls:
        assert call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments), dict)


async def test_tool_use_round_trip(oai):
    first = await oai.chat.completions.create(
        model="openai/tools",
        messages=[{"role": "user", "content": "weather?"}],
        tools=[WEATHER_TOOL],
        tool_choice="auto",
    )
    call = first.choices[0].message.tool_calls[0]
    second = await oai.chat.completions.create(
        model="openai/tools",
        messages=[
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "rainy"},
        ],
        tools=[WEATHER_TOOL],
    )
    assert "rainy" in second.choices[0].message.content


async def test_response_format_json_schema_passes_through(oai, fake_openai):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "maximum": 10}}, "required": ["n"]}
    await oai.chat.completions.create(
        model="openai/gpt-4o-mini",
        messages=[{"role": "user", "content": "json please"}],
        response_format={"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}},
    )
    sent = fake_openai.requests[-1].json["response_format"]
    assert sent == {"type": "json_schema", "json_schema": {"name": "count", "schema": schema, "strict": True}}


async def test_embeddings_default_base64_and_float(oai):
    default = await oai.embeddings.create(model="openai/text-embedding-3-small", input=["a", "b"], dimensions=4)
    assert len(default.data) == 2 and len(default.data[0].embedding) == 4
    floats = await oai.embeddings.create(
        model="openai/text-embedding-3-small", input="a", dimensions=4, encoding_format="float"
    )
    assert floats.data[0].embedding == pytest.approx(list(default.data[0].embedding), rel=1e-6)
    tokens = await oai.embeddings.create(model="openai/text-embedding-3-small", input=[[1, 2, 3]], dimensions=4)
    assert len(tokens.data) == 1


async def test_images_at_both_paths(oai, bridge, auth_headers):
    images = await oai.images.generate(model="openai/dall-e-3", prompt="a lighthouse", size="1024x1024", quality="hd")
    assert images.data[0].url.startswith("http")
    b64 = await oai.images.generate(model="openai/dall-e-2", prompt="x", response_format="b64_json", n=1)
    assert base64.b64decode(b64.data[0].b64_json)
    async with httpx.AsyncClient(headers=auth_headers) as client:
        seed_path = await client.post(
            f"{bridge.rest_url}/image/generations", json={"model": "openai/dall-e-2", "prompt": "seed path"}
        )
    assert seed_path.status_code == 200 and seed_path.json()["data"][0]["url"]


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
async def test_speech_returns_raw_audio(oai, response_format, content_type):
    speech = await oai.audio.speech.create(
        model="openai/tts-1", voice="alloy", input="hello there", response_format=response_format, speed=1.25
    )
    assert speech.response.headers["content-type"] == content_type
    assert len(speech.content) > 0


@pytest.mark.parametrize("response_format", ["json", "text", "verbose_json", "srt", "vtt"])
async def test_transcription_multipart(oai, fake_openai, response_format):
    audio = io.BytesIO(b"RIFF fake wave bytes \x00\x01\x02")
    audio.name = "speech.wav"
    result = await oai.audio.transcriptions.create(
        model="openai/whisper-1", file=audio, response_format=response_format, language="en"
    )
    sent = fake_openai.requests[-1]
    assert sent.path == "/v1/audio/transcriptions"
    assert b"RIFF fake wave bytes \x00\x01\x02" in sent.body
    if response_format in ("json", "verbose_json"):
        assert result.text
    else:
        assert isinstance(result, str) and result
    if response_format == "vtt":
        assert result.startswith("WEBVTT")


async def test_models_and_status(oai, bridge, auth_headers):
    models = [m async for m in oai.models.list()]
    ids = {m.id for m in models}
    assert "openai/gpt-4o-mini" in ids and "fast" in ids
    async with httpx.AsyncClient(headers=auth_headers) as client:
        ok = await client.get(f"{bridge.rest_url}/status")
        model_ok = await client.get(f"{bridge.rest_url}/status", params={"model": "openai/gpt-4o"})
        missing = await client.get(f"{bridge.rest_url}/v1/status", params={"model": "nosuch/x"})
    assert ok.json() == {"available": True}  # empty error and code are not printed
    assert model_ok.json()["available"] is True
    assert missing.json()["available"] is False and missing.json()["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("model", "exception", "status"),
    [
        ("openai/error-400", openai.BadRequestError, 400),
        ("openai/error-403", openai.PermissionDeniedError, 403),
        ("openai/error-404", openai.NotFoundError, 404),
        ("openai/error-429", openai.RateLimitError, 429),
        ("openai/error-500", openai.InternalServerError, 503),
        ("openai/slow", openai.InternalServerError, 504),
        ("nosuch/model", openai.NotFoundError, 404),
    ],
)
async def test_errors_raise_the_matching_sdk_exception(oai, model, exception, status):
    with pytest.raises(exception) as caught:
        await oai.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == status
    body = caught.value.body
    assert isinstance(body, dict) and body["message"]
    assert caught.value.code  # the ErrorReason, e.g. UPSTREAM_RATE_LIMITED


async def test_rate_limit_carries_retry_after_header(oai):
    with pytest.raises(openai.RateLimitError) as caught:
        await oai.chat.completions.create(model="openai/error-429", messages=[{"role": "user", "content": "x"}])
    assert caught.value.response.headers["retry-after"] == "7"
    assert caught.value.code == "UPSTREAM_RATE_LIMITED"


async def test_stream_failure_after_first_chunk_raises_in_sdk(oai):
    stream = await oai.chat.completions.create(
        model="openai/stream-cut", messages=[{"role": "user", "content": "one two three four"}], stream=True
    )
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert received
    assert "before [DONE]" in caught.value.message or caught.value.code == "UPSTREAM_UNAVAILABLE"


async def test_stream_error_before_first_chunk_is_http_error(oai):
    with pytest.raises(openai.RateLimitError):
        await oai.chat.completions.create(
            model="openai/error-429", messages=[{"role": "user", "content": "x"}], stream=True
        )


@pytest.mark.parametrize(
    ("arguments", "field"),
    [
        ({"model": "openai/dall-e-3", "size": "256x256"}, "size"),
        ({"model": "openai/dall-e-3", "n": 2}, "n"),
        ({"model": "openai/dall-e-2", "quality": "hd"}, "quality"),
        ({"model": "openai/gpt-image-1", "response_format": "url"}, "response_format"),
    ],
)
async def test_image_options_a_model_lacks_are_refused_with_the_allowed_values(oai, fake_openai, arguments, field):
    with pytest.raises(openai.BadRequestError) as caught:
        await oai.images.generate(prompt="x", **arguments)
    assert caught.value.param == field
    assert not fake_openai.requests


async def test_gpt_image_answers_base64_without_sending_response_format(oai, fake_openai):
    images = await oai.images.generate(
        model="openai/gpt-image-1", prompt="x", response_format="b64_json", quality="high"
    )
    assert images.data[0].b64_json
    assert "response_format" not in fake_openai.requests[-1].json
