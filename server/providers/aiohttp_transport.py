"""httpx's transport seam over aiohttp: the adapters keep httpx's API (requests,
responses, event hooks, one exception tree) while aiohttp's C-accelerated HTTP/1.1
parser and connection pool carry the bytes.

Why: with httpx's own transport (httpcore + anyio + h11) the upstream client took about
a third of the gateway's CPU per call, a tenth in httpcore's per-request "has this
pooled connection expired" check alone (a socket poll through anyio's typed
attributes). The `httpx-aiohttp` package does the same, but maps aiohttp's errors
loosely (a dropped connection becomes `ConnectTimeout`, so a gateway would report a
timeout for a refused connection); this module maps each one to the httpx error the
gateway's classification expects (server.providers.transport.transport_error):
timeouts to `httpx.TimeoutException`s, everything else to other `httpx.TransportError`s.

Kept from httpx's transport: pooled keep-alive connections (limit and keep-alive
expiry from `httpx.Limits`), the per-request timeouts httpx passes (connect = the
pool wait plus the TCP connect, read = the longest wait between two reads), bodies
relayed chunk by chunk as they arrive, no cookies, no redirects, no decompression
here (httpx decodes), and cancellation: a cancelled request or a response closed
before its end closes its connection rather than returning it to the pool.
"""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager

import aiohttp
import httpx
import yarl

# aiohttp's error -> the httpx error of the same meaning, most specific first.
_ERRORS: tuple[tuple[type[BaseException], type[httpx.TransportError]], ...] = (
    (aiohttp.ConnectionTimeoutError, httpx.ConnectTimeout),
    (aiohttp.SocketTimeoutError, httpx.ReadTimeout),
    (aiohttp.ServerTimeoutError, httpx.ReadTimeout),
    (TimeoutError, httpx.ReadTimeout),
    (aiohttp.ClientConnectorError, httpx.ConnectError),
    (aiohttp.ClientPayloadError, httpx.ReadError),
    (aiohttp.ServerDisconnectedError, httpx.RemoteProtocolError),
    (aiohttp.ClientResponseError, httpx.RemoteProtocolError),
    (aiohttp.InvalidURL, httpx.UnsupportedProtocol),
    (aiohttp.ClientOSError, httpx.NetworkError),
    (aiohttp.ClientError, httpx.TransportError),
)


_NO_CONTENT_TYPE = ("Content-Type",)


@contextmanager
def _as_httpx_errors() -> Iterator[None]:
    try:
        yield
    except (TimeoutError, aiohttp.ClientError) as exc:
        for aiohttp_error, httpx_error in _ERRORS:
            if isinstance(exc, aiohttp_error):
                raise httpx_error(str(exc) or type(exc).__name__) from exc
        raise  # pragma: no cover - aiohttp.ClientError is the last entry


class _Body(httpx.AsyncByteStream):
    """The response body as aiohttp receives it: each chunk as soon as it arrives."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        with _as_httpx_errors():
            while True:
                try:
                    chunk = await content.readany()
                except aiohttp.ClientPayloadError:
                    # The upstream dropped the connection: what arrived before it still
                    # reaches the client (a stream's last chunks), then the error.
                    received = _received_before_the_error(content)
                    if received:
                        yield received
                    raise
                if not chunk:
                    return
                yield chunk

    async def aclose(self) -> None:
        # Back to the pool when read to the end; closed (not reused) otherwise.
        self._response.release()


def _received_before_the_error(content: aiohttp.StreamReader) -> bytes:
    """The bytes aiohttp had received when the body failed: its reads raise the error
    first and would drop them (aiohttp 3.14), so it is set aside for one read."""
    error = content.exception()
    setattr(content, "_exception", None)  # noqa: B010 - a private attribute, on purpose
    try:
        return content.read_nowait(-1)
    except Exception:  # noqa: BLE001 - another aiohttp version: nothing more to hand over
        return b""
    finally:
        setattr(content, "_exception", error)  # noqa: B010


class AiohttpTransport(httpx.AsyncBaseTransport):
    """One pooled aiohttp session behind httpx (created on first use, in the loop)."""

    def __init__(self, limits: httpx.Limits, ssl_context: ssl.SSLContext | None = None) -> None:
        self._limits = limits
        self._ssl = ssl_context if ssl_context is not None else httpx.create_ssl_context(trust_env=False)
        self._session: aiohttp.ClientSession | None = None
        # ClientTimeout per distinct httpx timeout (one or two in practice).
        self._timeouts: dict[tuple[float | None, ...], aiohttp.ClientTimeout] = {}

    def _open_session(self) -> aiohttp.ClientSession:
        connector = aiohttp.TCPConnector(
            limit=self._limits.max_connections or 0,
            keepalive_timeout=self._limits.keepalive_expiry or 0,
            ssl=self._ssl,
        )
        return aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            auto_decompress=False,
            trust_env=False,
            timeout=aiohttp.ClientTimeout(total=None),
        )

    def _timeout(self, timeouts: dict[str, float | None]) -> aiohttp.ClientTimeout:
        connect, read, pool = timeouts.get("connect"), timeouts.get("read"), timeouts.get("pool")
        key = (connect, read, pool)
        timeout = self._timeouts.get(key)
        if timeout is None:
            # aiohttp's `connect` covers the wait for a pooled connection and the connect.
            waited = None if connect is None and pool is None else (connect or 0.0) + (pool or 0.0)
            timeout = aiohttp.ClientTimeout(total=None, connect=waited, sock_connect=connect, sock_read=read)
            self._timeouts[key] = timeout
        return timeout

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._open_session()
        try:
            body: bytes | None = request.content
        except httpx.RequestNotRead:  # a streamed body (multipart uploads): read it first
            body = await request.aread()
        with _as_httpx_errors():
            response = await self._session.request(
                request.method,
                # As httpx encoded it: re-quoting would break signed URLs (SigV4).
                yarl.URL(str(request.url), encoded=True),
                headers=request.headers.multi_items(),
                data=body or None,
                allow_redirects=False,
                compress=None,
                timeout=self._timeout(request.extensions.get("timeout", {})),
                # httpx set the defaults (User-Agent, Accept...); aiohttp adds only what
                # is missing, and would label an unlabelled body application/octet-stream.
                skip_auto_headers=_NO_CONTENT_TYPE if body and "content-type" not in request.headers else None,
            )
        return httpx.Response(
            status_code=response.status,
            headers=response.raw_headers,
            stream=_Body(response),
            request=request,
            extensions={"http_version": b"HTTP/1.1", "reason_phrase": (response.reason or "").encode()},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
