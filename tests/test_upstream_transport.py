"""The upstream transport's HTTP client (server.providers.http1 under
server.providers.transport) against
raw loopback servers: each way an upstream can fail becomes the right error of the tree
(a timeout vs unreachable), bodies arrive chunk by chunk and split into lines whatever
the chunk boundaries, connections are reused, a body closed early does not go back to
the pool, what is sent is what an adapter asked for (headers, body, query, escapes),
and no wait outlives the call's deadline."""

from __future__ import annotations

import asyncio
import gzip
import ipaddress
import ssl
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import uvloop
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from server import errors
from server.app import upstream_transport
from server.calls import NO_CALL, Call
from server.config import Settings
from server.providers.transport import Transport, Upstream, UpstreamLimits

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A loopback TCP server; yields its URL and a list counting accepted connections."""
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", accepted
    finally:
        server.close()


async def read_request(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), 0
    )
    return head + (await reader.readexactly(length) if length else b"")


def answering(reply: bytes, seen: list[bytes] | None = None) -> Handler:
    """A keep-alive server giving `reply` to every request (recorded in `seen`)."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                request = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if seen is not None:
                seen.append(request)
            writer.write(reply)
            await writer.drain()

    return answer


@asynccontextmanager
async def upstream(read_timeout_s: float = 5.0) -> AsyncIterator[Upstream]:
    """The provider view of the transport the application builds from its settings."""
    settings = Settings(upstream_read_timeout_s=read_timeout_s, upstream_connect_timeout_s=2.0)
    async with upstream_transport(settings) as transport:
        yield transport.upstream("p", credential_header=("authorization", "Bearer "), api_key="sk-configured")


OK_JSON = b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\nX-Thing: 1\r\ncontent-length: 11\r\n\r\n{"ok":true}'


async def test_answers_reuse_one_connection_and_send_the_body() -> None:
    seen: list[bytes] = []
    async with raw_server(answering(OK_JSON, seen)) as (url, accepted), upstream() as http:
        for _ in range(3):
            assert await http.post_json(f"{url}/v1/chat", {"a": 1, "é": "ü"}, Call(request_id="r-1")) == {"ok": True}
        answer = await http.send("GET", f"{url}/v1/models", NO_CALL)
    assert len(accepted) == 1
    assert b"authorization: Bearer sk-configured" in seen[0] and b"x-request-id: r-1" in seen[0]
    assert seen[0].endswith('{"a":1,"é":"ü"}'.encode())  # compact UTF-8, as httpx sent it
    assert answer.status == 200 and answer.content == b'{"ok":true}'
    assert answer.headers["x-thing"] == answer.headers["X-THING"] == "1"  # case-insensitive


