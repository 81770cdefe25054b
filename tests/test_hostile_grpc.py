"""Hostile input straight to the gRPC port, as a polyglot client built from reflection
would send it: undecodable bytes, deep values, every documented limit at and past its
edge, unbounded admin values, loose authorization headers, calls that never end.

The gateway here is a real one of this module (admin token and master key set, a short
default deadline so that a call without one ends within the test).
"""

from __future__ import annotations

import ast
import asyncio
import base64
import gc
import math
import os
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2, timestamp_pb2
from google.protobuf.message import Message
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from aigne.hub.v1 import status_service_pb2 as status_pb
from server.accounts.owners import ensure_owner
from server.api.validation import LIMITS, Limit
from server.app import Gateway, start_gateway
from server.cli import DESCRIPTOR_PATH
from server.config import Settings
from tests.conftest import gateway_config
from tests.helpers import chat_request, error_info, value
from tests.raw_h2 import RawH2, grpc_frame

ADMIN_TOKEN = "admin-" + "h" * 32
DEFAULT_DEADLINE_S = 3.0
CHAT = "/aigne.hub.v1.ChatService/CreateChatCompletion"
STREAM_CHAT = "/aigne.hub.v1.ChatService/StreamChatCompletion"
ADMIN = "/aigne.hub.v1.AdminService/"


@dataclass
class Hostile:
    gateway: Gateway
    channel: grpc.aio.Channel
    key: str

    def auth(self, method: str) -> tuple[tuple[str, str], ...]:
        secret = ADMIN_TOKEN if method.startswith(ADMIN) else self.key
        return (("authorization", f"Bearer {secret}"),)

    async def raw(self, method: str, body: bytes, streaming: bool = False) -> grpc.aio.AioRpcError | None:
        """Sends raw request bytes; the call's error, or None when it succeeded."""
        try:
            if streaming:
                call = self.channel.unary_stream(method)(body, metadata=self.auth(method), timeout=20)
                async for _ in call:
                    pass
            else:
                await self.channel.unary_unary(method)(body, metadata=self.auth(method), timeout=20)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    async def call(self, method: str, request: Message, response_type: type[Message]) -> Message:
        call = self.channel.unary_unary(
            method, request_serializer=type(request).SerializeToString, response_deserializer=response_type.FromString
        )
        return await call(request, metadata=self.auth(method), timeout=30)


