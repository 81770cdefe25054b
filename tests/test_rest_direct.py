"""A chunk or a completion printed straight from the upstream's dict
(server.api.rest_direct) is, byte for byte, what the proto round trip prints (dict ->
message -> rest_print), or the direct path steps aside.

The round trip is the reference: tests/test_rest_printed.py checks it against what
the transcoder and the bridge's Lua filter printed. Here the two paths meet on the
chunks the adapters produce and on thousands of variants with the values an
upstream could get wrong (types, ranges, nulls, Unicode, unknown and camelCase
names), generated from a fixed seed.
"""

from __future__ import annotations

import copy
import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from google.protobuf import json_format
from google.protobuf.message import Message

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from server import errors
from server.api import chat, rest_direct, rest_print
from server.api.convert import JSON_NULL, from_json
from tests.bench.fake_upstream import completion_body, stream_body

TOOL_CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
]
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2, "accepted_prediction_tokens": 0},
}


def _chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "gpt-4o-mini",
        "system_fingerprint": "fp_1",
        "choices": list(choices),
        **top,
    }


CHUNKS: list[dict[str, Any]] = [
    *(json.loads(line[6:]) for line in stream_body().splitlines() if line.startswith("data: {")),
    _chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}),
    _chunk({"index": 0, "delta": {"content": 'Grüße, 世界 🌍 \u2028 "q" \\ \t \x01'}, "finish_reason": None}),
    _chunk({"index": 0, "delta": {"reasoning_content": "Thinking…"}}),
    _chunk({"index": 0, "delta": {"refusal": "I can't."}, "finish_reason": None}),
    _chunk(
        {
            "index": 0,
            "delta": {
                "tool_calls": [
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}},
                    {"index": 1, "function": {"arguments": '{"city":'}},
                ]
            },
        }
    ),
    _chunk(
        {"index": 0, "delta": {}, "finish_reason": "tool_calls"}, {"index": 1, "delta": {}, "finish_reason": "stop"}
    ),
    _chunk(usage=USAGE),
    _chunk(
        {"index": 0, "delta": {"content": "x"}}, usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
    ),
    _chunk({"index": 0, "delta": {"content": "hi"}, "logprobs": {"content": [{"token": "hi", "logprob": -0.5}]}}),
    _chunk({"index": 0, "delta": {"content": None, "role": None}, "finish_reason": ""}),
    _chunk({"index": 0, "delta": {"content": "x", "tool_calls": []}}),  # printed without the empty list
    _chunk({"index": 0, "delta": {"content": "x"}}, error={"message": "m", "type": "t", "code": "", "param": ""}),
    {"choices": []},
    {},
    _chunk({"index": 0, "delta": {"content": "x"}}, service_tier="default", obfuscation="abc"),  # unknown members
]


@dataclass(frozen=True)
class Kind:
    """One answer the bridge prints: its two paths, and what ChatServicer sends."""

    round_trip: Callable[[dict[str, Any], bool], bytes]
    direct: Callable[[dict[str, Any], bool], dict[str, Any] | None]
    framed: Callable[[bytes], bytes]
    sent: Callable[[dict[str, Any], bool], bytes]


CHUNK_KIND = Kind(
    round_trip=lambda data, nulls: chat.sse_event(chat._chunk_message(data, "p", nulls)),
    direct=lambda data, nulls: rest_direct.openai_dict(data, chat._CHUNK, chat._CHUNK_NULLS[nulls]),
    framed=lambda text: b"data: " + text + b"\n\n",
    sent=lambda data, nulls: chat._chunk_event(data, "p", nulls),
)
COMPLETION_KIND = Kind(
    round_trip=lambda data, nulls: rest_print.to_json_bytes(
        chat.chat_completion_from_openai(data, provider="p", json_nulls=nulls)
    ),
    direct=lambda data, nulls: rest_direct.openai_dict(data, chat._COMPLETION, chat._COMPLETION_FILLS[nulls]),
    framed=lambda text: text,
    sent=lambda data, nulls: chat._completion_json(data, "p", nulls),
)


def _same_event(chunk: dict[str, Any], json_nulls: bool, kind: Kind = CHUNK_KIND) -> bool:
    """Asserts what is sent is the round trip's; True when the direct path printed it."""
    original = copy.deepcopy(chunk)
    try:
        expected: bytes | None = kind.round_trip(copy.deepcopy(chunk), json_nulls)
    except errors.UpstreamMalformedResponse:
        expected = None
    direct = kind.direct(chunk, json_nulls)
    assert chunk == original or _has_nan(original), "the upstream's dict was changed"
    if expected is None:
        assert direct is None, f"printed what the round trip refuses: {chunk!r}"
        with pytest.raises(errors.UpstreamMalformedResponse):
            kind.sent(chunk, json_nulls)
        return False
    assert kind.sent(chunk, json_nulls) == expected, chunk
    if direct is None:
        return False
    assert kind.framed(rest_print.json_text(direct)) == expected, chunk
    return True


