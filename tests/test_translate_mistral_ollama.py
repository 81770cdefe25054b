"""Mistral's and Ollama's translators without a server: requests checked against each
API's own schema (Mistral's SDK models, the fake Ollama's documented wire models),
answers and stream events as the providers send them, error bodies."""

from __future__ import annotations

import base64
import json
import struct

import pytest
from mistralai.client import models as mistral_models

from server import errors
from server.providers import mistral, ollama
from tests.fakes.ollama_upstream import ChatRequest, EmbedRequest

TOOL_CALL = {"id": "call_abc123XYZ_long", "type": "function", "function": {"name": "weather", "arguments": "{}"}}
CONVERSATION = [
    {"role": "developer", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather?"}]},
    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
    {"role": "tool", "tool_call_id": TOOL_CALL["id"], "content": "sunny"},
]


# ------------------------------------------------------------------------- mistral


def test_mistral_request_is_valid_for_mistral_s_sdk() -> None:
    request = {"messages": CONVERSATION, "seed": 3, "max_completion_tokens": 9, "tool_choice": "required"}
    body = mistral.chat_body(request, "mistral-small-latest", stream=False)
    mistral_models.ChatCompletionRequest.model_validate(body)
    assert body["random_seed"] == 3 and body["max_tokens"] == 9 and body["tool_choice"] == "any"
    assert body["messages"][0]["role"] == "system"
    call_id = body["messages"][2]["tool_calls"][0]["id"]
    assert len(call_id) == 9 and body["messages"][3]["tool_call_id"] == call_id  # still matched


def test_mistral_refuses_fields_it_would_reject() -> None:
    with pytest.raises(errors.UnsupportedFeature, match="logprobs"):
        mistral.chat_body({"messages": [], "logprobs": True}, "m", stream=False)


def test_mistral_answer_with_thinking_chunks_and_object_arguments() -> None:
    answer = {
        "id": "cmpl-1",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "magistral-small-latest",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": [{"type": "text", "text": "hmm"}]},
                        {"type": "text", "text": "Hi"},
                    ],
                    "tool_calls": [{"id": "null", "function": {"name": "f", "arguments": {"a": 1}}}],
                },
                "finish_reason": "model_length",
            }
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    choice = mistral.completion_from_mistral(answer, "mistral")["choices"][0]
    assert choice["message"]["content"] == "Hi" and choice["message"]["reasoning_content"] == "hmm"
    assert choice["finish_reason"] == "length"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["arguments"] == '{"a": 1}' and call["id"] != "null"


def test_mistral_stream_re_emits_whole_tool_calls_and_closes_with_usage() -> None:
    translator = mistral._StreamTranslator("mistral")
    head = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    calls = [
        {"id": "aaaaaaaaa", "index": 0, "function": {"name": "f", "arguments": '{"x":1}'}},
        {"id": "bbbbbbbbb", "index": 0, "function": {"name": "g", "arguments": "{}"}},
    ]
    events = [
        {**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": None}]},
        {**head, "choices": [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": "tool_calls"}]},
        {**head, "choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}},
    ]
    chunks = [chunk for event in events if (chunk := translator.translate(event)) is not None]
    emitted = chunks[1]["choices"][0]["delta"]["tool_calls"]
    assert [(c["index"], c["id"], c["function"]["name"]) for c in emitted] == [
        (0, "aaaaaaaaa", "f"),
        (1, "bbbbbbbbb", "g"),
    ]
    usage = translator.usage_chunk()
    assert usage is not None and usage["usage"]["total_tokens"] == 3 and usage["choices"] == []


def test_mistral_error_bodies() -> None:
    validation = {"detail": [{"loc": ["body", "messages", 0, "name"], "msg": "Extra inputs are not permitted"}]}
    assert mistral.mistral_error_message(json.dumps(validation).encode()) == (
        "body.messages.0.name: Extra inputs are not permitted"
    )
    assert mistral.mistral_error_message(b'{"object": "error", "message": "Unauthorized"}') == "Unauthorized"


def test_mistral_embeddings_in_base64() -> None:
    answer = {"data": [{"index": 0, "embedding": [0.5, -2.0]}], "model": "mistral-embed", "usage": {"prompt_tokens": 2}}
    out = mistral.embeddings_from_mistral(answer, "base64", "mistral")
    assert struct.unpack("<2f", base64.b64decode(out["data"][0]["embedding"])) == (0.5, -2.0)
    assert out["usage"] == {"prompt_tokens": 2, "total_tokens": 2}


# -------------------------------------------------------------------------- ollama


def test_ollama_request_is_valid_for_the_native_api() -> None:
    request = {
        "messages": CONVERSATION,
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}],
        "max_tokens": 20,
        "stop": "END",
        "response_format": {"type": "json_object"},
        "reasoning_effort": "minimal",
    }
    body = ollama.chat_body(request, "llama3.2", stream=True)
    ChatRequest.model_validate(body)
    assert body["options"] == {"num_predict": 20, "stop": ["END"]} and body["format"] == "json"
    assert body["think"] == "low" and body["messages"][3]["tool_name"] == "weather"
    EmbedRequest.model_validate(ollama.embed_body({"input": ["a", "b"], "dimensions": 4}, "nomic"))


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("tool_choice", "required"), ("parallel_tool_calls", False)])
def test_ollama_refuses_what_it_cannot_honour(field: str, value: object) -> None:
    with pytest.raises(errors.UnsupportedFeature):
        ollama.chat_body({"messages": [], field: value}, "m", stream=False)


def test_ollama_stream_lines_become_chunks_finish_and_usage() -> None:
    translator = ollama._Translator("ollama")
    lines = [
        {"model": "llama3.2", "created_at": "2025-01-01T00:00:00Z", "message": {"role": "assistant", "content": "Hi"}},
        {
            "model": "llama3.2",
            "message": {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": {}}}],
            },
        },
        {
            "model": "llama3.2",
            "message": {"role": "assistant", "content": ""},
            "done": True,
            "done_reason": "stop",
            "prompt_eval_count": 5,
            "eval_count": 3,
        },
    ]
    chunks = [chunk for line in lines for chunk in translator.chunks(line)]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Hi"}
    call = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert call["index"] == 0 and call["id"].startswith("call_") and call["function"]["arguments"] == "{}"
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}
    assert len({c["id"] for c in chunks}) == 1  # one minted completion id


def test_ollama_embeddings_that_ignore_dimensions_are_refused() -> None:
    answer = {"model": "nomic", "embeddings": [[0.1, 0.2, 0.3]], "prompt_eval_count": 2}
    with pytest.raises(errors.UnsupportedFeature, match="dimensions"):
        ollama.embeddings_from_ollama(answer, {"input": "a", "dimensions": 2}, "ollama")
    out = ollama.embeddings_from_ollama(answer, {"input": "a"}, "ollama")
    assert out["usage"]["prompt_tokens"] == 2 and out["data"][0]["embedding"] == [0.1, 0.2, 0.3]
