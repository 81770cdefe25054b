"""OpenAI's REST chat answers printed by the server (BridgeService) are the JSON the
bridge printed before: the transcoder's printing of ChatService's messages (proto field
names, zero values printed, unset optional fields and messages left out) with the
Lua filter's rewrites (JSON_NULL as null, `"tool_calls":[]`/`"code":""` dropped, an
empty `"param"` as null, the sentinel as `data: [DONE]`).

A loopback fake speaking OpenAI's wire format answers each model with a scripted
answer or list of chunks (tools, nulls, logprobs, usage, refusal, several choices,
unicode, a failure mid-stream); each goes through the REST bridge (the new path) and
through ChatService over gRPC with the bridge's markers, printed here as the
transcoder and the Lua filter did (`transcoder_and_lua`); the parsed JSON must be
equal. (Run against the transcoder path itself, this file passed too.)
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import grpc
import httpx
import pytest
import pytest_asyncio
from google.protobuf import json_format
from google.protobuf.message import Message

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.owners import ensure_owner
from server.api import rest_print
from server.app import start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from tests.conftest import MAX_MESSAGE_BYTES, SINGLE_ATTEMPT, start_bridge
from tests.fakes._http import HttpServer, Request, Response
from tests.helpers import bearer_interceptors, chat_request

UNICODE = 'Grüße, 世界 🌍 \u2028 "quoted" \\ back\tslash \x01 {"tool_calls":[],"code":""}'
USAGE = {
    "prompt_tokens": 11,
    "completion_tokens": 7,
    "total_tokens": 18,
    "prompt_tokens_details": {"cached_tokens": 3, "audio_tokens": 0},
    "completion_tokens_details": {"reasoning_tokens": 2},
}
LOGPROBS = {
    "content": [
        {"token": "Hi", "logprob": -0.25, "bytes": [72, 105], "top_logprobs": [{"token": "Hi", "logprob": -0.25}]},
        {"token": "!", "logprob": 0, "bytes": [33], "top_logprobs": []},
    ],
    "refusal": None,
}
TOOL_CALLS = [
    {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Paris"}'}},
    {"id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}},
]


def completion(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "m",
        "choices": list(choices),
        **extra,
    }


def chunk(*choices: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "m",
        "choices": list(choices),
        **extra,
    }


def delta(index: int = 0, finish: str | None = None, **fields: Any) -> dict[str, Any]:
    return {"index": index, "delta": fields, "finish_reason": finish, "logprobs": None}


# Non-streamed answers by model name.
ANSWERS: dict[str, dict[str, Any]] = {
    "text": completion(
        {
            "index": 0,
            "message": {"role": "assistant", "content": UNICODE, "refusal": None},
            "finish_reason": "stop",
            "logprobs": None,
        },
        usage=USAGE,
        system_fingerprint="fp_1",
    ),
    "tools": completion(
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "tool_calls": TOOL_CALLS},
            "finish_reason": "tool_calls",
        },
        usage={"prompt_tokens": 5, "completion_tokens": 0, "total_tokens": 5},
    ),
    "refusal": completion(
        {
            "index": 0,
            "message": {"role": "assistant", "content": None, "refusal": "I can't help with that."},
            "finish_reason": "stop",
        },
    ),
    "choices-logprobs": completion(
        {"index": 0, "message": {"content": "Hi!"}, "finish_reason": "stop", "logprobs": LOGPROBS},
        {
            "index": 1,
            "message": {"role": "assistant", "content": "", "reasoning_content": "hmm"},
            "finish_reason": "length",
            "logprobs": None,
            "unknown": 1,
        },
        usage={"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        service_tier="default",
    ),
    "bare": {"choices": [{"message": {}}]},
}
# Streamed answers by model name (each chunk one event; then `data: [DONE]`).
STREAMS: dict[str, list[dict[str, Any]]] = {
    "s-text": [
        chunk(delta(role="assistant", content=""), system_fingerprint="fp_1"),
        chunk(delta(content=UNICODE)),
        chunk(delta(content="!")),
        chunk(delta(finish="stop")),
        chunk(usage=USAGE),
    ],
    "s-tools": [
        chunk(
            delta(
                role="assistant",
                content=None,
                tool_calls=[
                    {"index": 0, "id": "call_1", "type": "function", "function": {"name": "weather", "arguments": ""}}
                ],
            )
        ),
        chunk(delta(tool_calls=[{"index": 0, "function": {"arguments": '{"city":'}}])),
        chunk(
            delta(
                tool_calls=[
                    {"index": 1, "id": "call_2", "type": "function", "function": {"name": "time", "arguments": "{}"}}
                ]
            )
        ),
        chunk(delta(finish="tool_calls")),
        chunk(
            delta(content="usage on a content chunk"),
            usage={"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        ),
    ],
    "s-logprobs": [
        chunk(
            {
                "index": 0,
                "delta": {"role": "assistant", "content": "Hi"},
                "finish_reason": None,
                "logprobs": {"content": LOGPROBS["content"][:1], "refusal": None},
            }
        ),
        chunk({"index": 1, "delta": {"content": "Yo"}, "logprobs": None}),
        chunk({"index": 0, "delta": {"refusal": "no"}, "finish_reason": None}),
        chunk({"index": 0, "delta": {}, "finish_reason": "stop"}, {"index": 1, "delta": {}, "finish_reason": "stop"}),
    ],
    "s-error": [chunk(delta(role="assistant", content="par")), chunk(delta(content="tial"))],
    # The fake holds the rest back after the first chunk until the test releases it.
    "s-held": [chunk(delta(role="assistant", content="first")), chunk(delta(content=" then the rest"))],
}
STREAM_ERROR = {"error": {"message": "The model crashed mid-stream.", "type": "server_error", "code": None}}


class ScriptedOpenAI:
    """Answers `/v1/chat/completions` with the scripted answer of the request's model."""

    def __init__(self) -> None:
        self.http = HttpServer(self._handle)
        self.release = asyncio.Event()

    async def _handle(self, request: Request) -> Response:
        body = json.loads(request.body)
        model = body["model"]
        if not body.get("stream"):
            return Response(200, json.dumps(ANSWERS[model]).encode())
        return Response(200, content_type="text/event-stream", stream=self._events(model))

    async def _events(self, model: str) -> AsyncGenerator[bytes, None]:
        for number, item in enumerate(STREAMS[model]):
            if model == "s-held" and number == 1:
                await self.release.wait()
            yield b"data: " + json.dumps(item).encode() + b"\n\n"
        if model == "s-error":
            yield b"data: " + json.dumps(STREAM_ERROR).encode() + b"\n\n"
            return
        yield b"data: [DONE]\n\n"


