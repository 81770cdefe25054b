"""What every servicer method shares: turning exceptions into statuses, reading
call metadata, and the server's own limit on each upstream call.

The limit (`Route.timeout_s`, from the `upstream_read_timeout_s` setting) is enforced
here, not only by httpx: httpx's read timeout applies to each socket read, so an
upstream that trickles bytes (SSE comments, a slow body) would never hit it. A unary
call gets the limit for its whole answer; a stream for its first chunk and for each gap
between chunks. Either way the server fails the call with UPSTREAM_TIMEOUT before the
REST bridge's longer limits (derived from the same setting) cut it.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from google.protobuf.message import Message

from server import errors
from server.accounts.credits import Usage
from server.accounts.service import METERED, Accounts, Meter
from server.api.auth import CURRENT_KEY
from server.api.errors import to_grpc_status, unexpected_error_status
from server.api.validation import check_request
from server.router import Route, Router

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")
T = TypeVar("T")

# The ledger's operation names of the RPCs that call providers.
OPERATIONS = {
    "CreateChatCompletion": "chat",
    "StreamChatCompletion": "chat_stream",
    "CreateEmbedding": "embedding",
    "CreateImage": "image",
    "CreateSpeech": "speech",
    "CreateTranscription": "transcription",
    "UploadTranscription": "transcription",
}

# Set by the REST bridge (Envoy's Lua filter) on streams it turns into SSE.
BRIDGE_HEADER = "x-aigne-bridge"
# Set by the REST bridge on every REST call: its Lua filter prints convert.JSON_NULL
# as JSON null.
REST_HEADER = "x-aigne-rest"


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Ends the call with the status for `exc` (never returns)."""
    if isinstance(exc, errors.GatewayError):
        await context.abort_with_status(to_grpc_status(exc))
    await context.abort_with_status(unexpected_error_status(exc))


def unary(
    method: Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wraps a unary method so that the request is checked against the contract
    (REQUIRED fields, documented limits) first, and every exception becomes a proper
    status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            if isinstance(request, Message):
                check_request(request)
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            if isinstance(self, MeteredServicer):
                await self.record_refusal(method.__name__, request, exc)
            await abort_for(context, exc)
            raise  # unreachable: abort_for raises

    return wrapper


def from_bridge(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came through the REST bridge as an SSE stream."""
    return any(key == BRIDGE_HEADER and value == "sse" for key, value in context.invocation_metadata() or ())


def from_rest(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came through the REST bridge (which prints JSON nulls)."""
    return any(key == REST_HEADER for key, _ in context.invocation_metadata() or ())


class MeteredServicer:
    """Base of the servicers that call providers: routing plus the per-call meter."""

    def __init__(self, router: Router, accounts: Accounts) -> None:
        self._router = router
        self._accounts = accounts

    async def _upstream(self, route: Route, call: Awaitable[T]) -> T:
        """`call`'s result, or UpstreamTimeout once it took longer than the limit."""
        try:
            async with asyncio.timeout(route.timeout_s) as limit:
                return await call
        except TimeoutError:
            if not limit.expired():
                raise
            raise self._timeout(route, "no answer within") from None

    async def _upstream_stream(self, route: Route, chunks: AsyncGenerator[T, None]) -> AsyncGenerator[T, None]:
        """`chunks`, failing with UpstreamTimeout when the first one or the next one
        takes longer than the limit; closes `chunks` whatever happens."""
        async with aclosing(chunks):
            first = True
            while True:
                try:
                    async with asyncio.timeout(route.timeout_s) as limit:
                        chunk = await anext(chunks)
                except StopAsyncIteration:
                    return
                except TimeoutError:
                    if not limit.expired():
                        raise
                    raise self._timeout(route, "no first chunk within" if first else "no next chunk within") from None
                first = False
                yield chunk

    def _timeout(self, route: Route, what: str) -> errors.UpstreamTimeout:
        provider = route.provider.name
        return errors.UpstreamTimeout(
            f"{provider} did not answer in time ({what} {route.timeout_s:g} s)", provider=provider
        )

    def _meter(self, route: Route, operation: str, worst_case: Usage, prompt_tokens: int = 0) -> Meter:
        """Checks the caller's allow-list for the route, and measures the call."""
        header = getattr(route.provider, "credential_header", None)
        return self._accounts.meter(
            CURRENT_KEY.get(), route.provider.name, route.upstream_model, operation, worst_case, header, prompt_tokens
        )

    async def record_refusal(self, method: str, request: Any, exc: Exception) -> None:
        """A call that failed before its meter started still leaves a ledger record."""
        if METERED.get() or not isinstance(exc, errors.GatewayError):
            return
        if isinstance(exc, errors.StorageUnavailable):
            return  # the ledger is in that database: trying would only wait again
        model = getattr(request, "model", "") or ""
        await self._accounts.record_refusal(CURRENT_KEY.get(), OPERATIONS.get(method, method), model, exc)
