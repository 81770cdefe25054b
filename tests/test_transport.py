"""The upstream transport on its own: framing, JSON, error classification, and what
every request carries of its call (credential, request id, trace), against the fake
OpenAI upstream on loopback (no gateway, no Envoy)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
from multidict import CIMultiDict

from server import errors
from server.calls import NO_CALL, Call, CallCredential, probe_call
from server.providers.openai import OpenAIAdapter
from server.providers.transport import (
    Transport,
    UpstreamLimits,
    error_message_from_body,
    parse_object,
    retry_after_seconds,
    sse_data,
    upstream_status_error,
)
from tests.fakes.openai_upstream import FakeOpenAI


async def _lines(*lines: str) -> AsyncIterator[str]:
    for line in lines:
        yield line


async def _events(*lines: str, bare_json: bool = False) -> list[str]:
    return [event async for event in sse_data(_lines(*lines), bare_json=bare_json)]


async def test_sse_framing_joins_data_lines_and_skips_other_fields() -> None:
    events = await _events(
        ": a comment",
        "event: message_start",
        'data: {"a":',
        "data:1}",
        "",
        "id: 7",
        "retry: 100",
        "",
        "data: [DONE]",
    )
    assert events == ['{"a":\n1}', "[DONE]"]  # the last event needs no blank line after it


async def test_bare_json_lines_are_events_only_when_asked() -> None:
    lines = ('data: {"x": 1}', "", '{"error": {"code": 500,', '"message": "boom"}}', "")
    assert await _events(*lines) == ['{"x": 1}']
    assert await _events(*lines, bare_json=True) == ['{"x": 1}', '{"error": {"code": 500,\n"message": "boom"}}']


def test_parse_object_refuses_what_is_not_a_json_object() -> None:
    assert parse_object("p", b'{"a": 1}') == {"a": 1}
    with pytest.raises(errors.UpstreamMalformedResponse, match="p answered with invalid JSON"):
        parse_object("p", b"<html>")
    with pytest.raises(errors.UpstreamMalformedResponse, match="not an object"):
        parse_object("p", "[1, 2]")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, errors.UpstreamBadRequest),
        (401, errors.UpstreamCredentialRejected),
        (403, errors.UpstreamAuthFailed),
        (404, errors.UpstreamNotFound),
        (408, errors.UpstreamTimeout),
        (422, errors.UpstreamBadRequest),
        (429, errors.UpstreamRateLimited),
        (500, errors.UpstreamUnavailable),
        (504, errors.UpstreamTimeout),
        (529, errors.UpstreamUnavailable),
    ],
)
def test_status_classification(status: int, kind: type[errors.UpstreamError]) -> None:
    error = upstream_status_error("p", status, CIMultiDict(), "why")
    assert type(error) is kind and error.message == f"p answered {status}: why"


def test_retry_hints() -> None:
    assert retry_after_seconds(CIMultiDict({"retry-after-ms": "1500", "retry-after": "9"})) == 1.5
    assert retry_after_seconds(CIMultiDict({"retry-after": "7"})) == 7.0
    assert retry_after_seconds(CIMultiDict({"retry-after": "soon"})) is None
    assert retry_after_seconds({}) is None
    # A hint from the body (Gemini's RetryInfo) counts only when the headers give none.
    assert upstream_status_error("p", 429, {}, "m", retry_after=3.0).retry_after_seconds == 3.0
    assert upstream_status_error("p", 429, {"retry-after": "1"}, "m", retry_after=3.0).retry_after_seconds == 1.0


def test_error_messages_from_bodies() -> None:
    assert error_message_from_body(b'{"error": {"message": "bad key"}}') == "bad key"
    assert error_message_from_body(b'{"error": "flat"}') == "flat"
    assert error_message_from_body(b"") == "(empty body)"
    assert len(error_message_from_body(b"x" * 5000)) == 500


@pytest.fixture(scope="module")
async def fake() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI(api_key=None)  # any key: the tests read what was sent
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
async def adapter(fake: FakeOpenAI) -> AsyncIterator[OpenAIAdapter]:
    transport = Transport()
    yield OpenAIAdapter(name="openai", base_url=fake.base_url, api_key="configured-key", transport=transport)
    await transport.aclose()


CHAT = {"messages": [{"role": "user", "content": "hi there"}]}


async def test_a_call_carries_its_credential_request_id_and_trace(fake: FakeOpenAI, adapter: OpenAIAdapter) -> None:
    await adapter.create_chat_completion(CHAT, "gpt-4o-mini")
    assert fake.requests[-1].headers["authorization"] == "Bearer configured-key"
    assert "x-request-id" not in fake.requests[-1].headers
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    call = Call(
        request_id="req-1",
        credential=CallCredential("stored-key", "cred-1"),
        trace_headers=(("traceparent", traceparent),),
    )
    answer = await adapter.create_chat_completion(CHAT, "gpt-4o-mini", call)
    sent = fake.requests[-1].headers
    assert answer["choices"][0]["message"]["content"] == "echo: hi there"
    assert sent["authorization"] == "Bearer stored-key"  # the call's credential wins
    assert sent["x-request-id"] == "req-1" and sent["traceparent"] == traceparent
    assert "stored-key" not in repr(call)


async def test_streams_carry_the_call_too(fake: FakeOpenAI, adapter: OpenAIAdapter) -> None:
    chunks = [c async for c in adapter.stream_chat_completion(CHAT, "gpt-4o-mini", Call(request_id="req-2"))]
    assert fake.requests[-1].headers["x-request-id"] == "req-2"
    assert chunks[-1]["usage"]["completion_tokens"] > 0


async def test_error_statuses_become_the_error_tree(adapter: OpenAIAdapter) -> None:
    with pytest.raises(errors.UpstreamRateLimited) as limited:
        await adapter.create_chat_completion(CHAT, "error-429")
    assert limited.value.retry_after_seconds == 7.0 and "Rate limit reached" in limited.value.message
    with pytest.raises(errors.UpstreamUnavailable):  # before the first chunk: the status
        await anext(adapter.stream_chat_completion(CHAT, "error-503"))
    with pytest.raises(errors.UpstreamMalformedResponse):
        await adapter.create_chat_completion(CHAT, "malformed")


async def test_a_cut_stream_is_an_error_not_a_clean_end(adapter: OpenAIAdapter) -> None:
    with pytest.raises(errors.UpstreamUnavailable):
        _ = [c async for c in adapter.stream_chat_completion(CHAT, "stream-cut", NO_CALL)]


async def test_no_answer_is_unavailable_or_timeout() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once the socket closes
    async with Transport(UpstreamLimits(connect_s=0.5, read_s=0.5, pool_s=0.5)) as transport:
        upstream = transport.upstream("p", credential_header=("authorization", "Bearer "))
        with pytest.raises(errors.UpstreamUnavailable, match="p could not be reached"):
            await upstream.send("GET", f"http://127.0.0.1:{port}/", probe_call("s"))


async def test_probe_sends_the_secret_and_reads_a_rejection(fake: FakeOpenAI, adapter: OpenAIAdapter) -> None:
    await adapter.probe_credential("any-key")
    assert fake.requests[-1].path.endswith("/models")
    assert fake.requests[-1].headers["authorization"] == "Bearer any-key"
    strict = FakeOpenAI(api_key="sk-right")
    await strict.start()
    try:
        async with Transport() as transport:
            checked = OpenAIAdapter(name="openai", base_url=strict.base_url, api_key=None, transport=transport)
            await checked.probe_credential("sk-right")
            with pytest.raises(errors.UpstreamCredentialRejected, match="openai answered 401"):
                await checked.probe_credential("sk-wrong")
    finally:
        await strict.stop()


async def test_closing_a_stream_hangs_up_on_the_upstream(fake: FakeOpenAI, adapter: OpenAIAdapter) -> None:
    before = fake.cancelled_streams
    chunks = adapter.stream_chat_completion(CHAT, "stream-stall")
    assert (await anext(chunks))["choices"]  # the upstream is now silent, mid-stream
    await chunks.aclose()  # what a client's cancellation does to the attempt
    for _ in range(50):
        if fake.cancelled_streams > before:
            break
        await asyncio.sleep(0.02)
    assert fake.cancelled_streams == before + 1