@pytest.fixture(scope="module")
async def hostile(fake_openai, tmp_path_factory) -> AsyncIterator[Hostile]:
    settings = Settings(
        grpc_port=0,
        max_message_bytes=16 * 1024 * 1024,
        data_dir=tmp_path_factory.mktemp("hostile-data"),
        admin_token=ADMIN_TOKEN,
        master_key=base64.b64encode(os.urandom(32)).decode(),
        default_call_deadline_s=DEFAULT_DEADLINE_S,
        upstream_read_timeout_s=30.0,
    )
    gateway = await start_gateway(settings, gateway_config(fake_openai.base_url))
    owner = await ensure_owner(gateway.accounts.db, "user", "hostile")
    _, key = await gateway.accounts.keys.create_key(owner.id, "hostile")
    options = [("grpc.max_send_message_length", 32 * 1024 * 1024)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", options=options) as channel:
        yield Hostile(gateway, channel, key)
    await gateway.stop(0.5)


def refused(error: grpc.aio.AioRpcError | None, code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT) -> str:
    """Asserts the call failed with `code` and a gateway ErrorInfo; returns its reason."""
    assert error is not None, "the call succeeded"
    assert error.code() == code, (error.code(), error.details())
    return error_info(error).reason


# ----------------------------------------------------------- 1. undecodable requests


def _all_methods() -> list[tuple[str, bool]]:
    """(path, server-streaming) of every method the server offers."""
    modules = [chat_pb, embedding_pb, image_pb, audio_pb, status_pb, admin_pb, health_pb2]
    methods = []
    for module in modules:
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                methods.append((f"/{service.full_name}/{method.name}", method.server_streaming))
    return methods


def _varint(number: int) -> bytes:
    out = bytearray()
    while True:
        out.append((number & 0x7F) | (0x80 if number > 0x7F else 0))
        number >>= 7
        if not number:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _deep_value(levels: int) -> bytes:
    """A google.protobuf.Value of `levels` nested lists (Value.list_value = 6,
    ListValue.values = 1), encoded by hand: no library would build it."""
    encoded = _field(3, b"x")  # innermost: a string_value
    for _ in range(levels):
        encoded = _field(6, _field(1, encoded))
    return encoded


def _chat_with_content(content: bytes) -> bytes:
    message = _field(1, b"user") + _field(2, content)
    return _field(1, b"openai/gpt-4o-mini") + _field(2, message)


GARBAGE = {
    "random bytes": b"\xff\xfe\xfd\xfc\xfb\xfa",
    "truncated varint": b"\x08\xff\xff",
    "length past the end": b"\x0a\x7f" + b"x" * 5,
    "wrong wire type": b"\x0f\x00",
}


@pytest.mark.parametrize("name", sorted(GARBAGE))
async def test_every_method_answers_undecodable_bytes_with_invalid_argument(hostile, name):
    for method, streaming in _all_methods():
        reason = refused(await hostile.raw(method, GARBAGE[name], streaming))
        assert reason == "INVALID_REQUEST", method


async def test_reflection_answers_undecodable_bytes_with_invalid_argument(hostile):
    call = hostile.channel.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo")
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in call(iter([GARBAGE["random bytes"]]), timeout=10):
            pass
    assert refused(caught.value) == "INVALID_REQUEST"
    assert "ServerReflectionRequest" in caught.value.details() and "DecodeError" not in caught.value.details()
    # A well-formed request on the same method still works.
    ok = reflection_pb2.ServerReflectionRequest(list_services="").SerializeToString()
    answers = [a async for a in call(iter([ok]), timeout=10)]
    assert b"aigne.hub.v1.ChatService" in answers[0]


async def test_invalid_utf8_in_a_string_field_is_invalid_argument(hostile):
    body = _field(1, b"openai/\xc3\x28") + _field(2, _field(1, b"user") + _field(2, _field(3, b"hi")))
    error = await hostile.raw(CHAT, body)
    assert refused(error) == "INVALID_REQUEST"
    assert "aigne.hub.v1.CreateChatCompletionRequest" in error.details()
    assert "Unexpected" not in error.details() and "google.protobuf" not in error.details()


async def test_values_nested_past_the_decoders_limit_are_invalid_argument(hostile):
    for levels in (101, 200, 5000):
        assert refused(await hostile.raw(CHAT, _chat_with_content(_deep_value(levels)))) == "INVALID_REQUEST"
        assert refused(await hostile.raw(STREAM_CHAT, _chat_with_content(_deep_value(levels)), True))


async def test_a_well_formed_raw_request_still_works(hostile):
    assert await hostile.raw(CHAT, chat_request().SerializeToString()) is None


async def test_oversized_messages_and_tiny_deadlines_keep_their_codes(hostile):
    """What already worked stays: the message limit and the client's deadline."""
    too_big = _field(1, b"openai/gpt-4o-mini") + _field(15, b"u" * (17 * 1024 * 1024))
    assert (await hostile.raw(CHAT, too_big)).code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.channel.unary_unary(CHAT)(
            chat_request("openai/slow").SerializeToString(), metadata=hostile.auth(CHAT), timeout=0.001
        )
    assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED


# ----------------------------------------------------------- 2. formerly INTERNAL


@pytest.mark.parametrize(
    "stamp",
    [
        timestamp_pb2.Timestamp(seconds=253_402_300_800),  # year 10000
        timestamp_pb2.Timestamp(seconds=-1),
        timestamp_pb2.Timestamp(seconds=2**62),
        timestamp_pb2.Timestamp(seconds=4_000_000_000, nanos=1_000_000_000),
        timestamp_pb2.Timestamp(seconds=4_000_000_000, nanos=-1),
        timestamp_pb2.Timestamp(seconds=1_000_000_000),  # 2001: already past
    ],
)
async def test_create_api_key_with_a_bad_expiry_is_invalid_argument(hostile, stamp):
    request = admin_pb.CreateApiKeyRequest(owner="user:h", name="k", expire_time=stamp)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.call(ADMIN + "CreateApiKey", request, admin_pb.CreateApiKeyResponse)
    assert refused(caught.value) == "INVALID_REQUEST"
    assert error_info(caught.value).metadata["field"] == "expire_time"


async def test_create_api_key_with_a_future_expiry_works(hostile):
    request = admin_pb.CreateApiKeyRequest(
        owner="user:h", name="k", expire_time=timestamp_pb2.Timestamp(seconds=253_402_300_799)
    )
    created = await hostile.call(ADMIN + "CreateApiKey", request, admin_pb.CreateApiKeyResponse)
    assert created.key.expire_time.seconds == 253_402_300_799


@pytest.mark.parametrize("amount", ["1e999999999", "Infinity", "NaN", "-1e30", "9" * 41, "abc"])
async def test_huge_or_non_numeric_credit_amounts_are_invalid_argument(hostile, amount):
    calls = [
        ("GrantCredits", admin_pb.GrantCreditsRequest(owner="user:h", amount=amount), admin_pb.GrantCreditsResponse),
        (
            "CreateApiKey",
            admin_pb.CreateApiKeyRequest(owner="user:h", name="k", spend_cap=amount),
            admin_pb.CreateApiKeyResponse,
        ),
        (
            "SetModelRate",
            admin_pb.SetModelRateRequest(rate=admin_pb.ModelRate(model="openai/x", per_image=amount)),
            admin_pb.SetModelRateResponse,
        ),
    ]
    for method, request, response_type in calls:
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await hostile.call(ADMIN + method, request, response_type)
        assert refused(caught.value) == "INVALID_REQUEST", method
        assert time.monotonic() - started < 5


async def test_empty_allowed_model_glob_is_invalid_argument(hostile):
    request = admin_pb.CreateApiKeyRequest(owner="user:h", name="k", allowed_models=["openai/*", ""])
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.call(ADMIN + "CreateApiKey", request, admin_pb.CreateApiKeyResponse)
    assert error_info(caught.value).metadata["field"] == "allowed_models[1]"


@pytest.mark.parametrize("number", [math.nan, math.inf, -math.inf])
async def test_non_finite_numbers_in_json_values_are_invalid_argument(hostile, number):
    schema = {"type": "object", "properties": {"x": {"type": "number", "maximum": 1.0}}}
    tools_request = chat_request(tools=[{"type": "function", "function": {"name": "f", "parameters": schema}}])
    tools_request.tools[0].function.parameters["properties"]["x"]["maximum"] = number
    format_request = chat_request(
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}}
    )
    format_request.response_format.json_schema.schema["properties"]["x"]["maximum"] = number
    expected = {
        "tools[0].function.parameters.properties.x.maximum": tools_request,
        "response_format.json_schema.schema.properties.x.maximum": format_request,
    }
    for field, request in expected.items():
        for method, streaming in ((CHAT, False), (STREAM_CHAT, True)):
            error = await hostile.raw(method, request.SerializeToString(), streaming)
            assert refused(error) == "INVALID_REQUEST"
            assert error_info(error).metadata["field"] == field


