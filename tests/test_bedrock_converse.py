"""The Bedrock Converse translation on its own (no server): request shapes AWS insists
on, answers and stream events back to OpenAI's."""

from __future__ import annotations

import pytest

from server import errors
from server.providers.bedrock_converse import StreamTranslator, to_chat_completion, to_converse_request

PNG = "iVBORw0KGgo="


def test_consecutive_messages_of_one_role_are_merged_so_roles_alternate():
    body = to_converse_request(
        "bedrock",
        {
            "messages": [
                {"role": "system", "content": "one"},
                {"role": "user", "content": "a"},
                {"role": "user", "content": [{"type": "text", "text": "b"}]},
                {"role": "assistant", "tool_calls": [{"id": "t1", "function": {"name": "f", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "t1", "content": "r1"},
                {"role": "user", "content": "c"},
            ]
        },
    )
    assert [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][0]["content"] == [{"text": "a"}, {"text": "b"}]
    assert body["messages"][2]["content"] == [
        {"toolResult": {"toolUseId": "t1", "content": [{"text": "r1"}]}},
        {"text": "c"},
    ]
    assert body["system"] == [{"text": "one"}]


def test_named_tool_choice_and_single_stop_string():
    tool = {"type": "function", "function": {"name": "f"}}
    body = to_converse_request(
        "bedrock",
        {"messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": tool, "stop": "END"},
    )
    assert body["toolConfig"]["toolChoice"] == {"tool": {"name": "f"}}
    assert body["toolConfig"]["tools"][0]["toolSpec"]["inputSchema"] == {"json": {"type": "object"}}
    assert body["inferenceConfig"] == {"stopSequences": ["END"]}


@pytest.mark.parametrize(
    ("url", "error"),
    [
        ("data:image/bmp;base64," + PNG, errors.InvalidRequest),
        ("data:image/png;base64,not base64!", errors.InvalidRequest),
        ("https://example.com/a.png", errors.UnsupportedFeature),
    ],
)
def test_bad_images_are_refused(url, error):
    part = {"type": "image_url", "image_url": {"url": url}}
    with pytest.raises(error):
        to_converse_request("bedrock", {"messages": [{"role": "user", "content": [part]}]})


def test_bad_tool_arguments_name_the_field():
    call = {"id": "t", "function": {"name": "f", "arguments": "{not json"}}
    with pytest.raises(errors.InvalidRequest, match=r"messages\[0\].tool_calls\[0\].function.arguments"):
        to_converse_request("bedrock", {"messages": [{"role": "assistant", "tool_calls": [call]}]})


def test_answer_usage_counts_cache_reads_and_writes():
    answer = {
        "output": {"message": {"role": "assistant", "content": [{"text": "hi"}]}},
        "stopReason": "model_context_window_exceeded",
        "usage": {"inputTokens": 3, "outputTokens": 2, "cacheReadInputTokens": 10, "cacheWriteInputTokens": 5},
    }
    completion = to_chat_completion(answer, completion_id="c", model="m", created=1)
    assert completion["choices"][0]["finish_reason"] == "length"
    assert completion["usage"] == {
        "prompt_tokens": 18,
        "completion_tokens": 2,
        "total_tokens": 20,
        "prompt_tokens_details": {"cached_tokens": 10},
    }


def test_stream_tool_calls_are_numbered_among_tool_calls():
    translator = StreamTranslator(completion_id="c", model="m", created=1)
    translator.feed("contentBlockDelta", {"delta": {"text": "thinking aloud"}, "contentBlockIndex": 0})
    start = translator.feed(
        "contentBlockStart", {"start": {"toolUse": {"toolUseId": "t", "name": "f"}}, "contentBlockIndex": 1}
    )
    piece = translator.feed("contentBlockDelta", {"delta": {"toolUse": {"input": "{}"}}, "contentBlockIndex": 1})
    assert start[0]["choices"][0]["delta"]["tool_calls"][0]["index"] == 0
    assert piece[0]["choices"][0]["delta"]["tool_calls"] == [{"index": 0, "function": {"arguments": "{}"}}]
    assert translator.feed("someFutureEvent", {}) == [] and not translator.stopped
