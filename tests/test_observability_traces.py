"""Traces through the real server and Envoy, captured by the SDK's in-memory exporter:
a SERVER span per call under the caller's `traceparent` (REST through Envoy, or gRPC
metadata), a CLIENT span per upstream attempt under it, GenAI attributes, and the
attempt's traceparent on the upstream request."""

from __future__ import annotations

import http.server
import secrets
import threading
from collections.abc import Iterator

import grpc
import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.app import Gateway
from server.observability import tracing
from tests.conftest import Bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import chat_request


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    yield exporter
    tracing.use_provider(None)
    provider.shutdown()


def _traceparent() -> tuple[str, str, str]:
    trace_id, parent_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{parent_id}-01", trace_id, parent_id


def _by_kind(exporter: InMemorySpanExporter, trace_id: str) -> tuple[ReadableSpan, list[ReadableSpan]]:
    mine = [s for s in exporter.get_finished_spans() if format(s.context.trace_id, "032x") == trace_id]
    servers = [s for s in mine if s.kind == SpanKind.SERVER]
    assert len(servers) == 1, [s.name for s in mine]
    return servers[0], [s for s in mine if s.kind == SpanKind.CLIENT]


async def test_a_rest_call_with_a_traceparent_lands_under_that_trace(
    bridge: Bridge, auth_headers: dict[str, str], fake_openai: FakeOpenAI, spans: InMemorySpanExporter, api_key: str
) -> None:
    traceparent, trace_id, parent_id = _traceparent()
    body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "trace me"}]}
    async with httpx.AsyncClient(trust_env=False, headers={**auth_headers, "traceparent": traceparent}) as client:
        answer = await client.post(f"{bridge.rest_url}/v1/chat/completions", json=body)
    assert answer.status_code == 200, answer.text

    server, clients = _by_kind(spans, trace_id)
    assert server.parent is not None and format(server.parent.span_id, "016x") == parent_id
    assert server.name == "chat openai/gpt-4o-mini"
    attributes = dict(server.attributes or {})
    assert attributes["gen_ai.operation.name"] == "chat"
    assert attributes["gen_ai.provider.name"] == "openai"
    assert attributes["gen_ai.request.model"] == "openai/gpt-4o-mini"
    assert attributes["gen_ai.response.model"] == "gpt-4o-mini"
    assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
    assert list(attributes["gen_ai.response.finish_reasons"]) == ["stop"]
    assert str(attributes["aigne_hub.request_id"]).startswith(answer.headers["x-request-id"] + ":")
    assert len(clients) == 1
    client_span = clients[0]
    assert client_span.parent is not None and client_span.parent.span_id == server.context.span_id
    assert client_span.name == "chat gpt-4o-mini"
    assert dict(client_span.attributes or {})["gen_ai.provider.name"] == "openai"

    sent = fake_openai.last_request.headers["traceparent"]
    assert sent.split("-")[1] == trace_id and sent.split("-")[2] == format(client_span.context.span_id, "016x")
    everything = " ".join(f"{s.name} {dict(s.attributes or {})}" for s in spans.get_finished_spans())
    assert api_key not in everything and "trace me" not in everything  # no secret, no message content


async def test_a_grpc_traceparent_is_continued_and_failures_carry_error_type(
    channel: grpc.aio.Channel, spans: InMemorySpanExporter
) -> None:
    chat = chat_grpc.ChatServiceStub(channel)
    traceparent, trace_id, _ = _traceparent()
    _ = [c async for c in chat.StreamChatCompletion(chat_request(), metadata=(("traceparent", traceparent),))]
    server, clients = _by_kind(spans, trace_id)
    assert server.status.status_code != StatusCode.ERROR and len(clients) == 1

    traceparent, trace_id, _ = _traceparent()
    with pytest.raises(grpc.aio.AioRpcError):
        await chat.CreateChatCompletion(
            chat_request(model="openai/error-503"), metadata=(("traceparent", traceparent),)
        )
    server, clients = _by_kind(spans, trace_id)
    assert server.status.status_code == StatusCode.ERROR
    assert dict(server.attributes or {})["error.type"] == "UPSTREAM_UNAVAILABLE"
    assert [dict(c.attributes or {}).get("error.type") for c in clients] == ["UPSTREAM_UNAVAILABLE"]


async def test_nothing_is_traced_or_propagated_when_tracing_is_off(
    channel: grpc.aio.Channel, gateway: Gateway, fake_openai: FakeOpenAI
) -> None:
    assert not tracing.enabled()
    traceparent, _, _ = _traceparent()
    await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(
        chat_request(), metadata=(("traceparent", traceparent),)
    )
    assert "traceparent" not in fake_openai.last_request.headers
    assert not tracing.tracing_requested({})
    assert tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert not tracing.tracing_requested({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x", "OTEL_TRACES_EXPORTER": "none"})


def test_the_otlp_exporter_sends_spans_to_the_configured_endpoint() -> None:
    """An in-process OTLP/HTTP receiver: what `setup_tracing` exports from the standard
    variables arrives as an ExportTraceServiceRequest with the service name."""
    received: list[bytes] = []

    class Receiver(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            received.append(self.rfile.read(int(self.headers["content-length"])))
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            return None

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    environ = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}",
        "OTEL_SERVICE_NAME": "hub-under-test",
    }
    try:
        provider = tracing.setup_tracing(environ)
        assert provider is not None
        span = tracing.start_call("chat", "openai/gpt-4o-mini", ())
        assert span is not None
        span.end(None, None)
        assert provider.force_flush(10_000)
    finally:
        tracing.use_provider(None)
        server.shutdown()
        server.server_close()
    request = ExportTraceServiceRequest.FromString(received[0])
    resource = request.resource_spans[0]
    assert {a.key: a.value.string_value for a in resource.resource.attributes}["service.name"] == "hub-under-test"
    assert resource.scope_spans[0].spans[0].name == "chat openai/gpt-4o-mini"