# ----------------------------------------------------------- 3. documented limits


LIMIT_PATTERNS = [
    re.compile(r"(-?\d+(?:\.\d+)?) to (-?\d+(?:\.\d+)?)"),
    re.compile(r"\b(?:up to|at most) (\d+)", re.IGNORECASE),
    re.compile(r"\bat least (\d+|one)\b", re.IGNORECASE),
    re.compile(r"\b(\d+) or more\b"),
]


def documented_limits() -> dict[str, set[float]]:
    """The numbers of every bound a request field's comment in protos/ states, by the
    field's full name, read from the descriptor set's source info."""
    files = descriptor_pb2.FileDescriptorSet.FromString(DESCRIPTOR_PATH.read_bytes())
    found: dict[str, set[float]] = {}
    for file in files.file:
        if not file.name.startswith("aigne/hub/v1/"):
            continue
        comments = {tuple(loc.path): loc.leading_comments for loc in file.source_code_info.location}
        for m_index, message in enumerate(file.message_type):
            for f_index, field in enumerate(message.field):
                comment = " ".join(comments.get((4, m_index, 2, f_index), "").split())
                if comment.startswith("Output only."):
                    continue
                numbers = {
                    1.0 if number == "one" else float(number)
                    for pattern in LIMIT_PATTERNS
                    for match in pattern.finditer(comment)
                    for number in match.groups()
                }
                if numbers:
                    found[f"{file.package}.{message.name}.{field.name}"] = numbers
    return found


def test_every_documented_limit_is_in_the_servers_table():
    documented = documented_limits()
    table = {
        name: {bound for limit in limits for bound in (limit.low, limit.high) if bound is not None}
        for name, limits in LIMITS.items()
    }
    assert documented == table
    # A sanity check of the reader itself: the limits the issue found unenforced.
    for name in ("CreateTranscriptionRequest.temperature", "CreateApiKeyRequest.name", "ChatMessage.name"):
        assert f"aigne.hub.v1.{name}" in documented
    assert documented["aigne.hub.v1.CreateChatCompletionRequest.metadata"] == {16, 64, 512}


def _tool(index: int) -> chat_pb.Tool:
    return chat_pb.Tool(type="function", function=chat_pb.FunctionDefinition(name=f"f{index}"))


@dataclass(frozen=True)
class Target:
    """Where a message type's limits are probed: the RPC, a valid request, and the
    message inside it that holds the limited fields."""

    method: str
    response: type[Message]
    build: Callable[[], Message]
    inner: Callable[[Any], Message] = lambda request: request


