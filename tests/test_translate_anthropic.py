"""Anthropic's translator without a server: OpenAI request -> Messages request (checked
by the fake's validator, which refuses what the real API refuses), Messages answer and
stream events (built by the fake's own event writer) -> OpenAI, error bodies -> errors."""

from __future__ import annotations

import json

import httpx
import pytest

from server import errors
from server.providers.anthropic import (
    StreamTranslator,
    anthropic_error,
    to_chat_completion,
    to_messages_request,
)
from tests.fakes.anthropic_upstream import stream_events, validate

TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
MESSAGE = {
    "id": "msg_01",
    "type": "message",
    "role": "assistant",
    "model": "claude-haiku-4-5",
    "content": [
        {"type": "thinking", "thinking": "Need the weather.", "signature": "sig=="},
        {"type": "text", "text": "Let me check."},
        {"type": "tool_use", "id": "toolu_01", "name": "weather", "input": {"city": "Paris"}},
    ],
    "stop_reason": "tool_use",
    "stop_sequence": None,
    "usage": {
        "input_tokens": 10,
        "output_tokens": 7,
        "cache_creation_input_tokens": 2,
        "cache_read_input_tokens": 3,
    },
}


def test_request_is_one_the_api_accepts() -> None:
    request = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "developer", "content": "Use tools."},
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "toolu_01", "type": "function", "function": {"name": "weather", "arguments": '{"city":"P"}'}}
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_01", "content": "sunny"},
            {"role": "user", "content": "thanks"},
        ],
        "tools": TOOLS,
        "tool_choice": "required",
        "stop": "END",
        "user": "u-1",
    }
    body = to_messages_request("anthropic", request, "claude-haiku-4-5")
    validate(body)
    assert body["system"] == [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use tools."}]
    assert body["max_tokens"] == 32_000 and body["stop_sequences"] == ["END"]
    assert body["tool_choice"] == {"type": "any"} and body["metadata"] == {"user_id": "u-1"}
    tool_turn = body["messages"][2]
    assert tool_turn["role"] == "user"  # tool results and the text after them share one turn
    assert tool_turn["content"][0] == {"type": "tool_result", "tool_use_id": "toolu_01", "content": "sunny"}


@pytest.mark.parametrize(("field", "value"), [("n", 2), ("seed", 1), ("logit_bias", {"1": 2})])
def test_what_anthropic_cannot_do_is_refused(field: str, value: object) -> None:
    request = {"messages": [{"role": "user", "content": "x"}], field: value}
    with pytest.raises(errors.UnsupportedFeature, match=field):
        to_messages_request("anthropic", request, "claude-haiku-4-5")


def test_answer_becomes_a_chat_completion() -> None:
    completion = to_chat_completion("anthropic", MESSAGE, 1_700_000_000)
    choice = completion["choices"][0]
    assert completion["id"] == "msg_01" and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["content"] == "Let me check."
    assert choice["message"]["reasoning_content"] == "Need the weather."
    assert choice["message"]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Paris"}'}
    assert completion["usage"]["prompt_tokens"] == 15  # input + cache reads + cache writes
    assert completion["usage"]["prompt_tokens_details"] == {"cached_tokens": 3}


def test_stream_events_become_chunks_with_tool_indices_and_usage() -> None:
    translator = StreamTranslator("anthropic", 1_700_000_000)
    chunks = [chunk for event in stream_events(MESSAGE) for chunk in translator.feed(event)]
    assert translator.finished and translator.stop_reason == "tool_use"
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    text = "".join(d.get("content") or "" for d in deltas)
    thinking = "".join(d.get("reasoning_content") or "" for d in deltas)
    calls = [call for d in deltas for call in d.get("tool_calls") or []]
    assert text == "Let me check." and thinking == "Need the weather."
    assert calls[0]["index"] == 0 and calls[0]["id"] == "toolu_01"
    assert json.loads("".join(c["function"]["arguments"] for c in calls)) == {"city": "Paris"}
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 7
    assert translator.blocks()[0]["signature"] == "sig=="  # what the next turn sends back


def test_error_event_mid_stream_raises_its_class() -> None:
    translator = StreamTranslator("anthropic", 0)
    with pytest.raises(errors.UpstreamUnavailable, match="overloaded_error"):
        translator.feed({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


@pytest.mark.parametrize(
    ("status", "kind", "expected"),
    [
        (529, "overloaded_error", errors.UpstreamUnavailable),
        (401, "authentication_error", errors.UpstreamCredentialRejected),
        (400, "billing_error", errors.UpstreamAuthFailed),
        (429, "rate_limit_error", errors.UpstreamRateLimited),
        (418, "teapot_error", errors.UpstreamUnavailable),  # an unknown type: the status decides
    ],
)
def test_error_bodies(status: int, kind: str, expected: type) -> None:
    body = json.dumps({"type": "error", "error": {"type": kind, "message": "why"}}).encode()
    error = anthropic_error("anthropic", status, httpx.Headers({"retry-after": "4"}), body)
    assert isinstance(error, expected) and error.retry_after_seconds == 4.0
