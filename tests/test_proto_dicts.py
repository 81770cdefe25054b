"""The constructor fast path (server.api.proto_dicts) gives exactly what
`json_format.ParseDict(ignore_unknown_fields=True)` gives, or steps aside."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from server import errors
from server.api import proto_dicts
from server.api.convert import from_json

COMPLETION: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini-2024-07-18",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hello!", "refusal": None, "annotations": []},
            "logprobs": None,
            "finish_reason": "stop",
        },
        {
            "index": 1,
            "message": {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
            },
            "finish_reason": "tool_calls",
        },
    ],
    "usage": {
        "prompt_tokens": 13,
        "completion_tokens": 9,
        "total_tokens": 22,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "accepted_prediction_tokens": 0},
    },
    "system_fingerprint": "fp_1",
    "service_tier": "default",
}
CHUNK: dict[str, Any] = {
    "id": "chatcmpl-1",
    "object": "chat.completion.chunk",
    "created": 1_700_000_000,
    "model": "gpt-4o-mini",
    "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}],
    "usage": None,
}

# Inputs the fast path builds itself.
BUILT: list[tuple[type[Message], dict[str, Any]]] = [
    (chat_pb.CreateChatCompletionResponse, COMPLETION),
    (chat_pb.StreamChatCompletionResponse, CHUNK),
    (chat_pb.StreamChatCompletionResponse, {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
    (chat_pb.StreamChatCompletionResponse, {"choices": [], "usage": {"prompt_tokens": 1, "total_tokens": 1}}),
    (chat_pb.StreamChatCompletionResponse, {"choices": [{"delta": {"content": "é ✓ 😀"}}]}),
    (chat_pb.CreateChatCompletionResponse, {"choices": [{"message": {}}], "usage": {}}),
    (chat_pb.CreateChatCompletionResponse, {}),
    (image_pb.CreateImageResponse, {"created": 1, "data": [{"url": "https://x/y.png", "revised_prompt": "p"}]}),
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"index": 0, "floats": {}}], "model": "m"}),  # one oneof member
]
# Inputs ParseDict may read differently (coercions, aliases, well-known types) or
# refuse (and word the error): the fast path steps aside.
LEFT_TO_JSON_FORMAT: list[tuple[type[Message], dict[str, Any]]] = [
    (chat_pb.CreateChatCompletionResponse, {"created": 3.0}),  # a whole number as a float
    (chat_pb.CreateChatCompletionResponse, {"created": "3"}),
    (chat_pb.CreateChatCompletionResponse, {"created": -1}),  # out of range: ParseDict's error
    (chat_pb.CreateChatCompletionResponse, {"created": True}),
    (chat_pb.CreateChatCompletionResponse, {"systemFingerprint": "fp"}),  # the JSON name
    (chat_pb.CreateChatCompletionResponse, {"choices": [{"logprobs": {"content": []}}]}),  # a Value
    (chat_pb.CreateChatCompletionResponse, {"choices": [None]}),
    (chat_pb.CreateChatCompletionResponse, {"choices": {"index": 0}}),
    (chat_pb.CreateChatCompletionResponse, {"choices": [{"message": "hi"}]}),
    (chat_pb.CreateChatCompletionResponse, {"model": 4}),
    (chat_pb.StreamChatCompletionResponse, {"choices": [{"delta": {"content": 1.5}}]}),
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"floats": {}, "float32_le": None}]}),  # two oneof members
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"floats": {"values": [0.5]}}]}),  # 32-bit floats
]


def _parse_dict(message_type: type[Message], data: dict[str, Any]) -> Message | Exception:
    try:
        return json_format.ParseDict(copy.deepcopy(data), message_type(), ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        return exc


@pytest.mark.parametrize(("message_type", "data"), BUILT)
def test_builds_what_parse_dict_builds(message_type: type[Message], data: dict[str, Any]) -> None:
    expected = _parse_dict(message_type, data)
    built = proto_dicts.build(message_type, data)
    assert built is not None
    assert isinstance(expected, Message)
    assert built == expected
    assert built.SerializeToString(deterministic=True) == expected.SerializeToString(deterministic=True)
    # Presence too: a set-but-empty message or a null Value is kept as ParseDict keeps it.
    assert json_format.MessageToDict(built) == json_format.MessageToDict(expected)


@pytest.mark.parametrize(("message_type", "data"), LEFT_TO_JSON_FORMAT)
def test_steps_aside_where_parse_dict_may_differ(message_type: type[Message], data: dict[str, Any]) -> None:
    assert proto_dicts.build(message_type, data) is None


def test_from_json_reads_as_parse_dict_with_or_without_the_fast_path() -> None:
    for message_type, data in BUILT + LEFT_TO_JSON_FORMAT:
        expected = _parse_dict(message_type, data)
        if isinstance(expected, Exception):
            with pytest.raises(errors.UpstreamMalformedResponse, match="answered with a field of an unexpected type"):
                from_json(data, message_type(), provider="p")
        else:
            assert from_json(data, message_type(), provider="p") == expected


def test_the_input_is_not_changed() -> None:
    data = copy.deepcopy(COMPLETION)
    proto_dicts.build(chat_pb.CreateChatCompletionResponse, data)
    assert data == COMPLETION