TARGETS: dict[str, Target] = {
    "CreateChatCompletionRequest": Target(CHAT, chat_pb.CreateChatCompletionResponse, chat_request),
    "ChatMessage": Target(
        CHAT, chat_pb.CreateChatCompletionResponse, chat_request, lambda request: request.messages[0]
    ),
    "ToolCall": Target(
        CHAT,
        chat_pb.CreateChatCompletionResponse,
        lambda: chat_request(
            messages=[
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "type": "function", "function": {"name": "f", "arguments": "{}"}}],
                },
                {"role": "tool", "tool_call_id": "c", "content": "42"},
            ]
        ),
        lambda request: request.messages[1].tool_calls[0],
    ),
    "GetStatusRequest": Target(
        "/aigne.hub.v1.StatusService/GetStatus", status_pb.GetStatusResponse, status_pb.GetStatusRequest
    ),
    "FunctionDefinition": Target(
        CHAT,
        chat_pb.CreateChatCompletionResponse,
        lambda: chat_request(tools=[{"type": "function", "function": {"name": "f"}}]),
        lambda request: request.tools[0].function,
    ),
    "JsonSchema": Target(
        CHAT,
        chat_pb.CreateChatCompletionResponse,
        lambda: chat_request(response_format={"type": "json_schema", "json_schema": {"name": "s"}}),
        lambda request: request.response_format.json_schema,
    ),
    "CreateSpeechRequest": Target(
        "/aigne.hub.v1.AudioService/CreateSpeech",
        audio_pb.CreateSpeechRequest,  # HttpBody: any message type reads it
        lambda: audio_pb.CreateSpeechRequest(model="openai/tts-1", input="hi", voice="alloy"),
    ),
    "CreateTranscriptionRequest": Target(
        "/aigne.hub.v1.AudioService/CreateTranscription",
        audio_pb.CreateTranscriptionResponse,
        lambda: audio_pb.CreateTranscriptionRequest(model="openai/whisper-1", file=b"RIFF....WAVE", filename="a.wav"),
    ),
    "CreateImageRequest": Target(
        "/aigne.hub.v1.ImageService/CreateImage",
        image_pb.CreateImageResponse,
        lambda: image_pb.CreateImageRequest(model="openai/dall-e-2", prompt="a cat"),
    ),
    "CreateEmbeddingRequest": Target(
        "/aigne.hub.v1.EmbeddingService/CreateEmbedding",
        embedding_pb.CreateEmbeddingResponse,
        lambda: embedding_pb.CreateEmbeddingRequest(model="openai/text-embedding-3-small", input=value("x")),
    ),
    "CreateApiKeyRequest": Target(
        ADMIN + "CreateApiKey",
        admin_pb.CreateApiKeyResponse,
        lambda: admin_pb.CreateApiKeyRequest(owner="user:limits", name="k"),
    ),
    "GrantCreditsRequest": Target(
        ADMIN + "GrantCredits",
        admin_pb.GrantCreditsResponse,
        lambda: admin_pb.GrantCreditsRequest(owner="user:limits", amount="1"),
    ),
    "ModelRate": Target(
        ADMIN + "SetModelRate",
        admin_pb.SetModelRateResponse,
        lambda: admin_pb.SetModelRateRequest(rate=admin_pb.ModelRate(model="openai/limits")),
        lambda request: request.rate,
    ),
    "RateLimit": Target(
        ADMIN + "SetRateLimit",
        admin_pb.SetRateLimitResponse,
        # A glob no model has: limits stored here must not change how other calls are served.
        lambda: admin_pb.SetRateLimitRequest(limit=admin_pb.RateLimit(owner="user:hostile", model="hostile/*", rpm=1)),
        lambda request: request.limit,
    ),
    "GetProviderHealthRequest": Target(
        ADMIN + "GetProviderHealth",
        admin_pb.GetProviderHealthResponse,
        lambda: admin_pb.GetProviderHealthRequest(window_minutes=60),
    ),
    "AddProviderCredentialRequest": Target(
        ADMIN + "AddProviderCredential",
        admin_pb.AddProviderCredentialResponse,
        # "badkey": credentials stored here must not change how other calls are served.
        lambda: admin_pb.AddProviderCredentialRequest(provider="badkey", secret="sk-" + "s" * 20),
    ),
}

# One item of each limited repeated field, map or JSON array, by its index.
ITEMS: dict[str, Callable[[int], Any]] = {
    "messages": lambda i: chat_pb.ChatMessage(role="user", content=value(f"m{i}")),
    "tools": _tool,
    "stop": lambda i: f"s{i}",
    "input": lambda i: f"x{i}",
    "allowed_models": lambda i: f"openai/m{i}*",
    "metadata": lambda i: (f"k{i}", "v"),
}


