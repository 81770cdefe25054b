"""The upstream client's aiohttp transport against raw loopback servers: each way an
upstream can fail reaches the adapters as the httpx error that
server.providers.transport classifies (timeout vs unreachable), bodies arrive chunk
by chunk, connections are reused, and a body closed early does not go back to the pool."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import httpx
import pytest

from server.app import upstream_client
from server.config import Settings
from server.providers.transport import transport_error

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


def client(read_timeout_s: float = 5.0) -> httpx.AsyncClient:
    return upstream_client(Settings(upstream_read_timeout_s=read_timeout_s, upstream_connect_timeout_s=2.0))


async def test_answers_reuse_one_connection_and_send_the_body() -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b'HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 11\r\n\r\n{"ok":true}')
            await writer.drain()

    async with raw_server(answer) as (url, accepted), client() as http:
        for _ in range(3):
            response = await http.post(f"{url}/v1/chat", json={"a": 1}, headers={"authorization": "Bearer sk-x"})
            assert response.status_code == 200
            assert response.json() == {"ok": True}
    assert len(accepted) == 1
    assert b"authorization: Bearer sk-x" in seen[0]
    assert seen[0].endswith(b'{"a":1}')


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

    async with raw_server(stream) as (url, _), client() as http, http.stream("POST", f"{url}/s") as response:
        chunks = response.aiter_bytes()
        assert await asyncio.wait_for(anext(chunks), 5) == b"data: 1\n"  # before the rest was sent
        release.set()
        assert [chunk async for chunk in chunks] == [b"data: 2\n"]


async def test_a_refused_connection_is_unreachable_not_a_timeout() -> None:
    async with raw_server(lambda r, w: asyncio.sleep(0)) as (url, _):
        pass  # closed: nothing listens on the port any more
    async with client() as http:
        with pytest.raises(httpx.ConnectError) as caught:
            await http.get(f"{url}/x")
    assert not isinstance(caught.value, httpx.TimeoutException)
    assert "could not be reached" in transport_error("p", caught.value).message


async def test_a_silent_upstream_is_a_read_timeout() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async with raw_server(silent) as (url, _), client(read_timeout_s=0.3) as http:
        with pytest.raises(httpx.ReadTimeout):
            await http.get(f"{url}/x")


@pytest.mark.parametrize(
    ("reply", "error"),
    [
        (b"", httpx.RemoteProtocolError),  # closed before any answer
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{", httpx.ReadError),  # closed mid-body
        (b"not http at all\r\n\r\n", httpx.RemoteProtocolError),
    ],
)
async def test_a_broken_answer_is_a_transport_error(reply: bytes, error: type[httpx.TransportError]) -> None:
    async def broken(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()

    async with raw_server(broken) as (url, _), client() as http:
        with pytest.raises(error) as caught:
            await http.get(f"{url}/x")
    assert "could not be reached" in transport_error("p", caught.value).message


async def test_a_body_closed_early_does_not_go_back_to_the_pool() -> None:
    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n")
            await writer.drain()

    async with raw_server(endless) as (url, accepted), client() as http:
        for _ in range(2):
            async with http.stream("GET", f"{url}/s") as response:
                assert await anext(response.aiter_bytes()) == b"hi"
    assert len(accepted) == 2  # the unfinished first answer's connection was not reused


async def test_headers_are_httpx_s_and_an_unlabelled_body_stays_unlabelled() -> None:
    seen: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                return
            writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            await writer.drain()

    async with raw_server(answer) as (url, _), client() as http:
        await http.post(f"{url}/json", json={"a": 1})
        await http.post(f"{url}/raw", content=b"raw bytes")
    names = [[line.split(b":")[0].lower() for line in head.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]] for head in seen]
    for headers in names:
        assert len(headers) == len(set(headers))  # nothing sent twice
        assert b"user-agent" in headers and b"accept-encoding" in headers
    assert b"content-type: application/json" in seen[0]
    assert b"content-type" not in names[1]
    assert seen[1].endswith(b"\r\n\r\nraw bytes")


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
    async with raw_server(cut) as (url, _), client() as http, http.stream("POST", f"{url}/s") as response:
        await asyncio.sleep(0.5)  # the drop is seen before the body is read
        with pytest.raises(httpx.ReadError):
            async for chunk in response.aiter_bytes():
                received += chunk
    assert received.startswith(b"data: 1\ndata: 2\n")
