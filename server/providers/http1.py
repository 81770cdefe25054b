"""The upstream transport's HTTP/1.1 client: pooled keep-alive connections on asyncio
protocols, each answer parsed by httptools (llhttp, Node.js's parser, in C).

Why not aiohttp's ClientSession, which this replaced: a chat call's upstream request
cost the gateway more CPU in aiohttp's Python (request and response objects, header
multidicts, timers, payload writers, tracing hooks) than everything else the call does
outside gRPC. Here a request is one write of its head and body, and an answer is the
parser's callbacks filling one `Response`: about a fifth of aiohttp's CPU per request,
measured side by side on the same fake upstream (the README's benchmark notes).

What it does (server.providers.transport decides what to send and reads the answers):
  - one pool per process: at most `max_connections` open connections in all (a request
    waits for a free one within the connect timeout), idle ones reused newest first per
    origin and closed after `keepalive_s` unused;
  - a connection goes back to the pool only when its answer was read to the end and
    the upstream keeps it alive; an answer closed early hangs up (which is how a
    client's cancellation stops the upstream's work);
  - a request sent on a reused connection that the upstream had closed meanwhile (no
    byte of answer) is sent again once, on a new connection;
  - timeouts: connect (the wait for a free connection included), read (the longest wait
    between two reads), and a deadline (an event-loop time) that bounds every wait;
    each is a `TimeoutError`; any other failure to get a complete answer is an
    `HttpError`;
  - gzip and deflate answers are decoded; https uses the given SSL context.
Not supported, as the transport never asks for them: redirects, proxies, cookies,
HTTP/2, `Expect: 100-continue`, request bodies streamed from a generator.
"""

from __future__ import annotations

import asyncio
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httptools
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

# Buffered answer bytes past which a stream stops reading from the socket until its
# reader catches up (the upstream then waits: its backpressure).
PAUSE_AT_BYTES = 256 * 1024


class HttpError(Exception):
    """No complete HTTP answer: the connection failed, dropped, or spoke no HTTP."""


class ConnectFailed(HttpError):
    """The connection could not be opened (refused, unreachable, DNS, TLS)."""


class Disconnected(HttpError):
    """The connection closed before the answer was complete."""


class BadAnswer(HttpError):
    """The upstream's bytes are not an HTTP/1.1 answer."""


class ConnectTimeout(TimeoutError):
    """No connection (a free one from the pool, or a new one) within the connect timeout."""


class ReadTimeout(TimeoutError):
    """The upstream sent nothing for longer than the read timeout, or the deadline passed."""


@dataclass(frozen=True, slots=True)
class Timeouts:
    """The waits of one request: `connect_s` for a connection (pool wait included),
    `read_s` between two reads, and `deadline` (loop time, or None) over all of them."""

    connect_s: float
    read_s: float
    deadline: float | None = None


@dataclass(frozen=True, slots=True)
class _Origin:
    scheme: str
    host: str
    port: int


class Response:
    """An answer whose head has arrived; its body is read with `read` or `chunks`, and
    `close` ends it (back to the pool when read to its end, else hung up)."""

    def __init__(self, connection: _Connection, status: int, headers: CIMultiDictProxy[str]) -> None:
        self.status = status
        self.headers = headers
        self._connection = connection

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived (and any error is known)."""
        return self._connection.body_complete

    async def read(self) -> bytes:
        """The whole body."""
        connection = self._connection
        parts: list[bytes] = []
        while True:
            part = await connection.next_body_part()
            if not part:
                return b"".join(parts)
            parts.append(part)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: every byte received so far at each step; what arrived
        before a dropped connection, then the error."""
        connection = self._connection
        while part := await connection.next_body_part():
            yield part

    def close(self) -> None:
        self._connection.finish()