# Fields that are only allowed beside another one's value.
NEEDS: dict[str, dict[str, object]] = {"top_logprobs": {"logprobs": True}}


def _owner_text(field: str, length: int) -> str:
    if field == "owner":
        return "user:" + "o" * (length - 5)
    if field == "model":  # the fake OpenAI serves any model name
        return "openai/" + "m" * (length - 7)
    return "a" * length


def _set(message: Message, field: str, limit: Limit, size: float) -> None:
    """Puts a value `size` (a number, a length or a count, as `limit.of` says) in the field."""
    target = getattr(message, field)
    if limit.of == "value":
        message.ClearField(field)
        setattr(message, field, size)
    elif limit.of == "length":
        setattr(message, field, _owner_text(field, int(size)))
    elif limit.of == "item_length":
        target[:] = ["a" * int(size)]
    elif limit.of == "key_length":
        target.clear()
        target["k" * int(size)] = "v"
    elif limit.of == "value_length":
        target.clear()
        target["k"] = "v" * int(size)
    elif limit.of == "values":
        target.clear()
        target["50256"] = size
    elif field in ("stop", "input"):
        target.CopyFrom(value([ITEMS[field](i) for i in range(int(size))]))
    elif field == "metadata":
        target.clear()
        target.update(dict(ITEMS[field](i) for i in range(int(size))))
    else:
        del target[:]
        target.extend([ITEMS[field](i) for i in range(int(size))])


def _edges(limit: Limit, is_integer: bool) -> list[tuple[float, bool]]:
    """(value, accepted) at and one past each bound; NaN and infinities for doubles."""
    cases: list[tuple[float, bool]] = []
    step = (lambda x, d: x + d) if is_integer or limit.of != "value" else (lambda x, d: math.nextafter(x, x + d))
    if limit.low is not None:
        if limit.low_exclusive:
            cases += [(step(limit.low, 1), True), (limit.low, False)]
        else:
            cases += [(limit.low, True), (step(limit.low, -1), False)]
    if limit.high is not None:
        cases += [(limit.high, True), (step(limit.high, 1), False)]
    if limit.of in ("value", "values") and not is_integer:
        cases += [(math.nan, False), (math.inf, False), (-math.inf, False), (1e308, limit.high is None)]
    return [(size, ok) for size, ok in cases if not (size < 0 and limit.of not in ("value", "values"))]


def _probes() -> list[tuple[str, Limit, float, bool]]:
    return [
        (name, limit, size, accepted)
        for name, limits in sorted(LIMITS.items())
        for limit in limits
        for size, accepted in _edges(limit, _is_integer(name))
    ]


def _is_integer(name: str) -> bool:
    message_name, field_name = name.removeprefix("aigne.hub.v1.").split(".")
    for module in (chat_pb, audio_pb, image_pb, embedding_pb, admin_pb, status_pb):
        descriptor = module.DESCRIPTOR.message_types_by_name.get(message_name)
        if descriptor is not None:
            field = descriptor.fields_by_name[field_name]
            return field.cpp_type in (field.CPPTYPE_INT32, field.CPPTYPE_INT64)
    raise AssertionError(f"no message {message_name}")


@pytest.mark.parametrize(("name", "limit", "size", "accepted"), _probes(), ids=lambda p: str(p)[:40])
async def test_each_documented_limit_holds_at_its_edge(hostile, name, limit, size, accepted):
    message_name, field = name.removeprefix("aigne.hub.v1.").split(".")
    target = TARGETS[message_name]
    request = target.build()
    for other, other_value in NEEDS.get(field, {}).items():
        setattr(target.inner(request), other, other_value)
    _set(target.inner(request), field, limit, size)
    if accepted:
        await hostile.call(target.method, request, target.response)
        return
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.call(target.method, request, target.response)
    assert refused(caught.value) in ("INVALID_REQUEST", "REQUEST_TOO_LARGE")
    assert re.sub(r"\[[^]]*\]", "", error_info(caught.value).metadata["field"]).endswith(field)


async def test_streamed_chat_enforces_the_same_limits(hostile):
    request = chat_request()
    request.metadata.update({f"k{i}": "v" for i in range(100_000)})
    error = await hostile.raw(STREAM_CHAT, request.SerializeToString(), streaming=True)
    assert refused(error) == "REQUEST_TOO_LARGE" and error_info(error).metadata["field"] == "metadata"


