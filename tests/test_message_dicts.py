"""The one-walk path from request messages to dicts (server.api.message_dicts) gives
byte for byte what `json_format.MessageToDict` plus the whole-number rule gives, or
steps aside; and `convert.to_json` answers the same either way."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from server import errors
from server.api import message_dicts
from server.api.convert import chat_body, to_json, whole_numbers_to_int

SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "description": "é ✓ 😀"},
        "days": {"type": "integer", "minimum": 1, "maximum": 16.5, "default": 3.0},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 1, "examples": [[], [True, None, 2.5]]},
        "big": {"const": 2**60, "small": -(2**53) + 1.0, "tiny": 1e-300},
    },
    "required": ["city"],
    "additionalProperties": False,
}
FULL_CHAT = {
    "model": "openai/gpt-4o-mini",
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "u"}}]},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            "refusal": "",
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42", "name": "f"},
        {"role": "user"},
    ],
    "temperature": 0.0,
    "top_p": 0.5,
    "n": 1,
    "stream": False,
    "stream_options": {"include_usage": True},
    "stop": ["a", "b"],
    "max_tokens": 0,
    "max_completion_tokens": 100,
    "presence_penalty": -2,
    "frequency_penalty": 1.25,
    "logit_bias": {"50256": -100, "12": 0.5},
    "seed": -(2**62),
    "user": "u-1",
    "tools": [
        {"type": "function", "function": {"name": "f", "description": "d", "parameters": SCHEMA, "strict": True}}
    ],
    "tool_choice": {"type": "function", "function": {"name": "f"}},
    "parallel_tool_calls": False,
    "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMA, "strict": False}},
    "reasoning_effort": "low",
    "metadata": {"k": "v", "é": ""},
    "logprobs": False,
    "top_logprobs": 3,
}

MESSAGES: list[Message] = [
    json_format.ParseDict(FULL_CHAT, chat_pb.CreateChatCompletionRequest()),
    chat_pb.CreateChatCompletionRequest(model="m", messages=[chat_pb.ChatMessage(role="user")]),
    json_format.ParseDict({"model": "m", "stop": "x", "tool_choice": "auto"}, chat_pb.CreateChatCompletionRequest()),
    json_format.ParseDict(
        {"model": "m", "messages": [{"role": "user", "content": 3.0}]}, chat_pb.CreateChatCompletionRequest()
    ),
    chat_pb.CreateChatCompletionRequest(),
    json_format.ParseDict({"model": "m", "input": ["a", "b"], "dimensions": 8}, embedding_pb.CreateEmbeddingRequest()),
    json_format.ParseDict({"model": "m", "input": [[1, 2], [3]]}, embedding_pb.CreateEmbeddingRequest()),
    image_pb.CreateImageRequest(prompt="p", n=2, size="1024x1024"),
    audio_pb.CreateSpeechRequest(model="m", input="i", voice="v", speed=1.0),
]


def _through_json_format(message: Message) -> Any:
    return whole_numbers_to_int(json_format.MessageToDict(message, preserving_proto_field_name=True))


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_builds_byte_for_byte_what_json_format_gives(message: Message) -> None:
    built = message_dicts.to_dict(message)
    assert built is not None
    expected = _through_json_format(message)
    # Same keys in the same order, same values of the same types (1 is not 1.0).
    assert json.dumps(built, ensure_ascii=False) == json.dumps(expected, ensure_ascii=False)
    assert to_json(message) == built


def test_chat_body_as_before() -> None:
    body = chat_body(MESSAGES[0])  # type: ignore[arg-type]
    assert "model" not in body and "logprobs" not in body
    assert body["seed"] == -(2**62)
    assert body["temperature"] == 0 and isinstance(body["temperature"], int)
    assert body["tools"][0]["function"]["parameters"]["properties"]["days"]["default"] == 3
    assert body["tools"][0]["function"]["parameters"]["properties"]["big"]["const"] == float(2**60)
    assert list(body) == [name for name in FULL_CHAT if name not in ("model", "logprobs")]


def _non_finite(value: float) -> chat_pb.CreateChatCompletionRequest:
    request = chat_pb.CreateChatCompletionRequest(model="m")
    request.messages.add(role="user").content.number_value = value
    return request


STEPS_ASIDE: list[Message] = [
    chat_pb.CreateChatCompletionRequest(model="m", temperature=math.nan),  # json_format prints "NaN"
    chat_pb.CreateChatCompletionRequest(model="m", logit_bias={"1": math.inf}),
    _non_finite(math.inf),  # json_format refuses: to_json words the error
    audio_pb.CreateTranscriptionRequest(model="m", file=b"\x00\x01"),  # bytes are base64
    embedding_pb.CreateEmbeddingResponse(data=[embedding_pb.Embedding(floats=embedding_pb.FloatVector(values=[0.5]))]),
]


@pytest.mark.parametrize("message", STEPS_ASIDE, ids=lambda m: type(m).__name__)
def test_steps_aside_where_json_format_has_its_own_rule(message: Message) -> None:
    assert message_dicts.to_dict(message) is None


def test_to_json_still_refuses_non_finite_numbers_with_their_path() -> None:
    with pytest.raises(errors.InvalidRequest, match="NaN or infinite"):
        to_json(_non_finite(math.nan))
    assert to_json(STEPS_ASIDE[0]) == {"model": "m", "temperature": "NaN"}
