"""The gateway's one error tree.

Every failure the gateway reports is one of these exceptions. The tree below states each
class's HTTP status over REST; tests/test_error_shapes.py checks it against the bridge. They carry what a client
needs (a message, a stable `reason` from `aigne.hub.v1.ErrorReason`, optional metadata
and retry hint) and nothing about transport: adapters raise them without knowing about
gRPC, and `server.api.errors` maps each class to a gRPC status code in one place.

    GatewayError
    ├── InvalidRequest            the caller's request is wrong (400)
    │   └── RequestTooLarge       a field or body is over a documented limit (400)
    ├── ModelNotFound             no such provider/model (404)
    ├── ResourceNotFound          no such API key or provider credential (404)
    ├── ProviderNotConfigured     the provider exists but has no credential (400)
    ├── UnsupportedFeature        the provider cannot do what was asked (400, as OpenAI's
    │                             answer to a parameter a model does not take)
    ├── ShuttingDown              the server is draining (503)
    ├── StorageUnavailable        the gateway's database cannot be used now (503)
    ├── RateLimited               a gateway rate limit of the key or owner is reached (429)
    ├── RateLimitsUnavailable     the shared limit counters cannot be reached, fail-closed (503)
    ├── CallTimeout               a call without a deadline outlived the default one (504)
    ├── InternalError             a bug in the gateway (500)
    └── UpstreamError             the upstream provider failed
        ├── UpstreamBadRequest        it rejected the request (400)
        ├── UpstreamAuthFailed        it refused the call: no permission (403)
        │   └── UpstreamCredentialRejected  the credential itself is not valid (403 to the client)
        ├── UpstreamNotFound          it does not know the model (404)
        ├── UpstreamRateLimited       it rate-limited us (429, with retry hint)
        ├── UpstreamUnavailable       5xx, overloaded or unreachable (503)
        ├── UpstreamTimeout           it did not answer in time (504)
        └── UpstreamMalformedResponse it answered something unparsable (503)

Upstream messages are redacted as the exception is built (`server.redaction`):
providers echo key fragments, and the message reaches clients, logs and a stored
credential's `invalid_reason`.

Every message and metadata value is bounded as the exception is built (`clip`): a
message keeps at most MAX_MESSAGE characters and a metadata value MAX_METADATA, with an
ellipsis. They travel in a gRPC trailer (`grpc-message`, `grpc-status-details-bin`) that
Envoy caps at 64 KiB of headers, so a client value quoted whole (a 100 KB model name) would
turn a clear 4xx into a 502 reset. Checks quote at most 64 characters of a value anyway;
this is the backstop for every other path.

Keys, allow-lists and credits add their branch in `server.accounts.errors`
(Unauthenticated 401, PermissionDenied 403, QuotaExceeded 429).
"""

from __future__ import annotations

from server.redaction import redact

MAX_MESSAGE = 1000
MAX_METADATA = 200


