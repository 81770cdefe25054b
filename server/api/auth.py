"""Authentication of every call, as a gRPC server interceptor.

The key travels as `authorization: Bearer <key>` metadata (Envoy forwards the REST
header as is, so REST and gRPC callers are held to the same rule). Exactly one such
entry with the `Bearer` scheme (any case) is accepted: a raw key without the scheme,
another scheme, or two `authorization` entries are UNAUTHENTICATED, since guessing
which of two credentials was meant, or what an unknown scheme carries, would let a
proxy's header and the client's disagree about who is calling. Health checks,
reflection, an anonymous `GetStatus` and AIGNE's discovery and model list
(`AgentService.GetBlockletInfo`, `ListAgentModels`) need none. The
authenticated key is put in `CURRENT_KEY` for the servicers (allow-list, billing,
ledger): the interceptor runs in the same task as the handler.

A failure here is answered like one in a servicer: a gateway error with its status
(a database outage is 503 STORAGE_UNAVAILABLE with a retry hint), anything else as
INTERNAL with the detail in the log only; an exception escaping an interceptor
would reach the client as UNKNOWN with its text.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

import grpc

from server.accounts.errors import KeyInvalid, PermissionDenied, Unauthenticated
from server.accounts.keys import KeyRecord
from server.accounts.service import Accounts
from server.api.errors import to_grpc_status, unexpected_error_status
from server.errors import GatewayError

CURRENT_KEY: ContextVar[KeyRecord | None] = ContextVar("aigne_hub_key", default=None)
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# Answers anonymously when no key is sent (the seed's availability check).
# Authorised by the admin credential instead of an API key.
ADMIN_PREFIX = "/aigne.hub.v1.AdminService/"
# AIGNE clients discover the hub and list its models without a key.
ANONYMOUS_METHODS = frozenset(
    {
        "/aigne.hub.v1.StatusService/GetStatus",
        "/aigne.hub.v1.AgentService/GetBlockletInfo",
        "/aigne.hub.v1.AgentService/ListAgentModels",
    }
)


def bearer_secret(metadata: Any) -> str | None:
    """The token of the one `authorization: Bearer ...` entry, or None when there is
    none; UNAUTHENTICATED for two entries or another form."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if not values:
        return None
    if len(values) > 1:
        raise Unauthenticated(f"send one authorization header, not {len(values)}")
    value = values[0] if isinstance(values[0], str) else ""
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("the authorization header must be 'Bearer <key>'")
    return token.strip()


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    def __init__(self, accounts: Accounts, admin_token: str | None = None) -> None:
        self._accounts = accounts
        self._admin_token = admin_token.encode() if admin_token else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(details)
        try:
            secret = bearer_secret(details.invocation_metadata)
            if method.startswith(ADMIN_PREFIX):
                self._check_admin(secret)
                return await continuation(details)
            if secret is None and method in ANONYMOUS_METHODS:
                key = None
            else:
                key = await self._accounts.authenticate(secret)
        except GatewayError as exc:
            return await _refused(continuation, details, to_grpc_status(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must not reach the client as text
            return await _refused(continuation, details, unexpected_error_status(exc))
        CURRENT_KEY.set(key)
        return await continuation(details)

    def _check_admin(self, secret: str | None) -> None:
        if self._admin_token is None:
            raise PermissionDenied("the admin API is closed: set AIGNE_HUB_ADMIN_TOKEN to open it")
        if secret is None:
            raise Unauthenticated("the admin API needs 'Authorization: Bearer <AIGNE_HUB_ADMIN_TOKEN>'")
        if not hmac.compare_digest(secret.encode(), self._admin_token):
            raise KeyInvalid("wrong admin token")


async def _refused(
    continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
    details: grpc.HandlerCallDetails,
    status: grpc.Status,
) -> grpc.RpcMethodHandler | None:
    handler = await continuation(details)
    return _refusing(handler, status) if handler is not None else None


def _refusing(handler: grpc.RpcMethodHandler, status: grpc.Status) -> grpc.RpcMethodHandler:
    """A handler of the same shape that answers with `status`."""

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