async def test_required_fields_are_enforced(hostile):
    cases = [
        ("RemoveProviderCredential", admin_pb.RemoveProviderCredentialRequest(), "credential_id"),
        ("DeleteProviderCredential", admin_pb.DeleteProviderCredentialRequest(), "credential_id"),
        ("RevokeApiKey", admin_pb.RevokeApiKeyRequest(), "key_id"),
        ("AddProviderCredential", admin_pb.AddProviderCredentialRequest(provider="openai"), "secret"),
        ("SetModelRate", admin_pb.SetModelRateRequest(), "rate"),
        ("SetModelRate", admin_pb.SetModelRateRequest(rate=admin_pb.ModelRate()), "rate.model"),
    ]
    for method, request, field in cases:
        error = await hostile.raw(ADMIN + method, request.SerializeToString())
        assert refused(error) == "INVALID_REQUEST" and error_info(error).metadata["field"] == field
    tool_call = chat_pb.ToolCall(id="c1", type="function", function=chat_pb.FunctionCall(arguments="{}"))
    request = chat_request()
    request.messages.append(chat_pb.ChatMessage(role="assistant", tool_calls=[tool_call]))
    error = await hostile.raw(CHAT, request.SerializeToString())
    assert error_info(error).metadata["field"] == "messages[1].tool_calls[0].function.name"


# ----------------------------------------------------------- 4. admin values bounded


async def test_credentials_for_unknown_providers_are_refused(hostile):
    request = admin_pb.AddProviderCredentialRequest(provider="nosuch", secret="sk-" + "x" * 20)
    error = await hostile.raw(ADMIN + "AddProviderCredential", request.SerializeToString())
    assert refused(error) == "INVALID_REQUEST" and error_info(error).metadata["field"] == "provider"
    configured = admin_pb.AddProviderCredentialRequest(provider="badkey", secret="sk-" + "x" * 20)
    assert await hostile.raw(ADMIN + "AddProviderCredential", configured.SerializeToString()) is None


async def _pages(hostile: Hostile, method: str, request: Message, response_type: type[Message], items: str):
    pages = []
    while True:
        page = await hostile.call(method, request, response_type)
        pages.append(page)
        if not page.next_page_token:
            return pages
        request.page_token = page.next_page_token


async def test_admin_lists_are_paged(hostile):
    owner = f"user:paged{os.urandom(3).hex()}"
    created = []
    for index in range(7):
        request = admin_pb.CreateApiKeyRequest(owner=owner, name=f"k{index}")
        created.append((await hostile.call(ADMIN + "CreateApiKey", request, admin_pb.CreateApiKeyResponse)).key.id)
    listing = admin_pb.ListApiKeysRequest(owner=owner, page_size=3)
    pages = await _pages(hostile, ADMIN + "ListApiKeys", listing, admin_pb.ListApiKeysResponse, "keys")
    assert [len(page.keys) for page in pages] == [3, 3, 1]
    assert [key.id for page in pages for key in page.keys] == created  # oldest first, none twice

    for index in range(3):
        request = admin_pb.SetModelRateRequest(rate=admin_pb.ModelRate(model=f"paged/m{index}", per_image="1"))
        await hostile.call(ADMIN + "SetModelRate", request, admin_pb.SetModelRateResponse)
    rates = await _pages(
        hostile,
        ADMIN + "ListModelRates",
        admin_pb.ListModelRatesRequest(page_size=1),
        admin_pb.ListModelRatesResponse,
        "",
    )
    models = [rate.model for page in rates for rate in page.rates]
    assert {"paged/m0", "paged/m1", "paged/m2"} <= set(models) and models == sorted(set(models))

    for index in range(3):
        request = admin_pb.AddProviderCredentialRequest(provider="badkey", secret=f"sk-paged-{index}-" + "x" * 12)
        await hostile.call(ADMIN + "AddProviderCredential", request, admin_pb.AddProviderCredentialResponse)
    credentials = await _pages(
        hostile,
        ADMIN + "ListProviderCredentials",
        admin_pb.ListProviderCredentialsRequest(provider="badkey", page_size=2),
        admin_pb.ListProviderCredentialsResponse,
        "",
    )
    ids = [c.id for page in credentials for c in page.credentials]
    assert len(ids) >= 3 and len(ids) == len(set(ids)) and all(len(p.credentials) <= 2 for p in credentials)


async def test_reservations_are_paged(hostile):
    credits = hostile.gateway.accounts.credits
    owner = await ensure_owner(hostile.gateway.accounts.db, "user", f"held{os.urandom(3).hex()}")
    billing, blocks = credits.billing_enabled, credits.blocks
    # Five reservations of their own (not draws from one credit block): five rows to page.
    credits.billing_enabled, credits.blocks = True, None
    try:
        await credits.grant(owner.id, 10_000_000)
        held = [await credits.reserve(owner.id, 1_000) for _ in range(5)]
    finally:
        credits.billing_enabled, credits.blocks = billing, blocks
    try:
        pages = await _pages(
            hostile,
            ADMIN + "ListReservations",
            admin_pb.ListReservationsRequest(owner=owner.id, page_size=2),
            admin_pb.ListReservationsResponse,
            "",
        )
        assert [len(page.reservations) for page in pages] == [2, 2, 1]
        assert sorted(r.id for page in pages for r in page.reservations) == sorted(h.id for h in held)
    finally:
        for reservation in held:
            await credits.release(reservation)


