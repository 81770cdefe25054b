"""What every servicer method shares: turning exceptions into statuses, and reading
call metadata."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server import errors
from server.api.errors import to_grpc_status, unexpected_error_status

S = TypeVar("S")
Req = TypeVar("Req")
Resp = TypeVar("Resp")

# Set by the REST bridge (Envoy's Lua filter) on streams it turns into SSE.
BRIDGE_HEADER = "x-aigne-bridge"


async def abort_for(context: grpc.aio.ServicerContext[Any, Any], exc: Exception) -> None:
    """Ends the call with the status for `exc` (never returns)."""
    if isinstance(exc, errors.GatewayError):
        await context.abort_with_status(to_grpc_status(exc))
    await context.abort_with_status(unexpected_error_status(exc))


def unary(
    method: Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]],
) -> Callable[[S, Req, grpc.aio.ServicerContext[Req, Resp]], Awaitable[Resp]]:
    """Wraps a unary method so that every exception becomes a proper status."""

    @functools.wraps(method)
    async def wrapper(self: S, request: Req, context: grpc.aio.ServicerContext[Req, Resp]) -> Resp:
        try:
            return await method(self, request, context)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as exc:
            await abort_for(context, exc)
            raise  # unreachable: abort_for raises

    return wrapper


def from_bridge(context: grpc.aio.ServicerContext[Any, Any]) -> bool:
    """Whether the call came through the REST bridge as an SSE stream."""
    return any(key == BRIDGE_HEADER and value == "sse" for key, value in context.invocation_metadata() or ())
