"""A minimal HTTP/1.1 server on asyncio streams, just enough for test fakes.

It supports keep-alive, request bodies with Content-Length or chunked transfer
encoding, `Expect: 100-continue`, and responses with a Content-Length body or a
chunked body produced by an async iterator (one HTTP chunk per item, flushed at
once, so SSE events reach the client one by one).

It also notices when the client goes away while a response is being prepared or
streamed, and counts it: tests use that to check that a gateway cancels its
upstream call when its own caller disconnects or a deadline expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from email.message import Message
from http import HTTPStatus
from typing import Any, TypeVar
from urllib.parse import urlsplit

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

# Request heads beyond this size are refused (StreamReader's own limit).
_MAX_HEAD_BYTES = 64 * 1024


@dataclass
class Request:
    """A parsed HTTP request; header names are lower-cased."""

    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


@dataclass
class Response:
    """An HTTP response: a whole `body`, or a chunked `stream` when it is set."""

    status: int = 200
    body: bytes = b""
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)
    stream: AsyncGenerator[bytes, None] | None = None


class AbortConnection(Exception):
    """Raised by a response stream to drop the connection mid-body, as a crash would."""


class _PeerGone(Exception):
    """The client closed its side of the connection before the response was done."""


class _BadRequest(Exception):
    """The request could not be parsed; the connection is answered 400 and closed."""


Handler = Callable[[Request], Awaitable[Response]]


class HttpServer:
    """Serves `handler` on host:port (port 0 picks a free one) until `stop()`."""

    def __init__(self, handler: Handler, host: str = "127.0.0.1", port: int = 0) -> None:
        self._handler = handler
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}
        self.reset_counters()

    def reset_counters(self) -> None:
        self.connections = 0  # TCP connections accepted
        self.cancelled_requests = 0  # client left before the response head was sent
        self.cancelled_streams = 0  # client left while a chunked body was streaming
        self.completed_streams = 0  # chunked bodies sent to the end

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve_connection, self.host, self.port, limit=_MAX_HEAD_BYTES)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        # Python 3.11's wait_closed() neither closes nor waits for open connections.
        # Closing their sockets (rather than cancelling their tasks, which 3.11's
        # asyncio logs as an error) lets each task see EOF and finish by itself.
        tasks = list(self._connections)
        for writer in self._connections.values():
            writer.transport.abort()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await self._server.wait_closed()
        self._server = None

    async def _serve_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        self.connections += 1
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client closed mid-request: nothing to answer
        except _BadRequest as exc:
            await _write_simple(writer, 400, str(exc).encode())
        except AbortConnection:
            writer.transport.abort()
        finally:
            self._connections.pop(task, None)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        """Answers one request; returns whether the connection may be reused."""
        request = await _read_request(reader, writer)
        if request is None:
            return False
        # Clients do not pipeline, so the next thing the peer can send while we answer
        # is EOF: a pending read tells us at once when it hangs up.
        peer_gone = asyncio.ensure_future(reader.read(1))
        try:
            return await self._respond(request, writer, peer_gone)
        finally:
            # The read must be over before the next request is read from this reader.
            peer_gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await peer_gone

    async def _respond(self, request: Request, writer: asyncio.StreamWriter, peer_gone: asyncio.Future[bytes]) -> bool:
        try:
            response = await _unless_peer_gone(self._handler(request), peer_gone)
        except _PeerGone:
            self.cancelled_requests += 1
            return False
        keep_alive = request.headers.get("connection", "").lower() != "close"
        headers = {**response.headers, "connection": "keep-alive" if keep_alive else "close"}
        if response.stream is None:
            writer.write(_head(response.status, response.content_type, headers, response.body))
            writer.write(response.body)
            await writer.drain()
            return keep_alive and not peer_gone.done()
        try:
            await self._send_stream(writer, response, headers, peer_gone)
        except (_PeerGone, ConnectionError):
            self.cancelled_streams += 1
            return False
        self.completed_streams += 1
        return keep_alive and not peer_gone.done()

    async def _send_stream(
        self,
        writer: asyncio.StreamWriter,
        response: Response,
        headers: dict[str, str],
        peer_gone: asyncio.Future[bytes],
    ) -> None:
        assert response.stream is not None
        headers["transfer-encoding"] = "chunked"
        writer.write(_head(response.status, response.content_type, headers, None))
        stream = response.stream
        try:
            while True:
                try:
                    data = await _unless_peer_gone(anext(stream), peer_gone)
                except StopAsyncIteration:
                    break
                if data:  # an empty chunk would end the body
                    writer.write(b"%x\r\n%b\r\n" % (len(data), data))
                    await _unless_peer_gone(writer.drain(), peer_gone)
        finally:
            await stream.aclose()
        writer.write(b"0\r\n\r\n")
        await writer.drain()


async def _unless_peer_gone(work: Awaitable[_T], peer_gone: asyncio.Future[bytes]) -> _T:
    """Awaits `work`, but cancels it and raises _PeerGone if the client hangs up first."""
    task = asyncio.ensure_future(work)
    waiting: set[asyncio.Future[Any]] = {task, peer_gone}
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        return task.result()
    task.cancel()
    # Whatever the abandoned work ends with no longer matters: nobody is listening.
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await task
    raise _PeerGone


async def _read_request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Request | None:
    """Reads one request, or returns None when the client closed an idle connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("truncated request head") from exc
        return None
    except asyncio.LimitOverrunError as exc:
        raise _BadRequest("request head too large") from exc
    method, target, headers = _parse_head(head)
    if headers.get("expect", "").lower() == "100-continue":
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = await _read_body(reader, headers)
    url = urlsplit(target)
    return Request(method, url.path, url.query, headers, body)


