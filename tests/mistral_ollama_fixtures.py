"""A gateway + REST bridge in front of fake upstreams, and one way to call it per
transport, so that a provider test runs the same request through gRPC and through
REST (the official openai SDK) and asserts on the same plain dicts.

Used by the Mistral, Ollama and OpenAI-preset tests.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
import openai
from google.protobuf import json_format

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import embedding_service_pb2 as embedding_pb
from aigne.hub.v1 import embedding_service_pb2_grpc as embedding_grpc
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from tests.conftest import SINGLE_ATTEMPT, Bridge, start_bridge
from tests.helpers import error_info

JSON = dict[str, Any]
UPSTREAM_TIMEOUT_S = 2.0

# ErrorReason -> (gRPC status, REST status), as server/api/errors.py maps them.
STATUSES = {
    "UPSTREAM_BAD_REQUEST": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "UPSTREAM_AUTH_FAILED": (grpc.StatusCode.PERMISSION_DENIED, 403),
    "UPSTREAM_NOT_FOUND": (grpc.StatusCode.NOT_FOUND, 404),
    "UPSTREAM_RATE_LIMITED": (grpc.StatusCode.RESOURCE_EXHAUSTED, 429),
    "UPSTREAM_UNAVAILABLE": (grpc.StatusCode.UNAVAILABLE, 503),
    "UPSTREAM_TIMEOUT": (grpc.StatusCode.DEADLINE_EXCEEDED, 504),
    "UPSTREAM_MALFORMED_RESPONSE": (grpc.StatusCode.UNAVAILABLE, 503),
    "UNSUPPORTED_FEATURE": (grpc.StatusCode.INVALID_ARGUMENT, 400),
    "INVALID_REQUEST": (grpc.StatusCode.INVALID_ARGUMENT, 400),
}


@dataclass
class Stack:
    """A running gateway, its bridge, and clients for both transports."""

    gateway: Gateway
    bridge: Bridge
    channel: grpc.aio.Channel
    oai: openai.AsyncOpenAI

    @property
    def grpc(self) -> GrpcVia:
        return GrpcVia(self.channel)

    @property
    def rest(self) -> RestVia:
        return RestVia(self.oai)

    def via(self, transport: str) -> Via:
        return self.grpc if transport == "grpc" else self.rest

    async def stop(self) -> None:
        await self.oai.close()
        await self.channel.close()
        await self.bridge.envoy.stop()
        await self.gateway.stop(0.5)


async def start_stack(providers: dict[str, ProviderConfig], tmp_dir: Path) -> Stack:
    settings = Settings(
        grpc_port=0, auth_required=False, upstream_read_timeout_s=UPSTREAM_TIMEOUT_S, shutdown_grace_s=1.0
    )
    gateway = await start_gateway(settings, GatewayConfig(providers=providers, routing=SINGLE_ATTEMPT))
    bridge = await start_bridge(gateway.port, tmp_dir)
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    oai = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key="sk-gateway", max_retries=0, timeout=20)
    return Stack(gateway, bridge, channel, oai)


@dataclass
class Failure:
    """A failed call, whichever transport it came through."""

    reason: str  # the ErrorReason (ErrorInfo.reason over gRPC, error.code over REST)
    status: Any  # grpc.StatusCode, or the HTTP status
    message: str
    retry_after: str | None = None
    chunks: list[JSON] = field(default_factory=list)  # received before a stream failed

    def expected_status(self, transport: str) -> Any:
        grpc_code, http_status = STATUSES[self.reason]
        return grpc_code if transport == "grpc" else http_status


class Via(Protocol):
    name: str

    async def chat(self, **request: Any) -> JSON: ...
    async def stream(self, **request: Any) -> list[JSON]: ...
    async def embed(self, **request: Any) -> JSON: ...
    async def chat_failure(self, **request: Any) -> Failure: ...
    async def stream_failure(self, **request: Any) -> Failure: ...
    async def embed_failure(self, **request: Any) -> Failure: ...


class GrpcVia:
    """Calls the gRPC services with OpenAI-shaped request dicts; answers dicts."""

    name = "grpc"

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self._chat = chat_grpc.ChatServiceStub(channel)
        self._embeddings = embedding_grpc.EmbeddingServiceStub(channel)

    async def chat(self, **request: Any) -> JSON:
        response = await self._chat.CreateChatCompletion(_proto(request, chat_pb.CreateChatCompletionRequest()))
        return _dict(response)

    async def stream(self, **request: Any) -> list[JSON]:
        call = self._chat.StreamChatCompletion(_stream_request(request))
        return [_dict(chunk) async for chunk in call]

    async def embed(self, **request: Any) -> JSON:
        response = await self._embeddings.CreateEmbedding(_proto(request, embedding_pb.CreateEmbeddingRequest()))
        return _dict(response)

    async def chat_failure(self, **request: Any) -> Failure:
        try:
            await self.chat(**request)
        except grpc.aio.AioRpcError as exc:
            return _grpc_failure(exc, [])
        raise AssertionError("the call succeeded")

    async def stream_failure(self, **request: Any) -> Failure:
        chunks: list[JSON] = []
        call = self._chat.StreamChatCompletion(_stream_request(request))
        try:
            async for chunk in call:
                chunks.append(_dict(chunk))
        except grpc.aio.AioRpcError as exc:
            return _grpc_failure(exc, chunks)
        raise AssertionError(f"the stream succeeded: {chunks}")

    async def embed_failure(self, **request: Any) -> Failure:
        try:
            await self.embed(**request)
        except grpc.aio.AioRpcError as exc:
            return _grpc_failure(exc, [])
        raise AssertionError("the call succeeded")


class RestVia:
    """Calls the REST bridge with the official openai SDK; answers the SDK's dicts."""

    name = "rest"

    def __init__(self, oai: openai.AsyncOpenAI) -> None:
        self._oai = oai

    async def chat(self, **request: Any) -> JSON:
        completion = await self._oai.chat.completions.create(**request)
        return completion.model_dump()

    async def stream(self, **request: Any) -> list[JSON]:
        stream = await self._oai.chat.completions.create(**request, stream=True)
        return [chunk.model_dump(warnings=False) async for chunk in stream]

    async def embed(self, **request: Any) -> JSON:
        return (await self._oai.embeddings.create(**request)).model_dump(warnings=False)

    async def chat_failure(self, **request: Any) -> Failure:
        try:
            await self.chat(**request)
        except openai.APIStatusError as exc:
            return _rest_failure(exc, [])
        raise AssertionError("the call succeeded")

    async def stream_failure(self, **request: Any) -> Failure:
        chunks: list[JSON] = []
        try:
            stream = await self._oai.chat.completions.create(**request, stream=True)
            async for chunk in stream:
                chunks.append(chunk.model_dump())
        except openai.APIStatusError as exc:
            return _rest_failure(exc, chunks)
        except openai.APIError as exc:  # an error event after the first chunk
            return Failure(str(exc.code), None, exc.message, None, chunks)
        raise AssertionError(f"the stream succeeded: {chunks}")

    async def embed_failure(self, **request: Any) -> Failure:
        try:
            await self.embed(**request)
        except openai.APIStatusError as exc:
            return _rest_failure(exc, [])
        raise AssertionError("the call succeeded")