def _direct(chunk: dict[str, Any], json_nulls: bool) -> dict[str, Any] | None:
    return CHUNK_KIND.direct(chunk, json_nulls)


def _has_nan(value: Any) -> bool:
    if isinstance(value, float):
        return math.isnan(value)
    if isinstance(value, dict):
        return any(_has_nan(item) for item in value.values())
    if isinstance(value, list):
        return any(_has_nan(item) for item in value)
    return False


@pytest.mark.parametrize("json_nulls", [True, False])
@pytest.mark.parametrize("chunk", CHUNKS)
def test_adapter_chunks_print_as_the_round_trip(chunk: dict[str, Any], json_nulls: bool) -> None:
    _same_event(chunk, json_nulls)


def test_well_formed_chunks_take_the_direct_path() -> None:
    """Only a non-null `logprobs` (a google.protobuf.Value) needs the round trip."""
    for chunk in CHUNKS:
        needs_round_trip = any(choice.get("logprobs") for choice in chunk.get("choices", []))
        assert (_direct(chunk, True) is None) == needs_round_trip, chunk


# Values an upstream could send in place of any member.
ODD_VALUES: list[Any] = [
    None,
    "",
    "text",
    "é ✓ 😀",
    "\ud800",  # a lone surrogate (json.loads gives them)
    JSON_NULL,
    0,
    1,
    -1,
    2**31 - 1,
    2**31,
    2**32,
    2**53 + 1,
    2**63,
    2**64,
    10**400,
    0.0,
    -0.0,
    1.5,
    3.0,
    1e300,
    float("nan"),
    float("inf"),
    True,
    False,
    [],
    [None],
    ["a"],
    [1, 2],
    {},
    {"index": 0},
    {"content": "x"},
    {"null_value": 0},
]
ODD_NAMES = ["finishReason", "systemFingerprint", "toolCalls", "promptTokens", "reasoningContent", "unknown", "usage"]


def _mutations(value: Any, rng: random.Random) -> Any:
    """`value` with one member somewhere replaced, added or removed."""
    if isinstance(value, dict):
        mutated = dict(value)
        roll = rng.random()
        if value and roll < 0.5:
            name = rng.choice(list(value))
            mutated[name] = _mutations(value[name], rng) if rng.random() < 0.5 else rng.choice(ODD_VALUES)
        elif value and roll < 0.65:
            del mutated[rng.choice(list(value))]
        else:
            mutated[rng.choice(ODD_NAMES + list(value))] = copy.deepcopy(rng.choice(ODD_VALUES))
        return mutated
    if isinstance(value, list) and value:
        mutated_list = list(value)
        index = rng.randrange(len(value))
        mutated_list[index] = _mutations(value[index], rng)
        return mutated_list
    return copy.deepcopy(rng.choice(ODD_VALUES))


@pytest.mark.parametrize("json_nulls", [True, False])
def test_generated_variants_print_as_the_round_trip_or_step_aside(json_nulls: bool) -> None:
    rng = random.Random(20261201)
    direct = stepped_aside = 0
    for _ in range(3000):
        chunk = rng.choice(CHUNKS)
        for _ in range(rng.randint(1, 3)):
            chunk = _mutations(chunk, rng)
        if _same_event(chunk, json_nulls):
            direct += 1
        else:
            stepped_aside += 1
    # Both sides are exercised (with this seed: about 730 direct, 2,270 aside).
    assert direct > 500 and stepped_aside > 500, (direct, stepped_aside)


COMPLETIONS: list[dict[str, Any]] = [
    json.loads(completion_body()),
    {
        "id": "chatcmpl-2",
        "object": "chat.completion",
        "created": 1_700_000_000,
        "model": "gpt-4o",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "Hi", "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {"content": None, "tool_calls": TOOL_CALLS, "reasoning_content": "Because…"},
                "finish_reason": "tool_calls",
            },
            {"index": 2, "message": {"role": "", "content": "", "refusal": "No."}, "finish_reason": "stop"},
        ],
        "usage": USAGE,
        "system_fingerprint": "fp_2",
        "service_tier": "default",
    },
    {"choices": [{"index": 0, "message": {"role": "assistant", "content": "x", "tool_calls": []}}]},
    {"choices": [{"index": 0, "finish_reason": "stop"}]},  # no message: the round trip adds one
    {"choices": [{"index": 0, "message": {"content": "x"}, "logprobs": {"content": []}}]},
    {},
]


