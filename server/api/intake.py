"""How every call's request is taken in, as a gRPC server interceptor: decoding, a
missing or truncated message, and a default deadline. It applies to every service,
health checking and reflection included.

Decoding. grpc.aio decodes the request before the handler runs and answers a failure
with UNKNOWN and the Python exception's text. Here each handler is rebuilt with raw
bytes in, and the method's own deserializer runs inside the handler, so a request
that is not a valid message (corrupt wire format, a string field that is not UTF-8,
messages nested deeper than the decoder's 100 levels) is INVALID_ARGUMENT with the
gateway's ErrorInfo (reason INVALID_REQUEST) naming the top-level field whose bytes
do not decode (server.api.wire_fields; e.g. a map value the REST bridge could not
encode), or else the message type.

Parameters. A REST call's top-level JSON members without a field in the request
message (which the transcoder drops) are refused here with INVALID_ARGUMENT naming
them; the decision per parameter is in server.api.convert (`check_given_fields`).

A call that ends without a complete message. An HTTP/2 stream whose END_STREAM
arrives with no message, or before the bytes its gRPC length prefix announced, reaches
the server as "no message": grpc-core drops the partial bytes. For a unary request
grpc.aio takes that for a client cancellation and returns without any status, so the
call stayed open until the client gave up (forever without a client deadline).
Every handler with a unary request is therefore served as a streaming-request one
(the wire format is the same) that reads the one message itself and answers
INVALID_ARGUMENT when there is none.

Default deadline. A call that sends no deadline gets `default_deadline_s`
(AIGNE_HUB_DEFAULT_CALL_DEADLINE_S, default 600 s: the length of a long LLM stream):
waiting for the request message and running the method are bounded by it, and the
call then ends with DEADLINE_EXCEEDED (reason CALL_TIMEOUT). A streamed answer's
waits for its messages are bounded by one timer for the stream (server.watchdog).
Calls with a client deadline are left to grpc-core.
REST calls arrive from Envoy without a deadline, so the default bounds them too; a
health `Watch` without a deadline ends with it (health-checking clients re-open it).

Cost: about 20 us per call (a streaming-request handler and two async iterator steps),
measured against a bare health Check at ~5,000 calls/s on the shared test machine.

Registered after `AuthInterceptor`, so an unauthenticated call is refused as such
whatever its body holds.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from typing import Any, TypeAlias

import grpc
from google.protobuf.message import Message

from server.api.call_metadata import FIELDS_HEADER, call_metadata
from server.api.convert import check_given_fields
from server.api.errors import to_grpc_status
from server.api.wire_fields import undecodable_field
from server.errors import CallTimeout, GatewayError, InvalidRequest
from server.watchdog import Watchdog

Context: TypeAlias = grpc.aio.ServicerContext[Any, Any]
Deserializer: TypeAlias = Callable[[bytes], Any]


class IntakeInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, default_deadline_s: float) -> None:
        self._default_deadline_s = default_deadline_s
        # The rebuilt handler of each method served so far: the same for every call
        # (grpc looks the method up and this rebuilds it once, not per call).
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        rebuilt = self._handlers.get(method)
        if rebuilt is not None:
            return rebuilt
        handler = await continuation(details)
        if handler is None:
            return None  # an unknown method: not remembered (a client chooses the names)
        rebuilt = self._handlers[method] = _Intake(handler, self._default_deadline_s).handler()
        return rebuilt


class _Intake:
    """One method's handler, rebuilt to read and decode its own requests."""

    def __init__(self, handler: grpc.RpcMethodHandler, default_deadline_s: float) -> None:
        self._handler = handler
        self._default_deadline_s = default_deadline_s
        decode = handler.request_deserializer
        message_type = getattr(decode, "__self__", None)
        descriptor = getattr(message_type, "DESCRIPTOR", None)
        self._type_name = getattr(descriptor, "full_name", "the method's request message")
        self._message_type: type[Message] | None = message_type if isinstance(message_type, type) else None
        self._decode: Deserializer = decode or (lambda raw: raw)

    def handler(self) -> grpc.RpcMethodHandler:
        codec = {"request_deserializer": None, "response_serializer": self._handler.response_serializer}
        if self._handler.unary_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._unary_unary, **codec)
        if self._handler.unary_stream is not None:
            return grpc.stream_stream_rpc_method_handler(self._unary_stream, **codec)
        if self._handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(self._stream_unary, **codec)
        return grpc.stream_stream_rpc_method_handler(self._stream_stream, **codec)

    async def _unary_unary(self, requests: AsyncIterator[bytes], context: Context) -> Any:
        async with self._bounded(context):
            request = await self._one_request(requests)
            self._check_given_fields(context)
            return await self._handler.unary_unary(request, context)

    async def _stream_unary(self, requests: AsyncIterator[bytes], context: Context) -> Any:
        async with self._bounded(context):
            return await self._handler.stream_unary(self._decoded(requests), context)

    async def _unary_stream(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        deadline = self._deadline(context)
        async with self._bounded(context, deadline):
            request = await self._one_request(requests)
            self._check_given_fields(context)
        async for response in self._responses(self._handler.unary_stream(request, context), deadline, context):
            yield response

    async def _stream_stream(self, requests: AsyncIterator[bytes], context: Context) -> AsyncIterator[Any]:
        deadline = self._deadline(context)
        answers = self._handler.stream_stream(self._decoded(requests), context)
        async for response in self._responses(answers, deadline, context):
            yield response

    def _check_given_fields(self, context: Context) -> None:
        """REST: refuses a JSON member the transcoder would have dropped (see convert)."""
        given = call_metadata(context).first(FIELDS_HEADER)
        if given is None or self._message_type is None:
            return
        try:
            check_given_fields(str(given).split(","), self._message_type)
        except InvalidRequest as exc:
            raise _Refusal(exc) from None

    async def _one_request(self, requests: AsyncIterator[bytes]) -> Any:
        raw = await anext(requests, None)
        if raw is None:
            raise _Refusal(
                InvalidRequest(
                    f"the call ended without a complete {self._type_name} message: none was sent, "
                    "or the stream ended before the bytes its length prefix announced"
                )
            )
        return self._decoded_one(raw)

    async def _decoded(self, requests: AsyncIterator[bytes]) -> AsyncIterator[Any]:
        async for raw in requests:
            yield self._decoded_one(raw)

    def _decoded_one(self, raw: bytes) -> Any:
        try:
            return self._decode(raw)
        except Exception:  # noqa: BLE001 - whatever the decoder raises, the bytes are bad
            raise _Refusal(self._undecodable(raw)) from None

    def _undecodable(self, raw: bytes) -> InvalidRequest:
        found = undecodable_field(raw, self._message_type) if self._message_type else None
        if found is not None:
            field, problem = found
            return InvalidRequest(problem, field=field)
        return InvalidRequest(
            f"the request could not be decoded as {self._type_name}: its bytes are not a valid "
            "protobuf message of that type (corrupt wire format, a string field that is not "
            "UTF-8, or messages nested more than 100 levels deep)"
        )

    async def _responses(
        self, answers: AsyncIterator[Any] | Awaitable[Any], deadline: float | None, context: Context
    ) -> AsyncIterator[Any]:
        """The method's answers, each awaited within the deadline. A method that
        writes with `context.write` (health's Watch) is a coroutine instead."""
        if not isinstance(answers, AsyncIterator):
            async with self._bounded(context, deadline):
                await answers
            return
        # One timer for the whole stream (server.watchdog), not one per message; none
        # with a client deadline (grpc-core enforces it).
        watchdog = Watchdog(deadline=deadline) if deadline is not None else None
        try:
            while True:
                async with _Bounded(None, context, self._default_deadline_s):
                    response = await self._next(answers, watchdog, context)
                if response is _END:
                    return
                yield response
        finally:
            if watchdog is not None:
                watchdog.close()
            # The client left while its last message was being sent: close the method's
            # stream now (it records the call), not whenever it is garbage-collected.
            if isinstance(answers, AsyncGenerator):
                await answers.aclose()

    async def _next(self, answers: AsyncIterator[Any], watchdog: Watchdog | None, context: Context) -> Any:
        """The method's next answer (or _END); CALL_TIMEOUT once the deadline passes."""
        if watchdog is None:
            return await anext(answers, _END)
        try:
            return await watchdog.wait(anext(answers, _END))
        except TimeoutError:
            if not watchdog.fired:
                raise
            await context.abort_with_status(to_grpc_status(_timed_out(self._default_deadline_s)))
            raise  # unreachable: abort_with_status raises

    def _bounded(self, context: Context, deadline: float | None = None) -> _Bounded:
        """Bounds a step by `deadline` (default: the call's, from now) and answers a
        refused request."""
        if deadline is None:
            deadline = self._deadline(context)
        return _Bounded(deadline, context, self._default_deadline_s)

    def _deadline(self, context: Context) -> float | None:
        """The loop time at which a call without a client deadline ends; None when the
        client set one (grpc-core enforces it)."""
        if context.time_remaining() is not None:
            return None
        return asyncio.get_running_loop().time() + self._default_deadline_s


_END = object()


class _Refusal(Exception):
    """A request the intake refuses; becomes the call's status."""

    def __init__(self, error: GatewayError) -> None:
        super().__init__(error.message)
        self.error = error


class _Bounded:
    """Ends the call with CALL_TIMEOUT past `deadline`, and turns a `_Refusal` raised
    inside into the call's status."""

    def __init__(self, deadline: float | None, context: Context, limit_s: float) -> None:
        # No timer without a deadline (a client deadline, or a stream's watchdog).
        self._timeout = asyncio.timeout_at(deadline) if deadline is not None else None
        self._context = context
        self._limit_s = limit_s

    async def __aenter__(self) -> None:
        if self._timeout is not None:
            await self._timeout.__aenter__()

    async def __aexit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if self._timeout is not None:
                await self._timeout.__aexit__(kind, exc, tb)
        except TimeoutError:
            await self._context.abort_with_status(to_grpc_status(_timed_out(self._limit_s)))
        if isinstance(exc, _Refusal):
            await self._context.abort_with_status(to_grpc_status(exc.error))


def _timed_out(limit_s: float) -> CallTimeout:
    return CallTimeout(
        f"the call set no deadline and ran longer than the gateway's default of {limit_s:g} s "
        "(AIGNE_HUB_DEFAULT_CALL_DEADLINE_S); send a deadline to allow longer",
        metadata={"default_deadline_seconds": f"{limit_s:g}"},
    )