@dataclass
class Assembled:
    """A streamed answer put back together, as a client would."""

    roles: list[str]
    content: str
    reasoning: str
    tool_calls: dict[int, JSON]
    finish_reasons: list[str]
    usage: JSON | None
    ids: set[str]


def assemble(chunks: list[JSON]) -> Assembled:
    result = Assembled([], "", "", {}, [], None, set())
    for chunk in chunks:
        result.ids.add(chunk["id"])
        if chunk.get("usage"):
            result.usage = chunk["usage"]
        for choice in chunk.get("choices") or []:
            _add_delta(result, choice.get("delta") or {})
            if choice.get("finish_reason"):
                result.finish_reasons.append(choice["finish_reason"])
    return result


def _add_delta(result: Assembled, delta: JSON) -> None:
    if delta.get("role"):
        result.roles.append(delta["role"])
    result.content += delta.get("content") or ""
    result.reasoning += delta.get("reasoning_content") or ""
    for piece in delta.get("tool_calls") or []:
        call = result.tool_calls.setdefault(piece["index"], {"id": None, "name": "", "arguments": "", "pieces": 0})
        call["pieces"] += 1
        if piece.get("id"):
            assert call["id"] is None, f"a second id for tool call {piece['index']}"
            call["id"] = piece["id"]
        function = piece.get("function") or {}
        call["name"] += function.get("name") or ""
        call["arguments"] += function.get("arguments") or ""


def _stream_request(request: JSON) -> chat_pb.CreateChatCompletionRequest:
    # `stream` may be absent over gRPC, but stream_options is only valid with it set.
    return _proto({**request, "stream": True}, chat_pb.CreateChatCompletionRequest())


def _proto(request: JSON, message: Any) -> Any:
    return json_format.ParseDict(request, message)


def _dict(message: Any) -> JSON:
    result: JSON = json_format.MessageToDict(
        message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
    )
    return result


def _grpc_failure(exc: grpc.aio.AioRpcError, chunks: list[JSON]) -> Failure:
    retry_after = dict(exc.trailing_metadata() or ()).get("retry-after")
    reason = error_info(exc).reason
    return Failure(reason, exc.code(), exc.details() or "", str(retry_after) if retry_after else None, chunks)


def _rest_failure(exc: openai.APIStatusError, chunks: list[JSON]) -> Failure:
    retry_after = exc.response.headers.get("retry-after")
    return Failure(str(exc.code), exc.status_code, exc.message, retry_after, chunks)