def clip(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    reason = "INTERNAL_ERROR"
    # OpenAI's error `type` for REST clients: the one source for unary answers (via
    # ErrorInfo metadata `openai_type`, copied by the bridge) and stream error events.
    openai_type = "api_error"
    # Set once the ledger holds a record of the call this error ended (written by the
    # call's meter, or as a refusal), so that no later handler records it again.
    recorded = False

    def __init__(
        self,
        message: str,
        *,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        message = clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message
        self.field = clip(field, MAX_METADATA) if field else field
        self.metadata = dict(metadata or {})
        if self.field:
            self.metadata.setdefault("field", self.field)


class InvalidRequest(GatewayError):
    """The request is malformed or a field is out of range."""

    reason = "INVALID_REQUEST"
    openai_type = "invalid_request_error"


class RequestTooLarge(InvalidRequest):
    """A field or the request is larger than a documented limit."""

    reason = "REQUEST_TOO_LARGE"


class ModelNotFound(GatewayError):
    """The model is not `provider/model`, or names an unknown provider or model."""

    reason = "MODEL_NOT_FOUND"
    openai_type = "not_found_error"


class ResourceNotFound(GatewayError):
    """The request names an API key or provider credential that does not exist."""

    reason = "RESOURCE_NOT_FOUND"
    openai_type = "not_found_error"


class ProviderNotConfigured(GatewayError):
    """The provider is known but not set up (for example no API key)."""

    reason = "PROVIDER_NOT_CONFIGURED"
    openai_type = "invalid_request_error"


class UnsupportedFeature(GatewayError):
    """The provider does not offer the requested capability or feature."""

    reason = "UNSUPPORTED_FEATURE"
    openai_type = "invalid_request_error"


class ShuttingDown(GatewayError):
    """The server is draining and takes no new calls."""

    reason = "SHUTTING_DOWN"
    openai_type = "service_unavailable_error"


class StorageUnavailable(GatewayError):
    """The gateway's own database cannot be reached or written in time, and no local
    spool could keep the call's record either. Nothing was charged; a provider was
    called only when the record failed at the end of the call (the answer is then
    withheld, or a stream ends with this error). `retry_after_seconds` carries a hint."""

    reason = "STORAGE_UNAVAILABLE"
    openai_type = "service_unavailable_error"

    def __init__(self, message: str, *, retry_after_seconds: float = 5.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class RateLimited(GatewayError):
    """A rate limit of the caller's key or owner (server.limits) is reached; nothing was
    called. `retry_after_seconds` is the real wait until the call would be admitted
    (for concurrency: a short hint), and `headers` the OpenAI rate-limit headers."""

    reason = "RATE_LIMITED"
    openai_type = "rate_limit_error"

    def __init__(
        self,
        message: str,
        *,
        retry_after_seconds: float,
        metadata: dict[str, str] | None = None,
        headers: tuple[tuple[str, str], ...] = (),
    ) -> None:
        super().__init__(message, metadata=metadata)
        self.retry_after_seconds = retry_after_seconds
        self.headers = headers


class RateLimitsUnavailable(GatewayError):
    """The shared rate-limit counters cannot be reached in time and the limits are set
    to fail closed. Nothing was charged and no provider was called."""

    reason = "RATE_LIMITS_UNAVAILABLE"
    openai_type = "service_unavailable_error"

    def __init__(self, message: str, *, retry_after_seconds: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after_seconds = retry_after_seconds


class CallTimeout(GatewayError):
    """A call that set no deadline ran past the gateway's default one, or its request
    message never arrived completely."""

    reason = "CALL_TIMEOUT"
    openai_type = "timeout_error"


class InternalError(GatewayError):
    """An unexpected fault inside the gateway."""

    reason = "INTERNAL_ERROR"


class UpstreamError(GatewayError):
    """The upstream provider failed; `status` is its HTTP status when it answered."""

    reason = "UPSTREAM_UNAVAILABLE"
    openai_type = "upstream_error"

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        status: int | None = None,
        retry_after_seconds: float | None = None,
        field: str | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        # The one place upstream text enters the gateway's errors: redact it here.
        super().__init__(redact(message), field=field, metadata=metadata)
        self.provider = provider
        self.status = status
        self.retry_after_seconds = retry_after_seconds
        self.metadata["provider"] = provider
        if status is not None:
            self.metadata["upstream_status"] = str(status)
        if retry_after_seconds is not None:
            self.metadata["retry_after_seconds"] = f"{retry_after_seconds:g}"


class UpstreamBadRequest(UpstreamError):
    """The provider rejected the request as invalid."""

    reason = "UPSTREAM_BAD_REQUEST"
    openai_type = "invalid_request_error"


class UpstreamAuthFailed(UpstreamError):
    """The provider refused the call for lack of permission (a 403: often one model or
    feature the account may not use). Says nothing about the credential as a whole."""

    reason = "UPSTREAM_AUTH_FAILED"
    openai_type = "permission_denied_error"


class UpstreamCredentialRejected(UpstreamAuthFailed):
    """The provider says the credential itself is not valid (a 401, or its own
    invalid-key error such as Gemini's 400 API_KEY_INVALID). The gateway confirms it
    with a probe before taking a stored credential out of rotation. The client sees
    the same PERMISSION_DENIED as for a 403: its own key is fine; the gateway's is not.
    """


class UpstreamNotFound(UpstreamError):
    """The provider does not know the model or resource."""

    reason = "UPSTREAM_NOT_FOUND"
    openai_type = "not_found_error"


class UpstreamRateLimited(UpstreamError):
    """The provider rate-limited the call; `retry_after_seconds` carries its hint."""

    reason = "UPSTREAM_RATE_LIMITED"
    openai_type = "rate_limit_error"


class UpstreamUnavailable(UpstreamError):
    """The provider failed (5xx), is overloaded, or could not be reached."""

    reason = "UPSTREAM_UNAVAILABLE"
    openai_type = "service_unavailable_error"


class UpstreamTimeout(UpstreamError):
    """The provider did not answer in time."""

    reason = "UPSTREAM_TIMEOUT"
    openai_type = "timeout_error"


class UpstreamMalformedResponse(UpstreamError):
    """The provider answered with something the gateway could not parse."""

    reason = "UPSTREAM_MALFORMED_RESPONSE"
    openai_type = "upstream_error"