class Setup:
    def __init__(self, rest_url: str, grpc_port: int, key: str, upstream: ScriptedOpenAI) -> None:
        self.rest_url, self.grpc_port, self.key, self.upstream = rest_url, grpc_port, key, upstream


@pytest_asyncio.fixture(scope="module")
async def setup(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Setup]:
    upstream = ScriptedOpenAI()
    await upstream.http.start()
    settings = Settings(
        grpc_port=0, max_message_bytes=MAX_MESSAGE_BYTES, data_dir=tmp_path_factory.mktemp("printed-data")
    )
    base_url = f"http://127.0.0.1:{upstream.http.port}/v1"
    config = GatewayConfig(routing=SINGLE_ATTEMPT, providers={"openai": ProviderConfig(base_url=base_url, api_key="k")})
    gateway = await start_gateway(settings, config)
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("printed-envoy"))
    owner = await ensure_owner(gateway.accounts.db, "user", "printed")
    _, key = await gateway.accounts.keys.create_key(owner.id, "tests")
    yield Setup(bridge.rest_url, gateway.port, key, upstream)
    await bridge.envoy.stop()
    await gateway.stop(0.5)
    await upstream.http.stop()


# ------------------------------------------------ the old printing, as it was done


def transcoder_and_lua(message: Message) -> Any:
    """`message` as the transcoder printed it, then as the Lua filter rewrote the text."""
    printed = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    text = json.dumps(printed, separators=(",", ":"))
    text = text.replace(':"\\u0000null"', ":null")
    for member in (r'"tool_calls":\[\]', '"alias_of":""', '"error":""', '"code":""', r'"resting":\[\]'):
        text = re.sub("," + member, "", text)
        text = re.sub("{" + member + ",", "{", text)
        text = re.sub("{" + member + "}", "{}", text)
    return json.loads(text.replace('"param":""', '"param":null'))


BRIDGE_METADATA = (("x-aigne-bridge", "sse"), ("x-aigne-rest", "1"))


async def over_grpc(setup: Setup, body: dict[str, Any]) -> Any:
    request = chat_request(model=body["model"], text="hi")
    extra = {name: value for name, value in body.items() if name not in ("model", "messages")}
    json_format.ParseDict(extra, request)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{setup.grpc_port}", interceptors=bearer_interceptors(setup.key)
    ) as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        if not body.get("stream"):
            answer = await stub.CreateChatCompletion(request, metadata=BRIDGE_METADATA[1:])
            return transcoder_and_lua(answer)
        events = []
        async for message in stub.StreamChatCompletion(request, metadata=BRIDGE_METADATA):
            done = message.id == "[DONE]" and not message.choices
            events.append("[DONE]" if done else transcoder_and_lua(message))
        return events