@pytest.mark.parametrize("json_nulls", [True, False])
@pytest.mark.parametrize("answer", COMPLETIONS)
def test_completions_print_as_the_round_trip(answer: dict[str, Any], json_nulls: bool) -> None:
    _same_event(answer, json_nulls, COMPLETION_KIND)


def test_well_formed_completions_take_the_direct_path() -> None:
    for answer in COMPLETIONS[:3]:
        assert COMPLETION_KIND.direct(answer, True) is not None, answer


@pytest.mark.parametrize("json_nulls", [True, False])
def test_generated_completion_variants_print_as_the_round_trip_or_step_aside(json_nulls: bool) -> None:
    rng = random.Random(1201)
    direct = stepped_aside = 0
    for _ in range(2000):
        answer = rng.choice(COMPLETIONS)
        for _ in range(rng.randint(1, 3)):
            answer = _mutations(answer, rng)
        if _same_event(answer, json_nulls, COMPLETION_KIND):
            direct += 1
        else:
            stepped_aside += 1
    assert direct > 300 and stepped_aside > 300, (direct, stepped_aside)


# Other messages, with no nulls added: the direct walk is the round trip's.
OTHER_MESSAGES: list[tuple[type[Message], dict[str, Any]]] = [
    (
        chat_pb.CreateChatCompletionResponse,
        {
            "id": "c",
            "created": 1,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "hi", "refusal": None},
                    "finish_reason": "stop",
                }
            ],
            "usage": USAGE,
        },
    ),
    (image_pb.CreateImageResponse, {"created": 1, "data": [{"url": "https://x/y.png", "revised_prompt": "p"}]}),
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"index": 0, "floats": {}}], "model": "m"}),
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"floats": {}, "float32_le": None}]}),  # two oneof members
    (embedding_pb.CreateEmbeddingResponse, {"data": [{"floats": {"values": [0.5]}}]}),  # 32-bit floats
]


@pytest.mark.parametrize(("message_type", "data"), OTHER_MESSAGES)
def test_other_messages_print_as_the_round_trip_or_step_aside(
    message_type: type[Message], data: dict[str, Any]
) -> None:
    rng = random.Random(7)
    variants = [data] + [_mutations(data, rng) for _ in range(500)]
    for variant in variants:
        direct = rest_direct.openai_dict(variant, message_type.DESCRIPTOR, frozenset())
        try:
            expected = rest_print.to_openai_dict(from_json(copy.deepcopy(variant), message_type(), provider="p"))
        except (errors.UpstreamMalformedResponse, json_format.ParseError):
            assert direct is None, variant
            continue
        if direct is not None:
            assert rest_print.json_text(direct) == rest_print.json_text(expected), variant


def test_a_lone_surrogate_where_an_object_belongs_is_a_malformed_answer() -> None:
    """Found by the variants above: ParseDict read the string as member names and
    upb raised SystemError (an internal error for the client) instead of ParseError."""
    with pytest.raises(errors.UpstreamMalformedResponse, match=r"cannot hold.*SystemError"):
        chat._chunk_event(_chunk(usage="\ud800"), "p", True)


def test_a_huge_integer_in_logprobs_is_a_malformed_answer() -> None:
    """Found by the variants above: ParseDict raised OverflowError (an internal error)
    for an integer beyond a double's range in a google.protobuf.Value."""
    answer = {"choices": [{"index": 0, "message": {"content": "x"}, "logprobs": {"n": 10**400}}]}
    with pytest.raises(errors.UpstreamMalformedResponse, match=r"cannot hold.*OverflowError"):
        chat._completion_json(answer, "p", True)


def test_json_text_is_the_standard_encoders_text_but_for_float_style() -> None:
    printed = {"s": "".join(map(chr, range(128))) + "\u2028é世界🌍", "n": [1, -2, 0.5, 2**53 - 1, -(2**63)], "z": None}
    assert rest_print.json_text(printed) == json.dumps(printed, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.loads(rest_print.json_text({"f": 1.5e-05})) == {"f": 1.5e-05}
    # Beyond orjson (the printing rules leave none of these): the standard encoder writes it.
    assert rest_print.json_text({"n": 2**70}) == b'{"n":1180591620717411303424}'