async def test_bad_page_requests_are_invalid_argument(hostile):
    first = await hostile.call(
        ADMIN + "ListApiKeys", admin_pb.ListApiKeysRequest(page_size=1), admin_pb.ListApiKeysResponse
    )
    assert first.next_page_token
    bad = [
        admin_pb.ListApiKeysRequest(page_size=-1),
        admin_pb.ListApiKeysRequest(page_token="not a token"),
        admin_pb.ListApiKeysRequest(page_token=base64.urlsafe_b64encode(b'{"after": 1}').decode()),
        admin_pb.ListApiKeysRequest(owner="user:other", page_token=first.next_page_token),
    ]
    for request in bad:
        error = await hostile.raw(ADMIN + "ListApiKeys", request.SerializeToString())
        assert refused(error) == "INVALID_REQUEST", request
    # A token of another list is refused too, not run as a query.
    rates = admin_pb.ListModelRatesRequest(page_token=first.next_page_token)
    assert refused(await hostile.raw(ADMIN + "ListModelRates", rates.SerializeToString())) == "INVALID_REQUEST"


async def test_list_answers_stay_small_with_the_largest_values_stored(hostile):
    owner = f"user:big{os.urandom(3).hex()}"
    for index in range(30):
        request = admin_pb.CreateApiKeyRequest(
            owner=owner, name=f"{index:03d}" + "n" * 197, allowed_models=["m" * 200] * 100
        )
        await hostile.call(ADMIN + "CreateApiKey", request, admin_pb.CreateApiKeyResponse)
    page = await hostile.call(
        ADMIN + "ListApiKeys", admin_pb.ListApiKeysRequest(owner=owner, page_size=10_000), admin_pb.ListApiKeysResponse
    )
    assert len(page.keys) == 30
    # At most 1000 keys of at most ~20.5 KB each: a page is bounded whatever is stored.
    assert page.ByteSize() < 30 * 21_000


# ----------------------------------------------------------- 5. answers and auth


async def test_unknown_ids_are_not_found_with_their_own_reason(hostile):
    for method, request in [
        ("RevokeApiKey", admin_pb.RevokeApiKeyRequest(key_id="nosuch")),
        ("ActivateProviderCredential", admin_pb.ActivateProviderCredentialRequest(credential_id="nosuch")),
    ]:
        error = await hostile.raw(ADMIN + method, request.SerializeToString())
        assert refused(error, grpc.StatusCode.NOT_FOUND) == "RESOURCE_NOT_FOUND"


async def test_a_key_must_come_once_with_the_bearer_scheme(hostile):
    body = chat_request().SerializeToString()
    call = hostile.channel.unary_unary(CHAT)

    async def with_metadata(*entries: tuple[str, str]) -> grpc.aio.AioRpcError | None:
        try:
            await call(body, metadata=entries, timeout=10)
        except grpc.aio.AioRpcError as error:
            return error
        return None

    assert await with_metadata(("authorization", f"bearer {hostile.key}")) is None
    for entries in [
        (("authorization", hostile.key),),
        (("authorization", f"Basic {hostile.key}"),),
        (("authorization", f"Bearer {hostile.key}"), ("authorization", f"Bearer {hostile.key}")),
        (("authorization", f"Bearer {hostile.key}"), ("authorization", "Bearer ahk_other")),
    ]:
        assert refused(await with_metadata(*entries), grpc.StatusCode.UNAUTHENTICATED) == "UNAUTHENTICATED"


async def test_rest_applies_the_same_authorization_rule(bridge, api_key):
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20) as http:
        ok = await http.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {api_key}"})
        assert ok.status_code == 200
        raw = await http.post("/v1/chat/completions", json=chat, headers={"authorization": api_key})
        assert raw.status_code == 401 and raw.json()["error"]["code"] == "UNAUTHENTICATED"
        twice = await http.post(
            "/v1/chat/completions",
            json=chat,
            headers=[("authorization", f"Bearer {api_key}"), ("authorization", f"Bearer {api_key}")],
        )
        assert twice.status_code == 401


# ----------------------------------------------------------- 6. calls that never end


