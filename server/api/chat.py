"""ChatService: complete and streamed chat completions.

A stream the gateway ends while shutting down (see server.api.shutdown) ends with an
error event SHUTTING_DOWN over REST, or the UNAVAILABLE status over gRPC, and is
recorded as "interrupted".
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncGenerator, Callable
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, Generic, TypeAlias, TypeVar

import grpc

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import common_pb2
from server import errors
from server.accounts.service import Accounts
from server.api import rest_direct
from server.api.call_metadata import call_metadata
from server.api.calls import CallOptions, MeteredServicer, abort_for, from_bridge, unary, wants_json_nulls
from server.api.convert import chat_body, chat_chunk_from_openai, chat_completion_from_openai
from server.api.metering import chat_prompt_tokens, chat_worst_case, streamed_text_chars, usage_from_openai
from server.api.rest_print import json_text, to_json_bytes
from server.api.shutdown import OpenStreams
from server.api.validation import check_chat_request, check_request
from server.observability.logs import take_request_id
from server.providers.base import JSON, Capability, ChatCompletions
from server.routing.attempts import Routing
from server.routing.router import Plan, Route, Router

log = logging.getLogger(__name__)
T = TypeVar("T")
StreamContext: TypeAlias = grpc.aio.ServicerContext[
    chat_pb.CreateChatCompletionRequest, chat_pb.StreamChatCompletionResponse
]

# The sentinel that ends a stream for a gRPC caller with the bridge's marker (the
# internal REST binding of ChatService); BridgeService sends `data: [DONE]`.
DONE_SENTINEL_ID = "[DONE]"
DONE_EVENT = b"data: [DONE]\n\n"


class ChatServicer(MeteredServicer, chat_grpc.ChatServiceServicer):
    def __init__(
        self,
        router: Router,
        accounts: Accounts,
        streams: OpenStreams | None = None,
        routing: Routing | None = None,
    ) -> None:
        super().__init__(router, accounts, routing)
        self._streams = streams if streams is not None else OpenStreams()

    @unary
    async def CreateChatCompletion(
        self,
        request: chat_pb.CreateChatCompletionRequest,
        context: grpc.aio.ServicerContext[chat_pb.CreateChatCompletionRequest, chat_pb.CreateChatCompletionResponse],
    ) -> chat_pb.CreateChatCompletionResponse:
        answer, provider = await self._complete(request, context)
        return chat_completion_from_openai(answer, provider=provider, json_nulls=wants_json_nulls(context))

    @unary
    async def create_printed(
        self, request: chat_pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> bytes:
        """The completion as OpenAI's JSON text, for BridgeService: printed straight
        from the upstream's dict when that prints the same JSON (server.api.rest_direct)."""
        answer, provider = await self._complete(request, context)
        return _completion_json(answer, provider, wants_json_nulls(context))

    async def _complete(
        self, request: chat_pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[JSON, str]:
        """The upstream's answer as the client gets it (its public model), metered, and
        the provider that gave it."""
        if request.stream:
            raise errors.InvalidRequest(
                "stream is true: call StreamChatCompletion (REST: the bridge does this for you)", field="stream"
            )
        plan, options = self._plan_for(request, context)
        body = chat_body(request)
        async with self._routed(
            plan,
            options,
            context,
            "chat",
            functools.partial(chat_worst_case, request),  # worked out only if needed
            functools.partial(chat_prompt_tokens, request),
        ) as call:
            served = await call.unary(
                lambda adapter, model, attempt: adapter.create_chat_completion(dict(body), model, attempt)
            )
            answer = served.result
            call.meter.usage = usage_from_openai(answer.get("usage"))
        route = served.target.route
        return {**answer, "model": _public_model(route, answer), "object": "chat.completion"}, route.provider.name

    def StreamChatCompletion(
        self, request: chat_pb.CreateChatCompletionRequest, context: StreamContext
    ) -> AsyncGenerator[chat_pb.StreamChatCompletionResponse, None]:
        # (An async generator, returned rather than wrapped: one layer less per chunk.)
        return self._relay(request, context, _MESSAGES, bridge=from_bridge(context))

    def stream_events(
        self, request: chat_pb.CreateChatCompletionRequest, context: StreamContext
    ) -> AsyncGenerator[bytes, None]:
        """The stream as OpenAI's server-sent events, for BridgeService: each chunk
        printed straight from the upstream's dict when that prints the same JSON
        (server.api.rest_direct), `data: [DONE]` at the end."""
        return self._relay(request, context, _EVENTS, bridge=True)

    async def _relay(
        self,
        request: chat_pb.CreateChatCompletionRequest,
        context: StreamContext,
        encoding: _Encoding[T],
        *,
        bridge: bool,
    ) -> AsyncGenerator[T, None]:
        started = False
        take_request_id(call_metadata(context).marked)
        try:
            check_request(request)
            with self._streams.track():
                async with aclosing(self._stream(request, context, encoding.chunk)) as chunks:
                    async for chunk in chunks:
                        started = True
                        yield chunk
        except Exception as exc:  # noqa: BLE001 - every failure must reach the client
            await self.record_refusal("StreamChatCompletion", request, exc)
            if not (started and bridge):
                await abort_for(context, exc)
            # Headers and chunks are out: over REST the status would be lost, so the
            # error travels as a last event that OpenAI SDKs raise.
            yield encoding.error(exc)
            return
        if bridge:
            yield encoding.done

    async def _stream(
        self, request: chat_pb.CreateChatCompletionRequest, context: StreamContext, encode: _EncodeChunk[T]
    ) -> AsyncGenerator[T, None]:
        """The client's chunks, metered; raises what ends the stream early."""
        if request.HasField("stream") and not request.stream:
            raise errors.InvalidRequest("stream is false: call CreateChatCompletion", field="stream")
        plan, options = self._plan_for(request, context)
        body = chat_body(request)
        body["stream"] = True
        include_usage = request.stream_options.include_usage
        json_nulls = wants_json_nulls(context)  # once: it reads the call's metadata
        # Worked out only if needed (billing, a token limit, a cut call).
        worst = functools.partial(chat_worst_case, request)
        prompt = functools.partial(chat_prompt_tokens, request)
        async with self._routed(plan, options, context, "chat_stream", worst, prompt) as call:
            try:
                served, rest = await call.stream(
                    lambda adapter, model, attempt: adapter.stream_chat_completion(dict(body), model, attempt)
                )
                route, meter = served.target.route, call.meter
                async with aclosing(rest):
                    chunk = served.result
                    while chunk is not None:
                        if "usage" in chunk:
                            meter.usage = usage_from_openai(chunk["usage"])
                        meter.add_streamed_chars(streamed_text_chars(chunk))
                        client_chunk = _client_chunk(chunk, route, include_usage)
                        if client_chunk is not None:
                            yield encode(client_chunk, route.provider.name, json_nulls)
                        chunk = await anext(rest, None)
            except asyncio.CancelledError:
                self._streams.raise_if_interrupted()  # the meter then records "interrupted"
                raise

    def _plan_for(
        self, request: chat_pb.CreateChatCompletionRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Plan[ChatCompletions], CallOptions]:
        check_chat_request(request)
        features = (Capability.TOOLS,) if request.tools else ()
        return self._plan(request.model, Capability.CHAT, ChatCompletions, context, features)


def _public_model(route: Route, answer: JSON) -> str:
    upstream_model = answer.get("model")
    if isinstance(upstream_model, str) and upstream_model:
        return f"{route.provider.name}/{upstream_model}"
    return route.public_model


def _client_chunk(chunk: JSON, route: Route, include_usage: bool) -> JSON | None:
    """The chunk as the client gets it: its public model, usage only when asked for.

    The adapter always asks upstream for usage (billing needs it); a usage-only chunk
    is dropped, and usage on a content chunk removed, for a client that did not ask.
    """
    if not include_usage and "usage" in chunk:
        if not chunk.get("choices"):
            return None
        chunk = {key: value for key, value in chunk.items() if key != "usage"}
    return {**chunk, "model": _public_model(route, chunk), "object": "chat.completion.chunk"}


def _chunk_message(chunk: JSON, provider: str, json_nulls: bool) -> chat_pb.StreamChatCompletionResponse:
    return chat_chunk_from_openai(chunk, provider=provider, json_nulls=json_nulls)


# The nulls chat_chunk_from_openai adds, for rest_direct (by json_nulls).
_COMPLETION = chat_pb.CreateChatCompletionResponse.DESCRIPTOR
_CHOICE = chat_pb.ChatChoice.DESCRIPTOR.full_name
_MESSAGE = chat_pb.AssistantMessage.DESCRIPTOR.full_name
# What chat_completion_from_openai fills in (by json_nulls), for rest_direct. A choice
# without a message gets one there: rare enough to leave to the round trip.
_COMPLETION_FILLS = {
    False: frozenset(
        {(_CHOICE, "logprobs", None), (_CHOICE, "message", rest_direct.UNSURE), (_MESSAGE, "role", "assistant")}
    ),
    True: frozenset(
        {
            (_CHOICE, "logprobs", None),
            (_CHOICE, "message", rest_direct.UNSURE),
            (_MESSAGE, "role", "assistant"),
            (_MESSAGE, "content", None),
            (_MESSAGE, "refusal", None),
        }
    ),
}
_CHUNK = chat_pb.StreamChatCompletionResponse.DESCRIPTOR
_CHUNK_CHOICE = chat_pb.ChunkChoice.DESCRIPTOR.full_name
_CHUNK_NULLS = {
    False: frozenset({(_CHUNK_CHOICE, "logprobs", None)}),
    True: frozenset({(_CHUNK_CHOICE, "logprobs", None), (_CHUNK_CHOICE, "finish_reason", None)}),
}


def _chunk_event(chunk: JSON, provider: str, json_nulls: bool) -> bytes:
    printed = rest_direct.openai_dict(chunk, _CHUNK, _CHUNK_NULLS[json_nulls])
    if printed is None:  # only the proto can tell (or word the error)
        return sse_event(_chunk_message(chunk, provider, json_nulls))
    return b"data: " + json_text(printed) + b"\n\n"


def _completion_json(answer: JSON, provider: str, json_nulls: bool) -> bytes:
    printed = rest_direct.openai_dict(answer, _COMPLETION, _COMPLETION_FILLS[json_nulls])
    if printed is None:  # only the proto can tell (or word the error)
        return to_json_bytes(chat_completion_from_openai(answer, provider=provider, json_nulls=json_nulls))
    return json_text(printed)


def _error_event(exc: Exception) -> bytes:
    return sse_event(_error_chunk(exc))


def sse_event(chunk: chat_pb.StreamChatCompletionResponse) -> bytes:
    """One server-sent event: the chunk as OpenAI prints it."""
    return b"data: " + to_json_bytes(chunk) + b"\n\n"


def _error_chunk(exc: Exception) -> chat_pb.StreamChatCompletionResponse:
    if not isinstance(exc, errors.GatewayError):
        log.exception("unexpected error in a stream", exc_info=exc)
        exc = errors.InternalError("internal error; the gateway's log has the details")
    error = common_pb2.ErrorObject(message=exc.message, type=exc.openai_type, code=exc.reason, param=exc.field or "")
    return chat_pb.StreamChatCompletionResponse(object="chat.completion.chunk", error=error)


_EncodeChunk: TypeAlias = Callable[[JSON, str, bool], T]  # (chunk, provider, json_nulls)


@dataclass(frozen=True, slots=True)
class _Encoding(Generic[T]):
    """What a stream sends its client: messages (gRPC) or printed events (REST)."""

    chunk: _EncodeChunk[T]
    error: Callable[[Exception], T]
    done: T  # sent at the end of a bridge's stream


_MESSAGES = _Encoding(_chunk_message, _error_chunk, chat_pb.StreamChatCompletionResponse(id=DONE_SENTINEL_ID))
_EVENTS = _Encoding(_chunk_event, _error_event, DONE_EVENT)