async def test_a_streamed_body_arrives_chunk_by_chunk() -> None:
    release = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
        writer.write(b"8\r\ndata: 1\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()

    async with raw_server(stream) as (url, _), upstream() as http, http.stream("POST", f"{url}/s", NO_CALL) as body:
        chunks = body.chunks()
        assert await asyncio.wait_for(anext(chunks), 5) == b"data: 1\n"  # before the rest was sent
        release.set()
        assert [chunk async for chunk in chunks] == [b"data: 2\n"]
        assert body.headers["Content-Type"] == "text/event-stream"


async def test_lines_split_on_every_line_end_across_chunk_boundaries() -> None:
    # LF, CRLF (its CR and LF in two chunks), a bare CR, and a two-byte character cut in two.
    pieces = [b"data: a\n", b"data: b\r", b"\ndata: c\r\r", b"data: \xc3", b"\xa9\n\ndata: end"]

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for piece in pieces:
            writer.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await writer.drain()
            await asyncio.sleep(0.02)  # one read per piece
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(stream) as (url, _), upstream() as http, http.stream("GET", f"{url}/s", NO_CALL) as body:
        lines = [line async for line in body.lines()]
    assert lines == ["data: a", "data: b", "data: c", "", "data: é", "", "data: end"]


async def test_a_refused_connection_is_unreachable_not_a_timeout() -> None:
    async with raw_server(lambda r, w: asyncio.sleep(0)) as (url, _):
        pass  # closed: nothing listens on the port any more
    async with upstream() as http:
        with pytest.raises(errors.UpstreamUnavailable, match="p could not be reached") as caught:
            await http.send("GET", f"{url}/x", NO_CALL)
    assert not isinstance(caught.value, errors.UpstreamTimeout)


async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    await asyncio.sleep(5)


async def test_a_silent_upstream_is_a_read_timeout() -> None:
    async with raw_server(silent) as (url, _), upstream(read_timeout_s=0.3) as http:
        with pytest.raises(errors.UpstreamTimeout, match="p did not answer in time"):
            await http.send("GET", f"{url}/x", NO_CALL)


async def test_no_wait_outlives_the_calls_deadline() -> None:
    loop = asyncio.get_running_loop()
    async with raw_server(silent) as (url, _), upstream(read_timeout_s=30) as http:
        started = loop.time()
        with pytest.raises(errors.UpstreamTimeout):
            await http.send("GET", f"{url}/x", Call(deadline=started + 0.3))
        assert loop.time() - started < 2  # the deadline's 0.3 s, not the read timeout's 30 s
        started = loop.time()
        with pytest.raises(errors.UpstreamTimeout):  # a stream is bounded as a whole
            async with http.stream("GET", f"{url}/x", Call(deadline=started + 0.3)):
                pass
        assert loop.time() - started < 2


async def test_a_stream_that_trickles_past_the_deadline_is_cut_at_the_deadline() -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(50):  # each wait well inside the read timeout
            writer.write(b"2\r\nx\n\r\n")
            await writer.drain()
            await asyncio.sleep(0.1)

    loop = asyncio.get_running_loop()
    async with raw_server(trickle) as (url, _), upstream(read_timeout_s=1) as http:
        started = loop.time()
        with pytest.raises(errors.UpstreamTimeout):
            async with http.stream("GET", f"{url}/s", Call(deadline=started + 0.5)) as body:
                _ = [chunk async for chunk in body.chunks()]
        assert loop.time() - started < 2


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closed before any answer
        b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{",  # closed mid-body
        b"not http at all\r\n\r\n",
    ],
)
async def test_a_broken_answer_is_unreachable(reply: bytes) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with raw_server(broken) as (url, _), upstream() as http:
        with pytest.raises(errors.UpstreamUnavailable, match="p could not be reached"):
            await http.send("GET", f"{url}/x", NO_CALL)


async def test_an_error_status_is_read_by_the_providers_error_reader() -> None:
    body = b'{"error": {"message": "slow"}}'
    reply = b"HTTP/1.1 429 Too Many\r\nRetry-After: 3\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    async with raw_server(answering(reply)) as (url, _), upstream() as http:
        with pytest.raises(errors.UpstreamRateLimited, match="p answered 429: slow") as whole:
            await http.send("GET", f"{url}/x", NO_CALL)
        with pytest.raises(errors.UpstreamRateLimited) as streamed:
            async with http.stream("GET", f"{url}/x", NO_CALL):
                pass
    assert whole.value.retry_after_seconds == streamed.value.retry_after_seconds == 3.0


async def test_a_body_closed_early_does_not_go_back_to_the_pool() -> None:
    endless = answering(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
    async with raw_server(endless) as (url, accepted), upstream() as http:
        for _ in range(2):
            async with http.stream("GET", f"{url}/s", NO_CALL) as body:
                assert await anext(body.chunks()) == b"hi"
    assert len(accepted) == 2  # the unfinished first answer's connection was not reused


async def test_what_is_sent_is_what_the_adapter_asked_for() -> None:
    seen: list[bytes] = []
    async with raw_server(answering(b"HTTP/1.1 204 No Content\r\n\r\n", seen)) as (url, _), upstream() as http:
        await http.send("POST", f"{url}/json", NO_CALL, json={"a": 1})
        await http.send("POST", f"{url}/raw", NO_CALL, content=b"raw bytes")
        # A signed URL's escapes stay as they are (SigV4 signed them); params join the query.
        await http.send("POST", f"{url}/model/a%3A0/x?k=1", NO_CALL, params={"api-version": "v 2"})
        await http.send(
            "POST",
            f"{url}/form",
            NO_CALL,
            data={"model": "m", "include[]": ["a", "b"]},
            files={"file": ("a.wav", b"RIFF", "audio/wav")},
        )
    names = [[line.split(b":")[0].lower() for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]] for head in seen]
    for headers in names:
        assert len(headers) == len(set(headers))  # nothing sent twice
        assert b"user-agent" in headers and b"accept-encoding" in headers
    assert b"content-type: application/json" in seen[0].lower()
    assert b"content-type" not in names[1]
    assert seen[1].endswith(b"\r\n\r\nraw bytes")
    assert seen[2].startswith(b"POST /model/a%3A0/x?k=1&api-version=v+2 HTTP/1.1")
    form = seen[3]
    assert b"content-type: multipart/form-data; boundary=" in form.lower()
    for part in (b'name="model"\r\n\r\nm\r\n', b'name="include[]"\r\n\r\na\r\n', b'name="include[]"\r\n\r\nb\r\n'):
        assert part in form
    assert b'name="file"; filename="a.wav"' in form and b"audio/wav" in form.lower() and b"\r\n\r\nRIFF\r\n" in form