def _parse_head(head: bytes) -> tuple[str, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line: {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return parts[0], parts[1], headers


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader)
    length = headers.get("content-length", "0")
    if not length.isdigit():
        raise _BadRequest(f"bad content-length: {length!r}")
    return await reader.readexactly(int(length))


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";")[0], 16)
        except ValueError as exc:
            raise _BadRequest(f"bad chunk size: {size_line!r}") from exc
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # skip trailers
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)  # the CRLF after the chunk data


def _head(status: int, content_type: str, headers: dict[str, str], body: bytes | None) -> bytes:
    # Providers use statuses the standard library has no name for (Anthropic's 529).
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Unknown"
    lines = [f"HTTP/1.1 {status} {phrase}", f"content-type: {content_type}"]
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _write_simple(writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
    with contextlib.suppress(ConnectionError):
        writer.write(_head(status, "text/plain", {"connection": "close"}, body) + body)
        await writer.drain()


@dataclass
class UploadedFile:
    """A file part of a multipart/form-data body."""

    filename: str
    content_type: str
    data: bytes


def header_param(value: str, param: str) -> str | None:
    """Returns a parameter of a header value, e.g. the boundary of a Content-Type."""
    message = Message()
    message["x"] = value
    found = message.get_param(param, header="x")
    return found if isinstance(found, str) else None


def parse_multipart(body: bytes, content_type: str) -> tuple[list[tuple[str, str]], dict[str, UploadedFile]]:
    """Splits a multipart/form-data body into its text fields and its files."""
    boundary = header_param(content_type, "boundary")
    if not boundary:
        raise ValueError("multipart body without a boundary")
    fields: list[tuple[str, str]] = []
    files: dict[str, UploadedFile] = {}
    for part in body.split(b"--" + boundary.encode())[1:]:
        if part.startswith(b"--"):
            break  # the closing delimiter
        raw_head, _, data = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        data = data.removesuffix(b"\r\n")
        head = _parse_part_head(raw_head)
        disposition = head.get("content-disposition", "")
        name = header_param(disposition, "name") or ""
        filename = header_param(disposition, "filename")
        if filename is None:
            fields.append((name, data.decode()))
        else:
            content = head.get("content-type", "application/octet-stream")
            files[name] = UploadedFile(filename, content, data)
    return fields, files


def _parse_part_head(raw: bytes) -> dict[str, str]:
    headers: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers
