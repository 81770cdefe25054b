"""Which failures are worth another attempt, how long to wait before it, and which
failures send a call down a fallback chain.

Retried (on another deployment when there is one): connection failures and timeouts,
and upstream answers 408, 409, 429, 500, 502, 503, 504, 529 and providers' "overloaded"
errors. Never retried: 400, 401, 403, 404, 413, 422 and every error of the gateway's own
(bad input, allow-list, credits), because another attempt would fail the same way.
"""

from __future__ import annotations

import random

from server import errors

RETRYABLE_STATUSES = frozenset({408, 409, 429, 500, 502, 503, 504, 529})
NEVER_RETRIED_STATUSES = frozenset({400, 401, 403, 404, 413, 422})
# How providers say that a prompt is longer than the model's context window.
_CONTEXT_WINDOW_MARKERS = (
    "context_length_exceeded",
    "maximum context length",
    "context window",
    "prompt is too long",
    "input is too long",
    "too many tokens",
)
_CONTENT_POLICY_MARKERS = ("content_policy", "content policy", "content_filter", "safety system", "blocked by safety")


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt (here or on another deployment) may succeed."""
    if not isinstance(exc, errors.UpstreamError):
        return False
    if exc.status is not None:
        if exc.status in NEVER_RETRIED_STATUSES:
            return False
        return exc.status in RETRYABLE_STATUSES or exc.status >= 500
    # No HTTP status: the upstream could not be reached, timed out, or failed mid-stream.
    return isinstance(exc, errors.UpstreamUnavailable | errors.UpstreamTimeout | errors.UpstreamRateLimited)


def counts_against_deployment(exc: BaseException) -> bool:
    """Whether the failure says something about the deployment's health (cooldowns):
    the retryable ones. A bad request or a refused model is the caller's, not the
    deployment's."""
    return is_retryable(exc)


def is_context_window_exceeded(exc: BaseException) -> bool:
    return isinstance(exc, errors.UpstreamBadRequest) and _mentions(exc, _CONTEXT_WINDOW_MARKERS)


def is_content_policy_refusal(exc: BaseException) -> bool:
    return isinstance(exc, errors.UpstreamBadRequest) and _mentions(exc, _CONTENT_POLICY_MARKERS)


def backoff_s(retry_number: int, *, base_s: float, max_s: float, rng: random.Random | None = None) -> float:
    """Full-jitter exponential backoff before retry number `retry_number` (1, 2, ...)."""
    ceiling = min(max_s, base_s * (2 ** max(retry_number - 1, 0)))
    return (rng or random).uniform(0, ceiling)


def _mentions(exc: errors.UpstreamError, markers: tuple[str, ...]) -> bool:
    text = exc.message.lower()
    return any(marker in text for marker in markers)