async def test_what_arrived_before_a_dropped_connection_still_arrives() -> None:
    async def cut(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        # Two whole chunks and part of a third, then the connection drops: one write.
        writer.write(
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n8\r\ndata: 1\n\r\n8\r\ndata: 2\n\r\n8\r\nda"
        )
        await writer.drain()
        await asyncio.sleep(0.2)  # all of it is in the client's buffer before the drop

    received = b""
    async with raw_server(cut) as (url, _), upstream() as http, http.stream("POST", f"{url}/s", NO_CALL) as body:
        await asyncio.sleep(0.5)  # the drop is seen before the body is read
        with pytest.raises(errors.UpstreamUnavailable):
            async for chunk in body.chunks():
                received += chunk
    assert received.startswith(b"data: 1\ndata: 2\n")


async def test_the_pool_opens_on_first_use_and_closes_with_the_transport() -> None:
    transport = Transport()
    transport.upstream("p", credential_header=("x-api-key", ""))  # building opens nothing
    assert transport._pool is None
    async with raw_server(answering(OK_JSON)) as (url, _), transport:
        await transport.upstream("p", credential_header=("x-api-key", "")).send("GET", url, NO_CALL)
        pool = transport.pool
        assert not pool.closed
    assert pool.closed and transport._pool is None


def provider_view(transport: Transport) -> Upstream:
    return transport.upstream("p", credential_header=("authorization", "Bearer "), api_key="sk-configured")


async def test_a_request_on_a_connection_the_upstream_closed_is_sent_again_once() -> None:
    # The upstream answers one request per connection, then hangs up without saying so
    # (no `Connection: close`) when the next one arrives: the client's pooled connection
    # is stale, and the request goes again on a new one.
    async def one_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(OK_JSON)
        await writer.drain()
        await read_request(reader)  # then closed unanswered

    async with raw_server(one_per_connection) as (url, accepted), upstream() as http:
        for _ in range(3):
            assert await http.post_json(f"{url}/v1/chat", {"a": 1}, NO_CALL) == {"ok": True}
    assert len(accepted) == 3


async def test_gzip_and_deflate_answers_are_decoded() -> None:
    document = b'{"text":"' + b"compressible " * 200 + b'"}'
    wrapped = zlib.compressobj(wbits=zlib.MAX_WBITS)
    raw = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    bodies = {
        "gzip": gzip.compress(document),
        "deflate": wrapped.compress(document) + wrapped.flush(),
        "raw-deflate": raw.compress(document) + raw.flush(),
    }
    for name, body in bodies.items():
        encoding = "deflate" if name.endswith("deflate") else name
        reply = b"HTTP/1.1 200 OK\r\ncontent-encoding: %s\r\ncontent-length: %d\r\n\r\n%s" % (
            encoding.encode(),
            len(body),
            body,
        )
        async with raw_server(answering(reply)) as (url, _), upstream() as http:
            assert (await http.send("GET", f"{url}/x", NO_CALL)).content == document, name
            async with http.stream("GET", f"{url}/x", NO_CALL) as streamed:
                assert b"".join([chunk async for chunk in streamed.chunks()]) == document, name


async def test_an_answer_without_a_length_ends_when_the_upstream_closes() -> None:
    async def until_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b'{"ok":true}')
        await writer.drain()

    async with raw_server(until_close) as (url, accepted), upstream() as http:
        for _ in range(2):
            assert await http.post_json(f"{url}/x", {}, NO_CALL) == {"ok": True}
    assert len(accepted) == 2  # such a connection is never reused


