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

A stream's events that are ready together go out together: ChatServicer's stream runs
in a task of its own, ahead of the client by at most `AHEAD_EVENTS` events, and each
HttpBody carries every event printed since the last one was sent. One upstream read
often holds several SSE events (a fast model, a burst after a pause, a cached answer);
relayed one gRPC message each, they cost the server and Envoy a message apiece, which
was most of a stream's CPU. Nothing waits to fill a batch: an event that is alone goes
out alone, as soon as it is printed; SSE clients read events from the bytes, however
they are cut.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from typing import Any, TypeAlias

import grpc
from google.api import httpbody_pb2

from aigne.hub.v1 import bridge_service_pb2_grpc as bridge_grpc
from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.api.chat import ChatServicer

JSON_TYPE = "application/json"
EVENTS_TYPE = "text/event-stream"
# How many printed events a stream may hold for a client that reads slowly; then the
# upstream is read no further until the client takes some (its backpressure).
AHEAD_EVENTS = 64

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]


class BridgeServicer(bridge_grpc.BridgeServiceServicer):
    def __init__(self, chat: ChatServicer) -> None:
        self._chat = chat

    async def CreateChatCompletion(
        self, request: chat_pb.CreateChatCompletionRequest, context: Context
    ) -> httpbody_pb2.HttpBody:
        printed = await self._chat.create_printed(request, context)
        return httpbody_pb2.HttpBody(content_type=JSON_TYPE, data=printed)

    async def StreamChatCompletion(
        self, request: chat_pb.CreateChatCompletionRequest, context: Context
    ) -> AsyncIterator[httpbody_pb2.HttpBody]:
        events = _Events()
        producer = asyncio.create_task(events.print_all(self._chat.stream_events(request, context)))
        try:
            while batch := await events.take():
                yield httpbody_pb2.HttpBody(content_type=EVENTS_TYPE, data=batch)
            events.raise_failure()
        finally:
            # The client left or the call was cut: the stream ends as it would have
            # in this task (its meter sees the cancellation).
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer


@dataclass
class _Ended:
    """What ended the printing: nothing (the stream's end), or its exception."""

    error: BaseException | None


class _Events:
    """The printed events between the task that prints them and the one that sends."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[bytes | _Ended] = asyncio.Queue()
        self._room = asyncio.Semaphore(AHEAD_EVENTS)
        self._ended: _Ended | None = None

    async def print_all(self, stream: AsyncGenerator[bytes, None]) -> None:
        try:
            async with aclosing(stream) as printed:
                async for event in printed:
                    await self._room.acquire()
                    self._queue.put_nowait(event)
        except BaseException as exc:  # CancelledError included: the sender re-raises it
            self._queue.put_nowait(_Ended(exc))
            raise
        self._queue.put_nowait(_Ended(None))

    async def take(self) -> bytes:
        """Every event printed and not yet taken, at least one (waits for it); b""
        once the stream has ended."""
        if self._ended is not None:
            return b""
        parts: list[bytes] = []
        item = await self._queue.get()
        while True:
            if isinstance(item, _Ended):
                self._ended = item
                break
            parts.append(item)
            self._room.release()
            if self._queue.empty():
                break
            item = self._queue.get_nowait()
        return b"".join(parts)

    def raise_failure(self) -> None:
        """Raises what ended the stream early, as the stream would have raised it."""
        if self._ended is not None and self._ended.error is not None:
            raise self._ended.error
