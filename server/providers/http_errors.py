"""Turns an upstream HTTP failure into the matching `server.errors` exception.

Shared by every adapter that talks HTTP: the status-code mapping is the same for all
providers; only how the error message is found in the body differs, so adapters pass
their own `message` when they have parsed one.

Only a 401 says the credential itself is bad (`UpstreamCredentialRejected`: the
gateway confirms with a probe and may take a stored credential out of rotation); a 403
is a refused permission, often for one model, and leaves the credential alone. Upstream
text is redacted of anything key-shaped when the `UpstreamError` is built.
"""

from __future__ import annotations

import json
from email.utils import parsedate_to_datetime
from time import time

import httpx

from server import errors

_MAX_MESSAGE_CHARS = 500


def retry_after_seconds(headers: httpx.Headers) -> float | None:
    """The provider's retry hint: `retry-after-ms`, or `retry-after` (seconds or a date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time(), 0.0)
    except (TypeError, ValueError):
        return None


def error_message_from_body(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, or the body's start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:_MAX_MESSAGE_CHARS] or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_MAX_MESSAGE_CHARS]
        if isinstance(error, str):
            return error[:_MAX_MESSAGE_CHARS]
    return json.dumps(parsed)[:_MAX_MESSAGE_CHARS]


def upstream_status_error(provider: str, status: int, headers: httpx.Headers, message: str) -> errors.UpstreamError:
    """The exception for an upstream answer with HTTP status `status` (>= 400)."""
    text = f"{provider} answered {status}: {message}"
    kind: type[errors.UpstreamError]
    if status in (400, 409, 413, 415, 422):
        kind = errors.UpstreamBadRequest
    elif status == 401:
        kind = errors.UpstreamCredentialRejected
    elif status == 403:
        kind = errors.UpstreamAuthFailed
    elif status == 404:
        kind = errors.UpstreamNotFound
    elif status == 429:
        kind = errors.UpstreamRateLimited
    elif status in (408, 504):
        kind = errors.UpstreamTimeout
    else:  # 5xx, 529 overloaded, and anything unexpected
        kind = errors.UpstreamUnavailable
    return kind(
        text,
        provider=provider,
        status=status,
        retry_after_seconds=retry_after_seconds(headers),
    )


def transport_error(provider: str, exc: httpx.HTTPError) -> errors.UpstreamError:
    """The exception for a request that got no (complete) HTTP answer."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return errors.UpstreamTimeout(f"{provider} did not answer in time ({detail})", provider=provider)
    return errors.UpstreamUnavailable(f"{provider} could not be reached ({detail})", provider=provider)
