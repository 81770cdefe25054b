"""Redaction of secrets from text that came from outside the gateway.

Providers echo parts of the key they were sent ("Incorrect API key provided:
sk-abc***xyz"), and an upstream message reaches the client, the log and a stored
credential's `invalid_reason`. Every upstream message is redacted once, where it
enters the gateway: `server.errors.UpstreamError` redacts the message it is built
with, whichever adapter built it (status errors, stream error events, bodies quoted
in "malformed" errors).

What counts as a secret: the secrets the gateway was configured with (registered at
start with `register_secret`: provider keys, vault credentials as they are opened, the
admin token, the master key, the key pepper), and anything key-shaped: OpenAI-style
`sk-...` keys and their starred fragments, Google `AIza...` keys, the gateway's own
`ahk_...` keys, bearer tokens, `key=`/`token=` values, and runs of 32 or more
base64/hex characters mixing letters and digits. Over-redacting a request id in an
error message is the accepted price.
"""

from __future__ import annotations

import re
import threading

REDACTED = "[redacted]"
# Shorter configured values are too likely to be ordinary words to be replaced.
_MIN_REGISTERED_CHARS = 8

_KEY_SHAPED = re.compile(
    r"""
      \bsk-[\w\-]*(?:[*.]+[\w\-]*)?            # OpenAI, Anthropic (sk-ant-...), and starred fragments
    | \bAIza[\w\-]*(?:[*.]+[\w\-]*)?           # Google API keys
    | \bahk_[\w\-]*(?:[*.]+[\w\-]*)?           # the gateway's own API keys
    | (?i:\bbearer\s+)[^\s"',;]+               # a bearer token
    | (?<![\w/+\-])(?=[A-Za-z0-9+/_\-]*[0-9])(?=[A-Za-z0-9+/_\-]*[A-Za-z])[A-Za-z0-9+/_\-]{32,}=*
    """,
    re.VERBOSE,
)
_KEY_ASSIGNMENT = re.compile(
    r"""(?i)\b((?:x-)?(?:api[-_]?key|access[-_]?token|token|secret|password|key)["']?\s*[:=]\s*["']?)[^\s"',;&]+"""
)

_registered: set[str] = set()
_lock = threading.Lock()


def register_secret(secret: str | None) -> None:
    """Adds a configured secret: it is replaced wherever it appears in redacted text."""
    if secret and len(secret) >= _MIN_REGISTERED_CHARS:
        with _lock:
            _registered.add(secret)


def redact(text: str) -> str:
    """`text` with every registered secret and everything key-shaped replaced."""
    for secret in _secrets_longest_first():
        if secret in text:
            text = text.replace(secret, REDACTED)
    text = _KEY_ASSIGNMENT.sub(lambda m: m.group(1) + REDACTED, text)
    return _KEY_SHAPED.sub(_keep_prefix, text)


def _keep_prefix(match: re.Match[str]) -> str:
    """`Bearer [redacted]` keeps its scheme word; other matches go whole."""
    found = match.group(0)
    if found[:7].lower() == "bearer ":
        return found[:7] + REDACTED
    return REDACTED


def _secrets_longest_first() -> list[str]:
    with _lock:
        return sorted(_registered, key=len, reverse=True)