async def test_at_most_max_connections_are_open_and_a_request_waits_for_one() -> None:
    release = asyncio.Event()

    async def held(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            await release.wait()
            writer.write(OK_JSON)
            await writer.drain()

    limits = UpstreamLimits(connect_s=0.2, pool_s=0.2, max_connections=2)
    async with raw_server(held) as (url, accepted), Transport(limits) as transport:
        http = provider_view(transport)
        calls = [asyncio.create_task(http.post_json(f"{url}/x", {}, NO_CALL)) for _ in range(2)]
        await asyncio.sleep(0.1)
        # Both connections busy: a third request waits for one, and gives up at the connect timeout.
        with pytest.raises(errors.UpstreamTimeout, match="p did not answer in time"):
            await http.post_json(f"{url}/x", {}, NO_CALL)
        waiting = asyncio.create_task(http.post_json(f"{url}/x", {}, NO_CALL))
        await asyncio.sleep(0.05)
        release.set()
        assert await asyncio.gather(*calls, waiting) == [{"ok": True}] * 3
    assert len(accepted) == 2  # the waiting request took a connection that came back


async def test_idle_connections_are_closed_after_the_keepalive() -> None:
    async with raw_server(answering(OK_JSON)) as (url, accepted), Transport(UpstreamLimits(keepalive_s=0.1)) as t:
        http = provider_view(t)
        await http.send("GET", f"{url}/x", NO_CALL)
        await http.send("GET", f"{url}/x", NO_CALL)
        await asyncio.sleep(0.3)
        await http.send("GET", f"{url}/x", NO_CALL)
    assert len(accepted) == 2


async def test_a_header_with_a_line_break_is_refused_before_anything_is_sent() -> None:
    async with raw_server(answering(OK_JSON)) as (url, accepted), upstream() as http:
        with pytest.raises(errors.UpstreamUnavailable, match="line break"):
            await http.send("GET", f"{url}/x", NO_CALL, headers={"x-note": "a\r\nx-injected: 1"})
    assert accepted == []


async def test_a_large_stream_read_slowly_arrives_whole() -> None:
    # More than the client buffers before it stops reading the socket (its backpressure).
    piece = b"x" * 65536

    async def large(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % (len(piece) * 64))
        for _ in range(64):
            writer.write(piece)
            await writer.drain()

    received = 0
    async with raw_server(large) as (url, _), upstream() as http, http.stream("GET", f"{url}/s", NO_CALL) as body:
        async for chunk in body.chunks():
            received += len(chunk)
            await asyncio.sleep(0.001)
    assert received == len(piece) * 64


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context with a certificate for 127.0.0.1, and a client context trusting it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_path, key_path)
    client = ssl.create_default_context(cafile=str(cert_path))
    return server, client


async def test_https_upstreams_are_verified_and_reused(tmp_path: Path) -> None:
    server_context, client_context = _self_signed(tmp_path)
    accepted: list[int] = []

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(1)
        await answering(OK_JSON)(reader, writer)
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.1", 0, ssl=server_context)
    url = f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    try:
        async with Transport(ssl_context=client_context) as trusting:
            for _ in range(2):
                assert await provider_view(trusting).post_json(f"{url}/v1/chat", {}, NO_CALL) == {"ok": True}
        async with Transport() as default:  # certifi's CAs: the self-signed certificate is refused
            with pytest.raises(errors.UpstreamUnavailable, match="p could not be reached"):
                await provider_view(default).post_json(f"{url}/v1/chat", {}, NO_CALL)
    finally:
        server.close()
    assert len(accepted) == 1  # the two calls shared one connection; the refused handshake never got one


def test_the_client_works_on_uvloop_as_serve_runs_it() -> None:
    # The suite's other tests run on asyncio's own loop; `aigne-hub serve` runs uvloop,
    # whose transports are not asyncio.Transport subclasses (a check of that type once
    # broke every upstream call under serve only).
    async def scenario() -> None:
        await test_answers_reuse_one_connection_and_send_the_body()
        await test_a_streamed_body_arrives_chunk_by_chunk()
        await test_a_request_on_a_connection_the_upstream_closed_is_sent_again_once()
        await test_a_silent_upstream_is_a_read_timeout()
        await test_what_arrived_before_a_dropped_connection_still_arrives()

    uvloop.run(scenario())
