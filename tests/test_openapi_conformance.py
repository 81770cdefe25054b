"""The REST bridge's answers against OpenAI's published OpenAPI description.

Every 200 answer (and every `data:` event of a streamed chat) of the operations the
gateway serves is validated against the response schema the spec gives that operation,
through the real bridge and server, with the fake OpenAI upstream answering in OpenAI's
documented wire format (itself checked against the same schemas in
tests/test_fake_openai_upstream.py).

Where OpenAI's API departs from its spec, the gateway follows the API (see the notes at
each case): base64 embeddings are strings (the spec says arrays of numbers);
transcriptions in `text`, `srt` and `vtt` are `text/plain` (the spec gives them a JSON
schema), and speech is raw audio whose content type follows `response_format`, so
neither has a JSON answer to validate (tests/test_rest_openai_sdk.py covers them).
Error answers (OpenAI's `ErrorResponse`) are checked too.
"""

from __future__ import annotations

import json

import httpx
import pytest

from tests.openapi_spec import assert_conforms, schema_errors

CHAT = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hello there"}]}


@pytest.fixture
async def http(bridge, auth_headers):
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20, headers=auth_headers) as client:
        yield client


def sse_events(text: str) -> list[str]:
    return [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]


async def test_chat_answer_conforms(http):
    response = await http.post("/v1/chat/completions", json=CHAT)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    assert body["choices"][0]["logprobs"] is None
    assert body["choices"][0]["message"]["refusal"] is None


async def test_chat_with_tool_calls_conforms(http):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    request = {**CHAT, "model": "openai/tools", "tools": [tool]}
    response = await http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert_conforms("CreateChatCompletionResponse", body)
    message = body["choices"][0]["message"]
    assert message["tool_calls"] and message["content"] is None


@pytest.mark.parametrize("include_usage", [False, True])
async def test_streamed_chat_chunks_conform(http, include_usage):
    request = {**CHAT, "stream": True, "n": 2, "stream_options": {"include_usage": include_usage}}
    response = await http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len(chunks) >= 4
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    finishes = [choice["finish_reason"] for chunk in chunks for choice in chunk["choices"]]
    assert finishes.count(None) == len(finishes) - 2 and finishes.count("stop") == 2
    assert ("usage" in chunks[-1] and chunks[-1]["choices"] == []) is include_usage


async def test_streamed_tool_calls_conform(http):
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    request = {**CHAT, "model": "openai/tools-parallel", "tools": [tool], "stream": True}
    response = await http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    chunks = [json.loads(event) for event in sse_events(response.text)[:-1]]
    for chunk in chunks:
        assert_conforms("CreateChatCompletionStreamResponse", chunk)
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


async def test_chat_with_logprobs_conforms(http):
    request = {**CHAT, "logprobs": True, "top_logprobs": 3}
    response = await http.post("/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    assert_conforms("CreateChatCompletionResponse", response.json())
    streamed = await http.post("/v1/chat/completions", json={**request, "stream": True})
    for event in sse_events(streamed.text)[:-1]:
        assert_conforms("CreateChatCompletionStreamResponse", json.loads(event))


async def test_embeddings_conform(http):
    response = await http.post("/v1/embeddings", json={"model": "openai/text-embedding-3-small", "input": ["a b", "c"]})
    assert response.status_code == 200, response.text
    assert_conforms("CreateEmbeddingResponse", response.json())


async def test_base64_embeddings_follow_the_api_not_the_spec(http):
    # OpenAI answers encoding_format "base64" with each embedding a base64 string; the spec
    # types it as an array of numbers. The gateway follows the API, so only that differs.
    request = {"model": "openai/text-embedding-3-small", "input": "a b", "encoding_format": "base64"}
    response = await http.post("/v1/embeddings", json=request)
    assert response.status_code == 200, response.text
    body = response.json()
    assert isinstance(body["data"][0]["embedding"], str)
    problems = schema_errors("CreateEmbeddingResponse", body)
    assert problems and all(problem.startswith("data/0/embedding:") for problem in problems), problems


@pytest.mark.parametrize(
    "request_body",
    [
        {"model": "openai/dall-e-3", "prompt": "a red fox"},
        {"model": "openai/dall-e-2", "prompt": "a red fox", "n": 2, "response_format": "b64_json"},
        {"model": "openai/gpt-image-1", "prompt": "a red fox"},
    ],
    ids=["url", "b64", "gpt-image"],
)
async def test_images_conform(http, request_body):
    response = await http.post("/v1/images/generations", json=request_body)
    assert response.status_code == 200, response.text
    assert_conforms("ImagesResponse", response.json())


async def test_models_conform(http):
    response = await http.get("/v1/models")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["data"]
    assert_conforms("ListModelsResponse", body)


@pytest.mark.parametrize(
    ("response_format", "schema"),
    [("json", "CreateTranscriptionResponseJson"), ("verbose_json", "CreateTranscriptionResponseVerboseJson")],
)
async def test_transcriptions_conform(http, response_format, schema):
    # text, srt and vtt are text/plain at OpenAI, whatever the spec says (module docstring).
    form = {"model": "openai/whisper-1", "response_format": response_format}
    files = {"file": ("hello.wav", b"RIFF hello world", "audio/wav")}
    response = await http.post("/v1/audio/transcriptions", data=form, files=files)
    assert response.status_code == 200, response.text
    assert_conforms(schema, response.json())


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/chat/completions", {"model": "openai/gpt-4o-mini", "messages": []}, 400),
        ("/v1/chat/completions", {"model": "nosuch/m", "messages": [{"role": "user", "content": "x"}]}, 404),
        ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy"}}, 400),
        ("/v1/chat/completions", {**CHAT, "metadata": {"a": {}}}, 400),
        ("/v1/chat/completions", {**CHAT, "model": "openai/error-429"}, 429),
        ("/v1/audio/speech", {"model": "openai/tts-1", "input": "x", "voice": {"id": "v"}}, 400),
        ("/v1/embeddings", b'{"model": ', 400),
    ],
)
async def test_error_answers_conform(http, path, body, status):
    if isinstance(body, bytes):
        response = await http.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = await http.post(path, json=body)
    assert response.status_code == status, response.text
    assert_conforms("ErrorResponse", response.json())