def _raw_call(port: int, key: str, body: bytes, *, end_stream: bool, wait_s: float) -> tuple[float, Any]:
    connection = RawH2("127.0.0.1", port)
    try:
        started = time.monotonic()
        stream = connection.call(CHAT, body, end_stream=end_stream, metadata=(("authorization", f"Bearer {key}"),))
        answer = connection.answer(stream, wait_s)
        return time.monotonic() - started, answer
    finally:
        connection.close()


@pytest.mark.parametrize(
    "body",
    [grpc_frame(b"\x0a\x05openai", announced=500), grpc_frame(b"", announced=10), b"", b"\x00\x00"],
    ids=["short-message", "prefix-only", "no-message", "partial-prefix"],
)
async def test_a_call_ending_without_a_complete_message_is_answered_at_once(hostile, body):
    elapsed, answer = await asyncio.to_thread(
        _raw_call, hostile.gateway.port, hostile.key, body, end_stream=True, wait_s=10
    )
    assert answer.ended and answer.get("grpc-status") == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert "without a complete" in (answer.get("grpc-message") or "")
    assert elapsed < DEFAULT_DEADLINE_S  # answered, not timed out


async def test_a_call_without_a_deadline_that_never_finishes_its_request_ends(hostile):
    body = grpc_frame(b"\x0a\x05openai", announced=500)
    elapsed, answer = await asyncio.to_thread(
        _raw_call, hostile.gateway.port, hostile.key, body, end_stream=False, wait_s=DEFAULT_DEADLINE_S + 20
    )
    assert answer.ended and answer.get("grpc-status") == str(grpc.StatusCode.DEADLINE_EXCEEDED.value[0])
    assert "AIGNE_HUB_DEFAULT_CALL_DEADLINE_S" in (answer.get("grpc-message") or "")
    assert DEFAULT_DEADLINE_S - 0.5 <= elapsed < DEFAULT_DEADLINE_S + 15


async def test_a_running_call_without_a_deadline_ends_at_the_default_one(hostile, fake_openai):
    assert fake_openai.slow_seconds > DEFAULT_DEADLINE_S + 1
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.channel.unary_unary(CHAT)(
            chat_request("openai/slow").SerializeToString(), metadata=hostile.auth(CHAT)
        )
    assert refused(caught.value, grpc.StatusCode.DEADLINE_EXCEEDED) == "CALL_TIMEOUT"
    assert DEFAULT_DEADLINE_S - 0.5 <= time.monotonic() - started < fake_openai.slow_seconds


async def test_a_call_with_its_own_deadline_is_not_cut_at_the_default_one(hostile, fake_openai):
    answer = await hostile.call(CHAT, chat_request("openai/slow"), chat_pb.CreateChatCompletionResponse)
    assert answer.choices


# ----------------------------------------------------------- memory


def _rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_rss_stays_bounded_after_hundreds_of_hostile_calls(hostile):
    """The gateway runs in this process and the hostile client in another: after 400
    hostile calls (undecodable, deep, oversized metadata, 1 MB names, 8 MB secrets,
    huge amounts) this process's RSS comes back within 200 MB of its start (calls end
    a moment after their client has its answer, so it is polled, for up to 20 s)."""
    gc.collect()
    start = _rss_bytes()
    client = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.hostile_client",
        str(hostile.gateway.port),
        hostile.key,
        ADMIN_TOKEN,
        "50",
        stdout=asyncio.subprocess.PIPE,
    )
    output, _ = await asyncio.wait_for(client.communicate(), 100)
    assert client.returncode == 0
    # Every hostile call but the (coerced) oversized page is refused as bad input.
    assert ast.literal_eval(output.decode()) == {"INVALID_ARGUMENT": 350, "OK": 50}
    deadline = time.monotonic() + 20
    while True:
        gc.collect()
        grown = _rss_bytes() - start
        if grown < 200 * 1024 * 1024 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert grown < 200 * 1024 * 1024, f"RSS stayed {grown / 2**20:.0f} MB above its start"
    # The server still answers normally.
    assert await hostile.raw(CHAT, chat_request().SerializeToString()) is None


async def test_rest_callers_get_the_same_limits(bridge, api_key):
    chat = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi", "name": "n" * 65}]}
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=20) as http:
        answer = await http.post("/v1/chat/completions", json=chat, headers={"authorization": f"Bearer {api_key}"})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "REQUEST_TOO_LARGE"
    assert answer.json()["error"]["param"] == "messages[0].name"


async def test_an_unauthenticated_call_is_refused_as_such_whatever_its_body(hostile):
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await hostile.channel.unary_unary(CHAT)(GARBAGE["random bytes"], timeout=10)
    assert refused(caught.value, grpc.StatusCode.UNAUTHENTICATED) == "UNAUTHENTICATED"
