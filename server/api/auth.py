"""Authentication of every call, as a gRPC server interceptor.

The key travels as `authorization: Bearer <key>` metadata (Envoy forwards the REST
header as is). Health checks, reflection and an anonymous `GetStatus` need none. The
authenticated key is put in `CURRENT_KEY` for the servicers (allow-list, billing,
ledger): the interceptor runs in the same task as the handler.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from server.accounts.keys import KeyRecord
from server.accounts.service import Accounts
from server.api.errors import to_grpc_status
from server.errors import GatewayError

CURRENT_KEY: ContextVar[KeyRecord | None] = ContextVar("aigne_hub_key", default=None)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Answers anonymously when no key is sent (the seed's availability check).
ANONYMOUS_METHODS = frozenset({"/aigne.hub.v1.StatusService/GetStatus"})


def bearer_secret(metadata: Any) -> str | None:
    """The token of an `authorization: Bearer ...` entry, or None."""
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                return token.strip()
            return value.strip() or None
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        secret = bearer_secret(details.invocation_metadata)
        try:
            if secret is None and method in ANONYMOUS_METHODS:
                key = None
            else:
                key = await self._accounts.authenticate(secret)
        except GatewayError as exc:
            handler = await continuation(details)
            return _refusing(handler, exc) if handler is not None else None
        CURRENT_KEY.set(key)
        return await continuation(details)


def _refusing(handler: grpc.RpcMethodHandler, exc: GatewayError) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers with the authentication error."""
    status = to_grpc_status(exc)

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort_with_status(status)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[Any]:
        await context.abort_with_status(status)
        yield  # pragma: no cover - makes this an async generator

    codec = {
        "request_deserializer": handler.request_deserializer,
        "response_serializer": handler.response_serializer,
    }
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse, **codec)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream, **codec)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse, **codec)
    return grpc.stream_stream_rpc_method_handler(refuse_stream, **codec)
