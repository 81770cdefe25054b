"""Issue 18, item by item: where the gateway differed from OpenAI's published spec.

Each test drives the real bridge and server with the fake OpenAI upstream (whose
answers follow OpenAI's wire format, see tests/test_fake_openai_upstream.py).
"""

from __future__ import annotations

import json

import httpx
import pytest

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import image_service_pb2 as image_pb
from aigne.hub.v1 import image_service_pb2_grpc as image_grpc
from server.accounts.owners import ensure_owner
from tests.fakes.openai_upstream import IMAGE_OUTPUT_TOKENS
from tests.helpers import chat_request

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture
async def http(bridge, auth_headers):
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20, headers=auth_headers) as client:
        yield client


def sse_chunks(text: str) -> list[dict]:
    events = [line[len("data: ") :] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(event) for event in events[:-1]]


# 1. Chat answers carry the nulls OpenAI sends.


async def test_chat_answer_has_null_logprobs_refusal_and_content(http):
    plain = (await http.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": HELLO})).json()
    [choice] = plain["choices"]
    assert choice["logprobs"] is None
    assert choice["message"]["refusal"] is None
    assert choice["message"]["content"] == "echo: hello there"
    filtered = await http.post("/v1/chat/completions", json={"model": "openai/content-filter", "messages": HELLO})
    message = filtered.json()["choices"][0]["message"]
    assert message["content"] is None and message["refusal"] is None


async def test_grpc_callers_see_unset_fields_not_the_rest_marker(channel):
    stub = chat_grpc.ChatServiceStub(channel)
    response = await stub.CreateChatCompletion(chat_request(model="openai/content-filter"))
    [choice] = response.choices
    assert not choice.message.HasField("content") and not choice.message.HasField("refusal")
    assert choice.logprobs.WhichOneof("kind") == "null_value"
    chunks = [chunk async for chunk in stub.StreamChatCompletion(chat_request())]
    finishes = [choice.finish_reason for chunk in chunks for choice in chunk.choices]
    assert finishes[:-1] == [""] * (len(finishes) - 1) and finishes[-1] == "stop"
    assert all("\x00" not in str(chunk) for chunk in chunks)


async def test_text_that_looks_like_the_marker_survives(http):
    # A user text that looks like the marker's JSON travels as an escaped string.
    text = 'x":"\\u0000null" :"\u0000null"'
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": text}]}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.json()["choices"][0]["message"]["content"] == f"echo: {text}"
    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    pieces = "".join(c["choices"][0]["delta"].get("content") or "" for c in sse_chunks(streamed.text))
    assert pieces == f"echo: {text}"


# 2. Stream chunks carry finish_reason null until the last.


async def test_every_chunk_before_the_last_has_finish_reason_null(http):
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "stream": True}
    chunks = sse_chunks((await http.post("/v1/chat/completions", json=body)).text)
    finishes = [chunk["choices"][0]["finish_reason"] for chunk in chunks]
    assert len(finishes) >= 3
    assert finishes[:-1] == [None] * (len(finishes) - 1) and finishes[-1] == "stop"
    assert all(chunk["choices"][0]["logprobs"] is None for chunk in chunks)


# 3. Image usage keeps OpenAI's names and numbers, for the client and the ledger.


async def test_gpt_image_usage_reaches_the_client_and_the_ledger(gateway, bridge):
    owner = await ensure_owner(gateway.accounts.db, "project", "image-usage")
    record, secret = await gateway.accounts.keys.create_key(owner.id, "image usage")
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20) as client:
        response = await client.post(
            "/v1/images/generations",
            json={"model": "openai/gpt-image-1", "prompt": "a red fox", "n": 2},
            headers={"authorization": f"Bearer {secret}"},
        )
    assert response.status_code == 200, response.text
    body = response.json()
    output = 2 * IMAGE_OUTPUT_TOKENS
    assert body["usage"]["input_tokens"] == 3 and body["usage"]["output_tokens"] == output
    assert body["usage"]["total_tokens"] == 3 + output
    assert body["usage"]["input_tokens_details"] == {"text_tokens": 3, "image_tokens": 0}
    # The chat names, kept for the contract's existing clients, carry the same numbers.
    assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (3, output)
    assert (body["background"], body["output_format"], body["size"]) == ("opaque", "png", "1024x1024")
    [stored] = await gateway.accounts.ledger.records(key_id=record.id)
    assert (stored.input_tokens, stored.output_tokens, stored.image_count) == (3, output, 2)


async def test_dall_e_answers_have_no_usage(channel):
    stub = image_grpc.ImageServiceStub(channel)
    response = await stub.CreateImage(image_pb.CreateImageRequest(model="openai/dall-e-3", prompt="a fox"))
    assert not response.HasField("usage") and not response.HasField("size")


# 4. A map value of the wrong JSON type is a 400 naming the field.


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("metadata", {"a": {}}, "a string"),
        ("logit_bias", {"a": {}}, "a number"),
        ("metadata", {"a": {"b": [1]}, "c": "d"}, "a string"),
    ],
)
async def test_an_object_as_a_map_value_is_a_400_naming_the_field(http, fake_openai, field, value, kind):
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, field: value}
    for stream in (False, True):
        response = await http.post("/v1/chat/completions", json={**body, "stream": stream})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == field and error["code"] == "INVALID_REQUEST"
        assert error["message"] == f"{field}: every value of this map must be {kind}"
    assert not fake_openai.requests


# 5. Parameters the contract does not carry are refused, naming them, never dropped.


