"""Traces: OpenTelemetry spans on the GenAI semantic conventions, exported with OTLP.

On when the standard variables ask for it: `OTEL_TRACES_EXPORTER=otlp`, or
`OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) set and `OTEL_TRACES_EXPORTER`
not `none`; `OTEL_SERVICE_NAME` names the service (default `aigne-hub`). The exporter
is OTLP over HTTP/protobuf (the spec's default protocol, port 4318); spans leave in
batches from a background thread. Off otherwise, and then a call pays one `None` check.

Per call: one SERVER span named `{gen_ai.operation.name} {gen_ai.request.model}` around
the metered call (routing, attempts, the ledger record), and one CLIENT span per
upstream attempt named `{gen_ai.operation.name} {upstream model}` (for a stream it ends
with the first chunk, when the attempt is decided). Attributes: gen_ai.operation.name,
gen_ai.provider.name, gen_ai.request.model, gen_ai.response.model (the deployment's
model that answered), gen_ai.usage.input_tokens / output_tokens, error.type (the
gateway's error reason), and aigne_hub.request_id / aigne_hub.attempts.
gen_ai.response.finish_reasons comes from a unary answer's choices (a stream's attempt
ends with its first chunk, before any finish reason).

Propagation: a W3C `traceparent` (and `tracestate`) arriving as gRPC metadata is
continued: a REST client's header reaches it through Envoy unchanged. Each upstream
request carries the attempt span's `traceparent`. Message content is never recorded.

OpenTelemetry (~10 MB of RSS per process with its SDK) is imported only when tracing
is on: every name used below `use_provider` runs only with a tracer set.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from server.observability.metrics import GEN_AI_OPERATIONS

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_HEADERS = frozenset({"traceparent", "tracestate"})
_tracer: Tracer | None = None


@functools.cache
def _propagator() -> TraceContextTextMapPropagator:
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

    return TraceContextTextMapPropagator()


def tracing_requested(environ: Mapping[str, str]) -> bool:
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter == "none" or environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    return exporter == "otlp" or bool(endpoint)


def setup_tracing(environ: Mapping[str, str] | None = None) -> TracerProvider | None:
    """Starts the OTLP exporter when the environment asks for it (see the docstring)."""
    environ = os.environ if environ is None else environ
    if not tracing_requested(environ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = environ.get("OTEL_SERVICE_NAME") or "aigne-hub"
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=_traces_endpoint(environ))))
    use_provider(provider)
    return provider


def _traces_endpoint(environ: Mapping[str, str]) -> str | None:
    """The OTLP/HTTP traces URL from these variables (None: the exporter's default)."""
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        return endpoint
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        return endpoint.rstrip("/") + "/v1/traces"
    return None


def use_provider(provider: TracerProvider | None) -> None:
    """Traces go to `provider` from now on (None: tracing off)."""
    global _tracer
    _tracer = provider.get_tracer("aigne_hub") if provider is not None else None


def enabled() -> bool:
    return _tracer is not None


class CallSpan:
    """The SERVER span of one call, current while the call runs."""

    def __init__(self, tracer: Tracer, operation: str, model: str, metadata: Any) -> None:
        from opentelemetry import context as otel_context
        from opentelemetry import trace
        from opentelemetry.trace import SpanKind

        carrier = {k: v for k, v in metadata or () if k in TRACE_HEADERS and isinstance(v, str)}
        parent = _propagator().extract(carrier) if carrier else None
        self.operation = GEN_AI_OPERATIONS.get(operation, operation)
        self.span: Span = tracer.start_span(
            f"{self.operation} {model}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"gen_ai.operation.name": self.operation, "gen_ai.request.model": model},
        )
        self._token = otel_context.attach(trace.set_span_in_context(self.span))
        self.finish_reasons: list[str] = []

    @property
    def trace_id(self) -> str:
        return format(self.span.get_span_context().trace_id, "032x")

    def end(self, record: Any, error: BaseException | None) -> None:
        """Ends the span with what the call's ledger record says (`record` may be None)."""
        span = self.span
        if record is not None:
            span.set_attribute("gen_ai.provider.name", record.provider)
            span.set_attribute("gen_ai.response.model", record.model.partition("/")[2] or record.model)
            span.set_attribute("gen_ai.usage.input_tokens", record.input_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", record.output_tokens)
            span.set_attribute("aigne_hub.request_id", record.request_id)
            span.set_attribute("aigne_hub.attempts", record.attempts)
        if self.finish_reasons:
            span.set_attribute("gen_ai.response.finish_reasons", self.finish_reasons)
        _mark_error(span, error)
        span.end()
        from opentelemetry import context as otel_context

        otel_context.detach(self._token)


def start_call(operation: str, model: str, metadata: Any) -> CallSpan | None:
    tracer = _tracer
    return None if tracer is None else CallSpan(tracer, operation, model, metadata)


@contextmanager
def attempt_span(operation: str, provider: str, model: str) -> Iterator[Span | None]:
    """The CLIENT span of one upstream attempt, current while it runs (so the upstream
    request carries its traceparent); None when tracing is off."""
    tracer = _tracer
    if tracer is None:
        yield None
        return
    from opentelemetry.trace import SpanKind

    name = GEN_AI_OPERATIONS.get(operation, operation)
    attributes = {"gen_ai.operation.name": name, "gen_ai.provider.name": provider, "gen_ai.request.model": model}
    with tracer.start_as_current_span(
        f"{name} {model}",
        kind=SpanKind.CLIENT,
        attributes=attributes,
        record_exception=False,
        set_status_on_exception=False,
    ) as span:
        try:
            yield span
        except BaseException as exc:
            _mark_error(span, exc)
            raise


def note_answer(span: Span, call: CallSpan | None, answer: Any) -> None:
    """Records an OpenAI-shaped answer's finish reasons on the attempt's span and the call's."""
    choices = answer.get("choices") if isinstance(answer, dict) else None
    reasons = [str(c["finish_reason"]) for c in choices or () if isinstance(c, dict) and c.get("finish_reason")]
    if reasons:
        span.set_attribute("gen_ai.response.finish_reasons", reasons)
        if call is not None:
            call.finish_reasons = reasons


def _mark_error(span: Span, error: BaseException | None) -> None:
    if error is None:
        return
    from opentelemetry.trace import StatusCode

    reason = getattr(error, "reason", None) or type(error).__name__
    span.set_attribute("error.type", reason)
    span.set_status(StatusCode.ERROR, reason)


def upstream_headers() -> tuple[tuple[str, str], ...]:
    """The headers that continue the current trace upstream (the attempt's span), for
    the call's per-attempt `server.calls.Call`; none when tracing is off."""
    if _tracer is None:
        return ()
    carrier: dict[str, str] = {}
    _propagator().inject(carrier)
    return tuple(carrier.items())
