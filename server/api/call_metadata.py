"""The request metadata a call's own code reads, taken from grpc once per call.

grpc.aio's `context.invocation_metadata()` builds a new tuple of new strings from
grpc-core's metadata array each time it is called, and one chat call used to read and
scan it about six times (request id, the REST bridge's markers, the parameters it
saw, the caller's fallbacks and time limit, the trace context). `call_metadata`
reads it once per call and keeps, in call order, only the entries of the headers the
gateway acts on (`MARKED`); every later reader in the same call gets that object.

The object is kept in a context variable together with the context it was read
from: grpc.aio runs each call in its own task (the auth interceptor's hand-off of the
key relies on the same), and a different context (another call) is read afresh.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from server.observability.tracing import TRACE_HEADERS  # W3C trace context, which tracing continues

# Set by the REST bridge (Envoy's Lua filter) on calls it turns into JSON or SSE.
BRIDGE_HEADER = "x-aigne-bridge"
# Set by the REST bridge on OpenAI's chat paths: its Lua filter prints
# convert.JSON_NULL as JSON null there.
REST_HEADER = "x-aigne-rest"
# Set by the REST bridge: the top-level members of the JSON body (envoy/openai_bridge.lua).
FIELDS_HEADER = "x-aigne-fields"
# Set by the REST bridge ("trailers") on the unary calls whose answer headers it copies
# from the gRPC trailers into the HTTP response (envoy/openai_bridge.lua).
ANSWER_HEADERS_HEADER = "x-aigne-answer-headers"
# What the caller may ask of the routing.
FALLBACKS_HEADER = "x-aigne-hub-fallbacks"
TIMEOUT_HEADER = "x-aigne-hub-timeout-s"
REQUEST_ID_HEADER = "x-request-id"
MARKED = frozenset(
    {
        BRIDGE_HEADER,
        REST_HEADER,
        FIELDS_HEADER,
        ANSWER_HEADERS_HEADER,
        FALLBACKS_HEADER,
        TIMEOUT_HEADER,
        REQUEST_ID_HEADER,
        *TRACE_HEADERS,
    }
)


@dataclass(frozen=True, slots=True)
class CallMetadata:
    """The entries of the `MARKED` headers, in the order the caller sent them."""

    marked: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def parse(cls, metadata: Any) -> CallMetadata:
        return cls(tuple((key, value) for key, value in metadata or () if key in MARKED))

    def values(self, header: str) -> list[Any]:
        """The values sent for `header`, in order."""
        return [value for key, value in self.marked if key == header]

    def first(self, header: str) -> Any:
        return next((value for key, value in self.marked if key == header), None)

    @property
    def from_rest(self) -> bool:
        """Whether the call came through the REST bridge (its answer is printed as JSON)."""
        return any(value in ("rest", "sse") for value in self.values(BRIDGE_HEADER))

    @property
    def from_bridge(self) -> bool:
        """Whether the call came through the REST bridge as an SSE stream."""
        return "sse" in self.values(BRIDGE_HEADER)

    @property
    def answer_headers_from_trailers(self) -> bool:
        """Whether the REST bridge makes a unary answer's HTTP headers from its gRPC
        trailers, so that they need not go ahead of it as initial metadata."""
        return bool(self.first(ANSWER_HEADERS_HEADER) == "trailers")

    @property
    def wants_json_nulls(self) -> bool:
        """Whether the answer goes to an OpenAI REST client (see server.api.convert)."""
        return any(key == REST_HEADER for key, _ in self.marked)


_CURRENT: ContextVar[tuple[object, CallMetadata] | None] = ContextVar("aigne_hub_call_metadata", default=None)


def call_metadata(context: Any) -> CallMetadata:
    """The call's metadata, read from `context` on the call's first use only."""
    current = _CURRENT.get()
    if current is not None and current[0] is context:
        return current[1]
    parsed = CallMetadata.parse(context.invocation_metadata())
    _CURRENT.set((context, parsed))
    return parsed