@pytest.mark.parametrize(
    ("path", "extra", "reason"),
    [
        ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "mp3"}}, "audio output is not supported"),
        ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "choosing output modalities"),
        ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "predicted outputs"),
        ("/v1/chat/completions", {"functions": [{"name": "f"}]}, "deprecated by OpenAI"),
        ("/v1/chat/completions", {"function_call": "auto"}, "give tool_choice instead"),
        ("/v1/chat/completions", {"web_search_options": {}}, "web search"),
        ("/v1/chat/completions", {"frobnicate": 1}, "Unrecognized request argument supplied: frobnicate"),
        ("/v1/embeddings", {"frobnicate": [1]}, "Unrecognized request argument supplied: frobnicate"),
        ("/v1/images/generations", {"moderation": "low"}, "is not supported by the gateway"),
        ("/v1/audio/speech", {"stream_format": "sse"}, "streamed speech events"),
        ("/v1/images/generations", {"stream": True}, "streaming this operation is not supported"),
    ],
)
async def test_a_parameter_the_gateway_does_not_carry_is_a_400_naming_it(http, fake_openai, path, extra, reason):
    bodies = {
        "/v1/chat/completions": {"model": "openai/gpt-4o-mini", "messages": HELLO},
        "/v1/embeddings": {"model": "openai/text-embedding-3-small", "input": "a"},
        "/v1/images/generations": {"model": "openai/dall-e-3", "prompt": "a fox"},
        "/v1/audio/speech": {"model": "openai/tts-1", "input": "hi", "voice": "alloy"},
    }
    streams = (False, True) if path == "/v1/chat/completions" else (False,)
    for stream in streams:
        body = {**bodies[path], **extra, **({"stream": True} if stream else {})}
        response = await http.post(path, json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert reason in error["message"], error
        assert error["param"] == next(iter(extra)) and error["code"] == "INVALID_REQUEST"
    assert not fake_openai.requests


async def test_logprobs_are_carried_to_openai_and_back(http, fake_openai):
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "logprobs": True, "top_logprobs": 2}
    answer = (await http.post("/v1/chat/completions", json=body)).json()
    assert fake_openai.last_request.json["logprobs"] is True and fake_openai.last_request.json["top_logprobs"] == 2
    content = answer["choices"][0]["logprobs"]["content"]
    assert [entry["token"] for entry in content] == ["echo: ", "hello ", "there"]
    assert [len(entry["top_logprobs"]) for entry in content] == [2, 2, 2]
    assert answer["choices"][0]["logprobs"]["refusal"] is None
    streamed = await http.post("/v1/chat/completions", json={**body, "stream": True})
    chunks = sse_chunks(streamed.text)
    tokens = [c["choices"][0]["logprobs"]["content"][0]["token"] for c in chunks if c["choices"][0]["logprobs"]]
    assert tokens == ["echo: ", "hello ", "there"]


async def test_top_logprobs_needs_logprobs_and_a_bound(http):
    for extra, problem in (
        ({"top_logprobs": 2}, "only allowed when logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "20"),
    ):
        body = {"model": "openai/gpt-4o-mini", "messages": HELLO, **extra}
        response = await http.post("/v1/chat/completions", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "top_logprobs" and problem in error["message"], error


async def test_false_and_null_count_as_absent_and_camel_case_names_are_known(http, fake_openai):
    body = {
        "model": "openai/gpt-4o-mini",
        "messages": HELLO,
        "logprobs": False,
        "store": False,
        "audio": None,
        "maxTokens": 50,
        "nested": None,
    }
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    assert fake_openai.last_request.json["max_tokens"] == 50
    assert "logprobs" not in fake_openai.last_request.json


async def test_a_member_name_with_unusual_characters_is_refused(http):
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "wé ird,name": 1}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert "Unrecognized request argument" in response.json()["error"]["message"]


async def test_more_members_than_any_operation_has_are_refused(http):
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, **{f"x{i}": None for i in range(70)}}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 400, response.text
    assert "more than 64 top-level members" in response.json()["error"]["message"]


async def test_role_function_is_refused_with_the_way_out(http):
    messages = [*HELLO, {"role": "function", "name": "f", "content": "42"}]
    response = await http.post("/v1/chat/completions", json={"model": "openai/gpt-4o-mini", "messages": messages})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "messages[1].role" and "role 'tool'" in error["message"]


async def test_nested_keys_named_like_parameters_are_not_refused(http):
    # Only top-level members are parameters: "audio" inside a tool's schema is data.
    schema = {"type": "object", "properties": {"audio": {"type": "string"}, "functions": {"type": "array"}}}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    body = {"model": "openai/gpt-4o-mini", "messages": HELLO, "tools": [tool]}
    response = await http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text


# 6. Smaller: a voice object gets a clear 400; images default their model like OpenAI.


async def test_a_voice_object_is_a_clear_400(http, fake_openai):
    body = {"model": "openai/tts-1", "input": "hi", "voice": {"id": "voice_1234"}}
    response = await http.post("/v1/audio/speech", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["message"].startswith("voice: a custom voice given as an object")
    assert error["type"] == "invalid_request_error" and "scalar" not in error["message"]
    assert not fake_openai.requests


async def test_a_voice_name_still_works(http):
    body = {"model": "openai/tts-1", "input": "hi", "voice": "alloy"}
    response = await http.post("/v1/audio/speech", json=body)
    assert response.status_code == 200, response.text


async def test_images_default_to_openais_default_model(http, fake_openai):
    response = await http.post("/v1/images/generations", json={"prompt": "a red fox"})
    assert response.status_code == 200, response.text
    assert fake_openai.last_request.json["model"] == "dall-e-2"
    assert len(response.json()["data"]) == 1
