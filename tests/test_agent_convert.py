"""Fast tests of the pure AIGNE <-> OpenAI conversions (server/api/agent_convert.py)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from google.protobuf import json_format

from aigne.hub.v1 import agent_service_pb2 as agent_pb
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.api import agent_convert
from server.errors import InvalidRequest


def agent_input(**fields: Any) -> agent_pb.ChatModelInput:
    fields.setdefault("modelOptions", {"model": "openai/gpt-4o-mini"})
    fields.setdefault("messages", [{"role": "user", "content": "hi"}])
    return json_format.ParseDict(fields, agent_pb.ChatModelInput())


def chat_json(agent: agent_pb.ChatModelInput) -> dict[str, Any]:
    return json_format.MessageToDict(agent_convert.chat_request(agent), preserving_proto_field_name=True)


def test_roles_parts_and_tool_calls_become_openais() -> None:
    request = chat_json(
        agent_input(
            messages=[
                {"role": "system", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "see"}, {"type": "url", "url": "https://x/y.png"}],
                },
                {"role": "user", "content": [{"type": "file", "data": "QUJD", "mimeType": "image/jpeg"}]},
                {
                    "role": "agent",
                    "toolCalls": [
                        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"count": 2, "x": 0.5}}}
                    ],
                },
                {"role": "tool", "toolCallId": "c1", "content": "done"},
            ]
        )
    )
    roles = [m["role"] for m in request["messages"]]
    assert roles == ["system", "user", "user", "assistant", "tool"]
    assert request["messages"][1]["content"][1] == {"type": "image_url", "image_url": {"url": "https://x/y.png"}}
    assert request["messages"][2]["content"][0]["image_url"]["url"] == "data:image/jpeg;base64,QUJD"
    call = request["messages"][3]["tool_calls"][0]
    assert json.loads(call["function"]["arguments"]) == {"count": 2, "x": 0.5}
    assert re.search(r'"count": 2[,}]', call["function"]["arguments"]), "whole numbers stay integers"
    assert request["messages"][4]["tool_call_id"] == "c1"


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "assistant", "content": "x"}], "input.messages[0].role"),
        (
            [{"role": "user", "content": [{"type": "local", "path": "/etc/passwd"}]}],
            "input.messages[0].content[0].type",
        ),
    ],
)
def test_what_a_remote_hub_cannot_take_is_refused_by_name(messages: list[Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        agent_convert.chat_request(agent_input(messages=messages))
    assert caught.value.field == field


def test_model_is_required() -> None:
    with pytest.raises(InvalidRequest, match=r"modelOptions\.model"):
        agent_convert.chat_request(agent_input(modelOptions={"temperature": 1}))


@pytest.mark.parametrize(
    ("effort", "expected"), [("low", "low"), (6000, "high"), (1500, "medium"), (600, "low"), (1, "minimal")]
)
def test_reasoning_effort(effort: Any, expected: str) -> None:
    request = chat_json(agent_input(modelOptions={"model": "openai/o4-mini", "reasoningEffort": effort}))
    assert request["reasoning_effort"] == expected


def test_tool_choice_object_names_the_function_and_parallel_calls_only_with_tools() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    request = chat_json(
        agent_input(tools=[tool], toolChoice=tool, modelOptions={"model": "m/x", "parallelToolCalls": False})
    )
    assert request["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert request["parallel_tool_calls"] is False
    assert "parallel_tool_calls" not in chat_json(agent_input(modelOptions={"model": "m/x", "parallelToolCalls": True}))
    with pytest.raises(InvalidRequest):
        agent_convert.chat_request(agent_input(toolChoice="sometimes"))


def test_structured_output_is_json_and_plain_text_stays_text() -> None:
    answer = json_format.ParseDict(
        {"model": "openai/m", "choices": [{"message": {"content": '{"a": 1}'}}], "usage": {"prompt_tokens": 3}},
        chat_pb.CreateChatCompletionResponse(),
    )
    structured = agent_convert.chat_output(answer, structured=True)
    assert json_format.MessageToDict(structured.json) == {"a": 1} and not structured.HasField("text")
    plain = agent_convert.chat_output(answer, structured=False)
    assert plain.text == '{"a": 1}' and plain.usage.input_tokens == 3


def test_stream_state_passes_text_on_and_assembles_tool_calls() -> None:
    state = agent_convert.StreamState(structured=False)
    chunks = [
        {"model": "openai/m", "choices": [{"delta": {"content": "Hi"}}]},
        {
            "choices": [
                {"delta": {"tool_calls": [{"index": 0, "id": "c1", "function": {"name": "f", "arguments": '{"ci'}}]}}
            ]
        },
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": 'ty": "Paris"}'}}]}}]},
        {"choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 7}},
    ]
    events = [state.take(json_format.ParseDict(c, chat_pb.StreamChatCompletionResponse())) for c in chunks]
    assert [e.delta.text.text if e else None for e in events] == ["Hi", None, None, None]
    last = json_format.MessageToDict(state.last_event())["delta"]["json"]
    assert last["toolCalls"] == [
        {"id": "c1", "type": "function", "function": {"name": "f", "arguments": {"city": "Paris"}}}
    ]
    assert last["usage"] == {"inputTokens": 5, "outputTokens": 7} and last["model"] == "openai/m"


def test_image_options_input_wins_and_gpt_image_gets_no_format() -> None:
    agent = json_format.ParseDict(
        {
            "prompt": "cat",
            "size": "512x512",
            "modelOptions": {"model": "openai/dall-e-3", "size": "1x1", "quality": "hd"},
        },
        agent_pb.ImageModelInput(),
    )
    request = agent_convert.image_request(agent)
    assert (request.size, request.quality, request.response_format) == ("512x512", "hd", "b64_json")
    agent.model_options.model = "openai/gpt-image-1"
    assert agent_convert.image_request(agent).response_format == ""
