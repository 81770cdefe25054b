"""The one place where `server.errors` exceptions become gRPC statuses.

Each status carries a `google.rpc.ErrorInfo` (reason from `aigne.hub.v1.ErrorReason`,
domain `hub.aigne.io`, metadata) and, for rate limits, a `google.rpc.RetryInfo` plus a
`retry-after` trailer that the REST bridge turns into the HTTP header OpenAI SDKs obey.
"""

from __future__ import annotations

import logging
import math

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from server import errors
from server.accounts import errors as accounts_errors

DOMAIN = "hub.aigne.io"
log = logging.getLogger(__name__)

GRPC_CODES: dict[type[errors.GatewayError], grpc.StatusCode] = {
    errors.InvalidRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ModelNotFound: grpc.StatusCode.NOT_FOUND,
    errors.ResourceNotFound: grpc.StatusCode.NOT_FOUND,
    errors.CallTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.ProviderNotConfigured: grpc.StatusCode.FAILED_PRECONDITION,
    errors.UnsupportedFeature: grpc.StatusCode.INVALID_ARGUMENT,
    errors.ShuttingDown: grpc.StatusCode.UNAVAILABLE,
    errors.StorageUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.RateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.RateLimitsUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.InternalError: grpc.StatusCode.INTERNAL,
    errors.UpstreamBadRequest: grpc.StatusCode.INVALID_ARGUMENT,
    errors.UpstreamAuthFailed: grpc.StatusCode.PERMISSION_DENIED,
    errors.UpstreamNotFound: grpc.StatusCode.NOT_FOUND,
    errors.UpstreamRateLimited: grpc.StatusCode.RESOURCE_EXHAUSTED,
    errors.UpstreamUnavailable: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamTimeout: grpc.StatusCode.DEADLINE_EXCEEDED,
    errors.UpstreamMalformedResponse: grpc.StatusCode.UNAVAILABLE,
    errors.UpstreamError: grpc.StatusCode.UNAVAILABLE,
    accounts_errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    accounts_errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    accounts_errors.QuotaExceeded: grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def grpc_code(exc: errors.GatewayError) -> grpc.StatusCode:
    """The status code of `exc`: that of its nearest class in `GRPC_CODES`."""
    for cls in type(exc).__mro__:
        code = GRPC_CODES.get(cls)
        if code is not None:
            return code
    return grpc.StatusCode.INTERNAL


def to_grpc_status(exc: errors.GatewayError) -> grpc.Status:
    """The rich status for `exc`, ready for `context.abort_with_status`."""
    code = grpc_code(exc)
    details = [_pack(error_details_pb2.ErrorInfo(reason=exc.reason, domain=DOMAIN, metadata=exc.metadata))]
    retry_after = getattr(exc, "retry_after_seconds", None)
    if retry_after is not None:
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(retry_after * 1e9))
        details.append(_pack(error_details_pb2.RetryInfo(retry_delay=delay)))
    status = status_pb2.Status(code=_code_number(code), message=exc.message, details=details)
    grpc_status = rpc_status.to_status(status)
    # The OpenAI rate-limit headers of a refused call (RateLimited), beside retry-after.
    headers: tuple[tuple[str, str], ...] = getattr(exc, "headers", ())
    if retry_after is not None:
        extra = (("retry-after", str(math.ceil(retry_after))), *headers)
        return _WithMetadata(grpc_status, extra)
    return grpc_status


def unexpected_error_status(exc: BaseException) -> grpc.Status:
    """An INTERNAL status for a bug; the details go to the log, not to the client."""
    log.exception("unexpected error while serving a call", exc_info=exc)
    return to_grpc_status(errors.InternalError("internal error; the gateway's log has the details"))


def _pack(message: error_details_pb2.ErrorInfo | error_details_pb2.RetryInfo) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _code_number(code: grpc.StatusCode) -> int:
    value = code.value[0]
    assert isinstance(value, int)
    return value if value in code_pb2.Code.values() else code_pb2.INTERNAL


class _WithMetadata(grpc.Status):  # type: ignore[misc]
    """A status whose trailing metadata has extra entries (grpc.Status is a plain ABC)."""

    def __init__(self, status: grpc.Status, extra: tuple[tuple[str, str], ...]) -> None:
        self.code = status.code
        self.details = status.details
        self.trailing_metadata = tuple(status.trailing_metadata) + extra