async def over_rest(setup: Setup, body: dict[str, Any]) -> tuple[httpx.Response, Any]:
    headers = {"authorization": f"Bearer {setup.key}"}
    async with httpx.AsyncClient(base_url=setup.rest_url, headers=headers, timeout=20) as http:
        response = await http.post("/v1/chat/completions", json=body)
    if not body.get("stream") or response.status_code != 200:
        return response, response.json()
    assert response.text.endswith("\n\n")
    events = response.text.removesuffix("\n\n").split("\n\n")
    assert all(event.startswith("data: ") for event in events), response.text
    return response, [event[6:] if event == "data: [DONE]" else json.loads(event[6:]) for event in events]


def request_body(model: str, **extra: Any) -> dict[str, Any]:
    return {"model": f"openai/{model}", "messages": [{"role": "user", "content": "hi"}], **extra}


# ------------------------------------------------------------------------ tests


@pytest.mark.parametrize("model", sorted(ANSWERS))
async def test_a_chat_answer_is_printed_as_the_bridge_printed_it(setup, model):
    body = request_body(model)
    response, printed = await over_rest(setup, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.headers["x-aigne-hub-served-by"] == f"openai/{model}"
    assert printed == await over_grpc(setup, body)


@pytest.mark.parametrize("include_usage", [True, False])
@pytest.mark.parametrize("model", sorted(set(STREAMS) - {"s-held"}))
async def test_a_stream_is_printed_as_the_bridge_printed_it(setup, model, include_usage):
    body = request_body(model, stream=True, stream_options={"include_usage": include_usage})
    response, events = await over_rest(setup, body)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream"
    assert response.headers["x-aigne-hub-served-by"] == f"openai/{model}"
    assert events == await over_grpc(setup, body)
    if model == "s-error":
        assert events[-1]["error"]["message"] and "[DONE]" not in events
    else:
        assert events[-1] == "[DONE]"


async def test_each_event_reaches_the_client_as_the_upstream_sends_it(setup):
    headers = {"authorization": f"Bearer {setup.key}"}
    body = request_body("s-held", stream=True)
    async with (
        httpx.AsyncClient(base_url=setup.rest_url, headers=headers, timeout=20) as http,
        http.stream("POST", "/v1/chat/completions", json=body) as response,
    ):
        lines = response.aiter_lines()
        first = await anext(line async for line in lines if line)
        # The upstream has sent one chunk and waits: the client has it already.
        assert json.loads(first.removeprefix("data: "))["choices"][0]["delta"]["content"] == "first"
        setup.upstream.release.set()
        rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[0].removeprefix("data: "))["choices"][0]["delta"]["content"] == " then the rest"


async def test_the_printed_json_keeps_what_clients_rely_on(setup):
    _, answer = await over_rest(setup, request_body("bare"))
    choice = answer["choices"][0]
    # Zero values OpenAI prints, OpenAI's nulls, no empty tool_calls.
    assert choice["index"] == 0 and choice["finish_reason"] == ""
    assert choice["message"] == {"role": "assistant", "content": None, "refusal": None}
    assert choice["logprobs"] is None
    _, answer = await over_rest(setup, request_body("choices-logprobs", n=2, logprobs=True))
    assert answer["choices"][0]["logprobs"]["content"][0]["bytes"] == [72, 105]  # whole numbers stay integers
    assert isinstance(answer["choices"][0]["logprobs"]["content"][1]["logprob"], int)
    _, text = await over_rest(setup, request_body("text"))
    assert text["choices"][0]["message"]["content"] == UNICODE


async def test_an_error_before_the_first_chunk_is_the_openai_error(setup):
    response, _ = await over_rest(setup, request_body("s-text", stream=True, n=0))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "n" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/internal/openai/chat/completions", "/internal/openai/chat/completions:stream"])
async def test_clients_cannot_call_the_internal_bindings(setup, path):
    async with httpx.AsyncClient(base_url=setup.rest_url, timeout=20) as http:
        response = await http.post(path, json=request_body("text"), headers={"x-aigne-bridge": "rest"})
    assert response.status_code == 404
    assert response.json()["error"]["type"] == "not_found_error"


def test_the_printer_walks_each_message_like_message_to_dict():
    """Before the bridge's rules: the same members and values as json_format gives."""
    message = chat_pb.StreamChatCompletionResponse()
    json_format.ParseDict(STREAMS["s-logprobs"][0], message, ignore_unknown_fields=True)
    message.usage.prompt_tokens = 4
    expected = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    printed = rest_print.to_openai_dict(message)
    expected["choices"][0]["delta"].pop("tool_calls")  # the bridge's rule
    expected["choices"][0]["logprobs"]["content"][0]["bytes"] = [72, 105]  # doubles 72.0 -> 72
    expected["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["logprob"] = -0.25
    assert printed == expected
    assert json.loads(rest_print.to_json_bytes(message)) == printed
