"""The call: what one client call carries from its servicer down to the upstream request.

Built once by the servicer (`server.api.calls`) when the call starts, handed to the
routing (`server.routing.attempts`), which copies it per attempt (`for_attempt`) with
the attempt's number and the provider credential chosen for it (the servicer adds the
attempt's trace context); the adapter hands it to the transport (`server.providers.transport`), which
puts the credential in the provider's header and the request id and trace context in
the upstream request. Nothing about a call travels in context variables or HTTP
hooks: a reader of an adapter sees what reaches the upstream.

This module is below every layer that uses it (it imports nothing of the server), so
the accounts, the routing and the providers can all name it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class CallCredential:
    """A provider secret chosen for one attempt (a stored credential of the vault, or a
    secret being probed); `id` is the stored credential's id, None for a probe."""

    secret: str
    id: str | None = None

    def __repr__(self) -> str:  # never the secret, whoever prints the call
        return f"CallCredential(id={self.id!r})"


@dataclass(frozen=True, slots=True)
class Call:
    """One client call as the upstream request sees it (see the module docstring)."""

    # The call's request id (the caller's or Envoy's `x-request-id`), sent upstream too.
    request_id: str | None = None
    # The gateway API key and its owner (None: an anonymous call or a gateway task).
    key_id: str | None = None
    owner_id: str | None = None
    # When the whole call must be over, as an event-loop time (None: no bound).
    deadline: float | None = None
    # 1 for the first upstream attempt, 2 for the next (a retry or a fallback), ...
    attempt: int = 0
    # The credential for this attempt; None: the adapter's configured key.
    credential: CallCredential | None = None
    # Headers that continue the call's trace upstream (W3C traceparent, ...).
    trace_headers: tuple[tuple[str, str], ...] = ()

    def for_attempt(self, attempt: int, credential: CallCredential | None) -> Call:
        """The call as attempt number `attempt` sends it, with `credential`."""
        # Built field by field: dataclasses.replace costs several times more, per call.
        return Call(self.request_id, self.key_id, self.owner_id, self.deadline, attempt, credential, self.trace_headers)

    def with_trace(self, headers: tuple[tuple[str, str], ...]) -> Call:
        return replace(self, trace_headers=headers) if headers else self


# For calls made outside a client call: the CLI, tests, a credential probe.
NO_CALL = Call()


def probe_call(secret: str) -> Call:
    """The call of a credential probe: nothing but the secret to check."""
    return Call(credential=CallCredential(secret))