class _Connection(asyncio.Protocol):
    """One upstream connection and the answer being read on it."""

    def __init__(self, pool: Http1Pool, origin: _Origin) -> None:
        self._pool = pool
        self.origin = origin
        self._loop = pool.loop
        self._transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self.reused = False
        self._parser = httptools.HttpResponseParser(self)
        self._start_answer()

    # -- the request ---------------------------------------------------------------

    def _start_answer(self) -> None:
        self._header_names: list[bytes] = []
        self._header_values: list[bytes] = []
        self._head: asyncio.Future[Response] | None = None
        self._response: Response | None = None
        self._body: deque[bytes] = deque()
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.body_complete = False
        self._error: BaseException | None = None
        self._received_any = False
        self._until_close = False
        self._decoder: _Decoder | None = None
        self._paused = False
        self._keep_alive = False
        self._timeouts = Timeouts(0.0, 0.0)
        self._last_read = 0.0

    def send(self, request: bytes, timeouts: Timeouts) -> asyncio.Future[Response]:
        """Writes the request; the future is its answer's head."""
        assert self._transport is not None
        self._start_answer()
        self._timeouts = timeouts
        self._last_read = self._loop.time()
        self._head = self._loop.create_future()
        self._transport.write(request)
        return self._head

    # -- asyncio.Protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports implement asyncio.Transport without subclassing it.)
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        if self._head is None:  # bytes on an idle connection: no answer of ours, no reuse
            self.close()
            return
        self._received_any = True
        self._last_read = self._loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(BadAnswer("the upstream switched protocols"))
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"the upstream's answer is not valid HTTP/1.1 ({exc})"))

    def eof_received(self) -> bool:
        self.closed = True  # never handed out again, even before connection_lost
        self._ended(None)
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._ended(exc)
        self._pool.forget(self)

    def _ended(self, exc: Exception | None) -> None:
        """The upstream closed the connection: the end of an answer read until close,
        else its failure (if one was being read)."""
        if self._head is None or self.body_complete:
            return  # idle, or its answer was complete: nothing waits
        if self._until_close and self._response is not None and self._error is None:
            self._complete()
            return
        if self._response is None and not self._received_any and self.reused:
            error: BaseException = _StaleConnection()
        else:
            detail = f": {exc}" if exc else ""
            error = Disconnected(f"the upstream closed the connection before the answer was complete{detail}")
        self._fail(error)

    # -- httptools callbacks ---------------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_names.append(name)
        self._header_values.append(value)

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if 100 <= status < 200:  # an informational answer: the real one follows
            self._header_names, self._header_values = [], []
            return
        headers: CIMultiDict[str] = CIMultiDict(
            (name.decode("latin-1"), value.decode("latin-1"))
            for name, value in zip(self._header_names, self._header_values, strict=True)
        )
        framed = "content-length" in headers or "chunked" in headers.get("transfer-encoding", "").lower()
        self._until_close = not framed and status not in (204, 304)
        encoding = headers.get("content-encoding", "").strip().lower()
        if encoding in ("gzip", "x-gzip"):
            self._decoder = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif encoding == "deflate":
            self._decoder = _DeflateDecoder()
        self._response = Response(self, status, CIMultiDictProxy(headers))
        if self._head is not None and not self._head.done():
            self._head.set_result(self._response)

    def on_body(self, body: bytes) -> None:
        if self._decoder is not None:
            try:
                body = self._decoder.decompress(body)
            except zlib.error as exc:
                self._fail(BadAnswer(f"the upstream's compressed answer does not decode ({exc})"))
                return
            if not body:
                return
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > PAUSE_AT_BYTES and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self._response is None:
            return  # the end of an informational answer
        # (Asked here: once this callback returns, the parser has moved to the next message.)
        self._keep_alive = self._parser.should_keep_alive()
        if self._decoder is not None:
            rest = self._decoder.flush()
            if rest:
                self._body.append(rest)
        self._complete()

    # -- reading the answer ----------------------------------------------------------

    def _complete(self) -> None:
        self.body_complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None and not self.body_complete:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
        self._wake()
        if self._transport is not None:
            self._transport.close()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def head(self, future: asyncio.Future[Response]) -> Response:
        """The answer's head, within the read timeout and the deadline."""
        timer = self._timer(future)
        try:
            return await future
        finally:
            timer.cancel()

    async def next_body_part(self) -> bytes:
        """Every body byte received and not yet taken (waits for some); b"" at the end;
        raises what cut the answer once the bytes before it are taken."""
        while not self._body:
            if self._error is not None:
                raise self._error
            if self.body_complete:
                return b""
            self._waiter = self._loop.create_future()
            timer = self._timer(self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
        part = self._body.popleft() if len(self._body) == 1 else b"".join(self._drain())
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return part

    def _drain(self) -> Iterable[bytes]:
        while self._body:
            yield self._body.popleft()

    def _timer(self, future: asyncio.Future[Any]) -> asyncio.TimerHandle:
        """Fails `future` once nothing was read for the read timeout, or at the deadline."""
        return self._loop.call_at(self._timer_due(), self._check_timer, future)

    def _timer_due(self) -> float:
        due = self._last_read + self._timeouts.read_s
        deadline = self._timeouts.deadline
        return due if deadline is None else min(due, deadline)

    def _check_timer(self, future: asyncio.Future[Any]) -> None:
        if future.done():
            return
        now = self._loop.time()
        deadline = self._timeouts.deadline
        if deadline is not None and now >= deadline:
            error = ReadTimeout("the call's deadline passed while the upstream was answering")
        elif now >= self._last_read + self._timeouts.read_s:
            error = ReadTimeout(f"nothing read for {self._timeouts.read_s:g} s")
        else:  # data arrived meanwhile: wait from the last read
            timer = self._loop.call_at(self._timer_due(), self._check_timer, future)
            future.add_done_callback(lambda _: timer.cancel())
            return
        self._fail(error)
        if not future.done():
            future.set_exception(error)

    def finish(self) -> None:
        """The answer is done with: the connection goes back to the pool if the answer
        was read to its end and the upstream keeps it alive; else it is closed."""
        reusable = (
            self.body_complete
            and self._error is None
            and not self._body
            and not self._until_close
            and not self.closed
            and self._keep_alive
        )
        self._head = None
        if reusable:
            self._pool.release(self)
        else:
            self.close()

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
        if not self.closed:
            self.closed = True
            self._pool.forget(self)


class _StaleConnection(Disconnected):
    """A reused connection the upstream had closed: the request is sent again."""

    def __init__(self) -> None:
        super().__init__("the upstream closed an idle connection as the request was sent")


class _Decoder(Protocol):
    def decompress(self, data: bytes) -> bytes: ...

    def flush(self) -> bytes: ...


class _DeflateDecoder:
    """`Content-Encoding: deflate`: zlib-wrapped as the spec says, or raw as some send."""

    def __init__(self) -> None:
        self._inner: _Decoder | None = None

    def decompress(self, data: bytes) -> bytes:
        if self._inner is None:
            wrapped = len(data) >= 2 and (data[0] & 0x0F) == 8 and ((data[0] << 8) | data[1]) % 31 == 0
            self._inner = zlib.decompressobj(zlib.MAX_WBITS if wrapped else -zlib.MAX_WBITS)
        return self._inner.decompress(data)

    def flush(self) -> bytes:
        return self._inner.flush() if self._inner is not None else b""


class Http1Pool:
    """The process's upstream connections (see the module docstring)."""

    def __init__(self, *, max_connections: int, keepalive_s: float, ssl_context: ssl.SSLContext) -> None:
        self.loop = asyncio.get_running_loop()
        self._max = max_connections
        self._keepalive_s = keepalive_s
        self._ssl = ssl_context
        self._idle: dict[_Origin, list[_Connection]] = {}
        self._open: set[_Connection] = set()
        self._waiting: deque[asyncio.Future[None]] = deque()
        self.closed = False

    async def request(
        self, method: str, url: URL, headers: list[tuple[str, str]], body: bytes | None, timeouts: Timeouts
    ) -> Response:
        """Sends the request and returns its answer's head (its body still to read)."""
        origin = _origin(url)
        payload = _request_bytes(method, url, headers, body)
        for _ in range(2):
            connection = await self._connection(origin, timeouts)
            try:
                return await connection.head(connection.send(payload, timeouts))
            except _StaleConnection:
                connection.close()
                continue  # sent again once, on a new connection
            except BaseException:
                connection.close()
                raise
        raise Disconnected("the upstream closed two connections in a row as the request was sent")

    async def _connection(self, origin: _Origin, timeouts: Timeouts) -> _Connection:
        """An idle connection to `origin`, or a new one (within the connect timeout)."""
        if self.closed:
            raise HttpError("the upstream transport is closed")
        connection = self._idle_connection(origin)
        if connection is not None:
            return connection
        limit = timeouts.connect_s
        if timeouts.deadline is not None:
            limit = min(limit, max(timeouts.deadline - self.loop.time(), 0.0))
        try:
            async with asyncio.timeout(limit):
                return await self._connection_when_free(origin)
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {origin.host}:{origin.port} within {limit:g} s") from None

    def _idle_connection(self, origin: _Origin) -> _Connection | None:
        """The newest idle connection to `origin` still alive and within its keep-alive."""
        idle = self._idle.get(origin)
        now = self.loop.time()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < self._keepalive_s:
                connection.reused = True
                return connection
            connection.close()
        return None

    async def _connection_when_free(self, origin: _Origin) -> _Connection:
        """A connection once one is free: an idle one to `origin`, or a new one while
        fewer than `max_connections` are open (an idle one to another origin is closed to
        make room); else waits for a connection to come back or close."""
        while True:
            connection = self._idle_connection(origin)
            if connection is not None:
                return connection
            if len(self._open) < self._max:
                return await self._connect(origin)
            other = next((conns[0] for conns in self._idle.values() if conns), None)
            if other is not None:
                other.close()  # the oldest idle connection of some other origin
                continue
            waiter = self.loop.create_future()
            self._waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self._waiting:
                    self._waiting.remove(waiter)

    def _wake_one(self) -> None:
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _connect(self, origin: _Origin) -> _Connection:
        connection = _Connection(self, origin)
        self._open.add(connection)
        tls = origin.scheme == "https"
        try:
            await self.loop.create_connection(
                lambda: connection,
                origin.host,
                origin.port,
                ssl=self._ssl if tls else None,
                server_hostname=origin.host if tls else None,
            )
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is one)
            self.forget(connection)
            raise ConnectFailed(f"cannot connect to {origin.host}:{origin.port} ({exc})") from exc
        except BaseException:
            self.forget(connection)
            raise
        return connection

    def release(self, connection: _Connection) -> None:
        """A connection whose answer was read to its end: idle, reusable."""
        if self.closed:
            connection.close()
            return
        connection.idle_since = self.loop.time()
        self._idle.setdefault(connection.origin, []).append(connection)
        self._wake_one()

    def forget(self, connection: _Connection) -> None:
        """A closed connection: no longer counted, nor idle."""
        if connection in self._open:
            self._open.discard(connection)
            idle = self._idle.get(connection.origin)
            if idle and connection in idle:
                idle.remove(connection)
            self._wake_one()

    async def aclose(self) -> None:
        self.closed = True
        for connection in list(self._open):
            connection.close()
        await asyncio.sleep(0)  # lets the transports run their close


def _origin(url: URL) -> _Origin:
    scheme = url.scheme
    if scheme not in ("http", "https") or not url.raw_host:
        raise HttpError(f"not an http(s) URL: {str(url)[:200]}")
    return _Origin(scheme, url.raw_host, url.port or (443 if scheme == "https" else 80))


def _request_bytes(method: str, url: URL, headers: list[tuple[str, str]], body: bytes | None) -> bytes:
    """The request's head and body, as one write."""
    lines = [f"{method} {url.raw_path_qs or '/'} HTTP/1.1", f"Host: {url.host_port_subcomponent}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    fields = "".join(lines)  # one scan for all of them; the culprit is looked for only if needed
    if "\r" in fields or "\n" in fields or "\0" in fields:
        bad = next((name for name, value in headers if _UNSAFE.intersection(name + value)), "?")
        raise HttpError(f"the request header {bad!r} contains a line break or NUL")
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head + body if body else head


_UNSAFE = frozenset("\r\n\0")
