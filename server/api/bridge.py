"""BridgeService: OpenAI's REST chat answers, printed by the server.

Internal to the REST bridge (gRPC clients use ChatService). The bridge's Lua filter
routes `POST /chat/completions` (and `/v1/...`) here; the transcoder still parses and
checks the request JSON, but relays the answer's bytes as they are
(`google.api.HttpBody`): the server prints them (server.api.rest_print), so Envoy
neither prints each chunk nor rewrites it in Lua, which cost it more CPU per stream
than all the rest of its work.

The calls themselves are ChatServicer's, unchanged (routing, metering, limits,
errors, the ledger, shutdown): this servicer only encodes what they yield. The
bridge's request markers (`x-aigne-bridge: sse`, `x-aigne-rest`) make ChatServicer
end a stream with its `[DONE]` sentinel, report a failure after the first chunk as an
error chunk, and write the nulls OpenAI requires as `convert.JSON_NULL`, all of which
become OpenAI's text here. A failure before the first byte is the call's status,
which the bridge turns into OpenAI's error object as for any other call.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeAlias, cast

import grpc
from google.api import httpbody_pb2

from aigne.hub.v1 import bridge_service_pb2_grpc as bridge_grpc
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.api.chat import DONE_SENTINEL_ID
from server.api.rest_print import to_json_bytes

JSON_TYPE = "application/json"
EVENTS_TYPE = "text/event-stream"
DONE_EVENT = b"data: [DONE]\n\n"

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class BridgeServicer(bridge_grpc.BridgeServiceServicer):
    def __init__(self, chat: chat_grpc.ChatServiceServicer) -> None:
        self._chat = chat  # server.api.chat.ChatServicer

    async def CreateChatCompletion(
        self, request: chat_pb.CreateChatCompletionRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        # (Typed "a response or an awaitable" by its stub; it is a coroutine.)
        answer = await cast(
            Awaitable[chat_pb.CreateChatCompletionResponse], self._chat.CreateChatCompletion(request, context)
        )
        return httpbody_pb2.HttpBody(content_type=JSON_TYPE, data=to_json_bytes(answer))

    async def StreamChatCompletion(
        self, request: chat_pb.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        # (Typed AsyncIterator by its stub; it is an async generator.)
        stream = cast(
            AsyncGenerator[chat_pb.StreamChatCompletionResponse, None],
            self._chat.StreamChatCompletion(request, context),
        )
        async with aclosing(stream) as chunks:
            async for chunk in chunks:
                yield httpbody_pb2.HttpBody(content_type=EVENTS_TYPE, data=event(chunk))


def event(chunk: chat_pb.StreamChatCompletionResponse) -> bytes:
    """One server-sent event: the chunk as OpenAI prints it, or `data: [DONE]`."""
    if chunk.id == DONE_SENTINEL_ID and not chunk.choices:
        return DONE_EVENT
    return b"data: " + to_json_bytes(chunk) + b"\n\n"
