"""The one upstream transport: every adapter's HTTP request goes through here.

What it does, once for all providers:
  - send a request and read the whole answer (`Upstream.send`, `Upstream.post_json`),
    or open a stream (`Upstream.stream`) read as server-sent events, NDJSON lines or
    raw bytes, and closed on exit, which is how a client's cancellation reaches the
    upstream at once;
  - put the call's credential in the provider's credential header (over the key the
    provider was configured with), the call's request id in `x-request-id` and its
    trace context in the W3C headers (`server.calls.Call`);
  - parse JSON answers (an object, else UPSTREAM_MALFORMED_RESPONSE);
  - classify failures into the error tree: no answer (connect error, reset, read
    timeout: `transport_error`), or an answer with an error status, read by the
    provider's `ErrorReader` (the translator's knowledge of its error bodies) and
    mapped by status where the provider says nothing more specific
    (`upstream_status_error`).
Timeouts: connect (the wait for a pooled connection plus the TCP/TLS connect) and read
(the longest wait between two reads), from `UpstreamLimits` (the settings'), and never
past the call's deadline (`Call.deadline` bounds the whole request, its body included);
the call's attempt, first-token, idle and total bounds are the routing's
(`server.routing`), above.

The HTTP client underneath is one connection pool per process
(`server.providers.http1`: HTTP/1.1 on asyncio protocols, parsed by httptools), owned
by the `Transport` the application makes (`server.app`), opened on the first request
(in the event loop) and closed on shutdown. Why not aiohttp's client (before it,
httpx): their request and response objects cost a chat call more CPU than the rest of
its work outside gRPC; forms (multipart uploads) are still encoded by aiohttp's
multipart writer, loaded only when one is sent. Adapters see only `Upstream`, `Answer`
and `StreamBody`, whose headers are a case-insensitive `Mapping[str, str]`. Kept from
the clients it replaced: no cookies, no redirects, no proxies from the environment,
certifi's CA bundle, gzip and deflate answers decoded, a body without a content type
sent without one, a connection whose answer was not read to its end closed rather than
reused; requests say `User-Agent: aigne-hub`.

Only a 401 says the credential itself is bad (`UpstreamCredentialRejected`: the gateway
confirms with a probe and may take a stored credential out of rotation); a 403 is a
refused permission, often for one model, and leaves the credential alone. Upstream text
is redacted of anything key-shaped when the `UpstreamError` is built.
"""

from __future__ import annotations

import json
import re
import ssl
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from functools import lru_cache
from time import time
from types import TracebackType
from typing import Any

import certifi
import orjson
from yarl import URL

from server import errors
from server.calls import Call
from server.providers.base import JSON
from server.providers.http1 import Http1Pool, HttpError, Response, Timeouts
from server.redaction import register_secret

# Response headers: case-insensitive (aiohttp's CIMultiDictProxy, or any equivalent).
Headers = Mapping[str, str]
# How a provider's failed answer becomes the gateway's error: (status, headers, body).
ErrorReader = Callable[[int, Headers, bytes], errors.UpstreamError]
REQUEST_ID_HEADER = "x-request-id"
_MAX_MESSAGE_CHARS = 500
# What "no (complete) answer" raises: aiohttp's errors, and its timeouts (TimeoutError).
_NO_ANSWER = (HttpError, TimeoutError)
# Sent with every request unless the adapter sets its own.
_DEFAULT_HEADERS = (("User-Agent", "aigne-hub"), ("Accept", "*/*"), ("Accept-Encoding", "gzip, deflate"))
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """The pool and the waits of the upstream client (the settings' `upstream_*`)."""

    connect_s: float = 10.0
    read_s: float = 600.0
    pool_s: float = 10.0
    max_connections: int = 1000
    keepalive_s: float = 30.0


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete upstream answer with a success status."""

    status: int
    headers: Headers
    content: bytes


class StreamBody:
    """An open streaming answer with a success status; read it one way."""

    def __init__(self, response: Response, provider: str) -> None:
        self._response = response
        self._provider = provider
        self.headers: Headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; what arrived before a dropped connection, then the error."""
        try:
            async for chunk in self._response.chunks():
                yield chunk
        except _NO_ANSWER as exc:
            raise transport_error(self._provider, exc) from exc

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines, without their ends (LF, CRLF or CR, as server-sent events
        allow); split as bytes, so a character cut between two chunks stays whole."""
        pending = b""
        async for chunk in self.chunks():
            if pending:
                chunk = pending + chunk
            *complete, pending = chunk.split(b"\n")
            for raw in complete:
                line = raw.decode("utf-8", "replace")
                if "\r" in line:
                    for part in line.removesuffix("\r").split("\r"):
                        yield part
                else:
                    yield line
        if pending:
            for part in pending.decode("utf-8", "replace").removesuffix("\r").split("\r"):
                yield part

    def sse(self, *, bare_json: bool = False) -> AsyncIterator[str]:
        """The `data` of each server-sent event (see `sse_data`)."""
        return sse_data(self.lines(), bare_json=bare_json)

    async def ndjson(self) -> AsyncIterator[JSON]:
        """Each non-blank line as a JSON object."""
        async for line in self.lines():
            if line.strip():
                yield parse_object(self._provider, line)


class Transport:
    """The process's upstream transport over one connection pool
    (`server.providers.http1`); each provider gets its `Upstream` view of it. `async
    with` (or `aclose`) closes the pool."""

    def __init__(self, limits: UpstreamLimits | None = None, *, ssl_context: ssl.SSLContext | None = None) -> None:
        """`ssl_context`: what https upstreams are verified with (default: certifi's CAs)."""
        self.limits = limits or UpstreamLimits()
        self._ssl_context = ssl_context
        self._pool: Http1Pool | None = None
        # The connect wait covers the wait for a free connection and the connect.
        self._timeouts = Timeouts(connect_s=self.limits.connect_s + self.limits.pool_s, read_s=self.limits.read_s)

    def upstream(
        self,
        provider: str,
        *,
        credential_header: tuple[str, str],
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        error_reader: ErrorReader | None = None,
    ) -> Upstream:
        return Upstream(
            self,
            provider,
            credential_header=credential_header,
            api_key=api_key,
            headers=headers,
            error_reader=error_reader,
        )

    @property
    def pool(self) -> Http1Pool:
        """The connection pool, opened on first use (it belongs to the running loop)."""
        if self._pool is None:
            self._pool = Http1Pool(
                max_connections=self.limits.max_connections,
                keepalive_s=self.limits.keepalive_s,
                ssl_context=self._ssl_context or _ssl_context(),
            )
        return self._pool

    def timeouts(self, call: Call) -> Timeouts:
        """The request's waits: the configured ones, none past the call's deadline
        (which then bounds the whole request, its body included)."""
        if call.deadline is None:
            return self._timeouts
        return Timeouts(self._timeouts.connect_s, self._timeouts.read_s, call.deadline)

    async def __aenter__(self) -> Transport:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()
            self._pool = None


@lru_cache(maxsize=1)
def _ssl_context() -> ssl.SSLContext:
    """certifi's CA bundle, HTTP/1.1 offered by ALPN."""
    context = ssl.create_default_context(cafile=certifi.where())
    context.set_alpn_protocols(["http/1.1"])
    return context


class Upstream:
    """One provider's view of the transport: its name, its fixed headers, the header
    its API reads the key from, and how its error bodies read."""

    def __init__(
        self,
        transport: Transport,
        provider: str,
        *,
        credential_header: tuple[str, str],
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        error_reader: ErrorReader | None = None,
    ) -> None:
        self.provider = provider
        self._transport = transport
        # (header name, value prefix): ("authorization", "Bearer "), ("x-api-key", "")...
        self.credential_header = credential_header
        self.headers = with_credential(credential_header, api_key, headers)
        self._error_of = error_reader or self.openai_error

    def openai_error(self, status: int, headers: Headers, body: bytes) -> errors.UpstreamError:
        """The error of an OpenAI-style body (`{"error": {"message": ...}}`), by status."""
        return upstream_status_error(self.provider, status, headers, error_message_from_body(body))

    def request_headers(self, call: Call, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        """The headers of one request of `call`: fixed ones, `extra`, the call's."""
        headers = {**self.headers, **(extra or {})}
        if call.request_id is not None:
            headers[REQUEST_ID_HEADER] = call.request_id
        headers.update(call.trace_headers)
        if call.credential is not None:  # registered for redaction by the vault that holds it
            name, prefix = self.credential_header
            headers[name] = prefix + call.credential.secret
        return headers

    async def _open(
        self, method: str, url: str, call: Call, headers: Mapping[str, str] | None, body: dict[str, Any]
    ) -> Response:
        """Sends the request and returns the answer with its body still to read.

        `body`: at most one of `json` (an object sent as JSON), `content` (bytes), or
        `data` (form fields) with `files` (`{name: (filename, bytes, content type)}`:
        multipart); and `params` (query parameters added to the URL's)."""
        sent = self.request_headers(call, headers)
        data, content_type = await _body(body)
        _label(sent, data, content_type)
        target = _url(url)
        if params := body.get("params"):
            target = target.extend_query(params)
        if data is None and method in _BODY_METHODS:
            data = b""
        transport = self._transport
        try:
            return await transport.pool.request(method, target, _with_defaults(sent), data, transport.timeouts(call))
        except _NO_ANSWER as exc:
            raise transport_error(self.provider, exc) from exc

    async def send(
        self, method: str, url: str, call: Call, *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> Answer:
        """Sends one request (`body`: see `_open`) and returns the whole answer; raises
        the mapped error for an error status or no (complete) answer."""
        response = await self._open(method, url, call, headers, body)
        try:
            content = await response.read()
        except _NO_ANSWER as exc:
            raise transport_error(self.provider, exc) from exc
        finally:
            response.close()  # back to the pool when read to its end, else hung up
        if response.status >= 400:
            raise self._error_of(response.status, response.headers, content)
        return Answer(response.status, response.headers, content)

    async def post_json(self, url: str, body: JSON, call: Call, **options: Any) -> JSON:
        """POSTs `body` as JSON and returns the answer's JSON object."""
        answer = await self.send("POST", url, call, json=body, **options)
        return parse_object(self.provider, answer.content)

    @asynccontextmanager
    async def stream(
        self, method: str, url: str, call: Call, *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> AsyncIterator[StreamBody]:
        """`async with`: sends the request, raises the mapped error on a failed status
        (its body read first), and closes the upstream response on exit: back to the
        pool when read to its end, else hung up, which stops the upstream's work (a
        cancelled call)."""
        response = await self._open(method, url, call, headers, body)
        try:
            if response.status >= 400:
                try:
                    content = await response.read()
                except _NO_ANSWER:
                    content = b""
                raise self._error_of(response.status, response.headers, content)
            yield StreamBody(response, self.provider)
        finally:
            response.close()


def _label(headers: dict[str, str], data: bytes | None, content_type: str | None) -> None:
    """Puts the body's content type in `headers` unless the adapter set one (a bare
    bytes body is left unlabelled, as httpx left it)."""
    if data is None or content_type is None or any(name.lower() == "content-type" for name in headers):
        return
    headers["content-type"] = content_type


def _with_defaults(headers: dict[str, str]) -> list[tuple[str, str]]:
    """The request's headers, with the defaults the adapter did not set itself."""
    sent = list(headers.items())
    names = {name.lower() for name in headers}
    sent.extend((name, value) for name, value in _DEFAULT_HEADERS if name.lower() not in names)
    return sent


async def _body(body: dict[str, Any]) -> tuple[bytes | None, str | None]:
    """The request body's bytes, and the content type it implies."""
    if (value := body.get("json")) is not None:
        return json_body(value), "application/json"
    if (content := body.get("content")) is not None:
        return bytes(content), None
    fields, files = body.get("data"), body.get("files")
    if fields is None and files is None:
        return None, None
    # Forms (transcription uploads): encoded by aiohttp's multipart writer, imported
    # here only (a worker that never uploads does not load aiohttp).
    import aiohttp

    form = aiohttp.FormData()
    for name, value in (fields or {}).items():
        for item in value if isinstance(value, list) else [value]:
            form.add_field(name, item)
    for name, (filename, data, *rest) in (files or {}).items():
        form.add_field(name, data, filename=filename, content_type=rest[0] if rest else None)
    payload = form()
    return await payload.as_bytes(), payload.content_type


# What orjson would write that json.dumps refuses: dataclasses, datetimes, subclasses
# of str, int, dict or list go to `default` (there is none, so it raises).
_STRICT = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_SUBCLASS


def json_body(value: Any) -> bytes:
    """A request body as httpx encoded it: compact, UTF-8, no NaN.

    Written by orjson (a 50 KB conversation: about 6 instead of 200 µs): the same text
    as json.dumps's but for the style of some floats. orjson writes NaN and infinities
    as null where json.dumps refuses them, so a text with a null in it is written again
    by json.dumps, which refuses them as before; so is whatever orjson refuses (an
    integer past 64 bits, a lone surrogate, a key that is not a string)."""
    try:
        encoded = orjson.dumps(value, option=_STRICT)
    except orjson.JSONEncodeError:
        encoded = b"null"
    if b"null" not in encoded:
        return encoded
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


# A URL of characters that need no quoting: sent as written (a signed URL's escapes kept).
_PLAIN_URL = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*")


@lru_cache(maxsize=1024)
def _url(url: str) -> URL:
    """The request URL, parsed once per distinct URL (a handful per provider and model)."""
    return URL(url, encoded=True) if _PLAIN_URL.fullmatch(url) else URL(url)


def with_credential(
    credential_header: tuple[str, str], api_key: str | None, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """A provider's fixed request headers: the configured extras, and the API key in the
    one header its API reads (the same one a call's credential replaces)."""
    headers = dict(extra or {})
    register_secret(api_key)  # redacted wherever a provider echoes it
    if api_key:
        name, prefix = credential_header
        headers[name] = prefix + api_key
    return headers


# -------------------------------------------------------------------------- framing


async def sse_data(lines: AsyncIterator[str], *, bare_json: bool = False) -> AsyncIterator[str]:
    """The `data` of each server-sent event, multi-line data joined with newlines.

    Other fields (event:, id:, retry:) and comments (:) carry nothing an adapter uses.
    With `bare_json`, a line outside any field that (with the lines before it) is a
    JSON document is an event too: Google sends a failure mid-stream that way. One
    generator over the response's lines (no layer per concern: this runs per line);
    the lines' own failures are already the error tree's (`StreamBody.chunks`)."""
    data: list[str] = []
    bare: list[str] = []
    async for line in lines:
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line.strip():
            if data:
                yield "\n".join(data)
                data = []
        elif bare_json and not line.startswith((":", "event:", "id:", "retry:")):
            bare.append(line)
            if _is_json("\n".join(bare)):
                yield "\n".join(bare)
                bare = []
    for rest in (data, bare):
        if rest:
            yield "\n".join(rest)


# 19 digits in a row: perhaps an integer beyond 64 bits, which orjson reads as a float.
_LONG_DIGITS = re.compile("[0-9]{19}")
_LONG_DIGITS_BYTES = re.compile(b"[0-9]{19}")


def json_loads(content: bytes | str) -> Any:
    """`json.loads(content)`, read by orjson (several times faster, for every chunk
    of a stream) when that is certainly the same: orjson refuses what the standard
    library accepts beyond JSON (NaN, a number beyond a double's range, an escaped
    lone surrogate), and those go to `json.loads`, as does a text with a run of 19
    digits (orjson reads an integer beyond 64 bits as a float). tests/test_transport_json.py
    compares the two."""
    long_digits = _LONG_DIGITS.search(content) if isinstance(content, str) else _LONG_DIGITS_BYTES.search(content)
    if long_digits is None:
        try:
            return orjson.loads(content)
        except orjson.JSONDecodeError:
            pass
    return json.loads(content)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def parse_object(provider: str, content: bytes | str) -> JSON:
    """The JSON object an upstream answered; UPSTREAM_MALFORMED_RESPONSE otherwise."""
    try:
        parsed = json_loads(content)
    except (ValueError, RecursionError) as exc:  # RecursionError: nesting past json's depth
        shown = content[:200] if isinstance(content, str) else content[:200].decode("utf-8", "replace")
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered with invalid JSON: {shown!r}", provider=provider
        ) from exc
    if not isinstance(parsed, dict):
        raise errors.UpstreamMalformedResponse(f"{provider} answered JSON that is not an object", provider=provider)
    return parsed


# --------------------------------------------------------------------------- errors


def retry_after_seconds(headers: Headers) -> float | None:
    """The provider's retry hint: `retry-after-ms`, or `retry-after` (seconds or a date)."""
    if (millis := headers.get("retry-after-ms")) is not None:
        try:
            return max(float(millis) / 1000.0, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time(), 0.0)
    except (TypeError, ValueError):
        return None


def error_message_from_body(body: bytes) -> str:
    """The `error.message` of an OpenAI-style error body, or the body's start."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:_MAX_MESSAGE_CHARS] or "(empty body)"
    if isinstance(parsed, dict):
        error = parsed.get("error", parsed)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])[:_MAX_MESSAGE_CHARS]
        if isinstance(error, str):
            return error[:_MAX_MESSAGE_CHARS]
    return json.dumps(parsed)[:_MAX_MESSAGE_CHARS]


def upstream_status_error(
    provider: str, status: int, headers: Headers, message: str, retry_after: float | None = None
) -> errors.UpstreamError:
    """The exception for an upstream answer with HTTP status `status` (>= 400);
    `retry_after` when the body gave a hint the headers did not."""
    text = f"{provider} answered {status}: {message}"
    kind: type[errors.UpstreamError]
    if status in (400, 409, 413, 415, 422):
        kind = errors.UpstreamBadRequest
    elif status == 401:
        kind = errors.UpstreamCredentialRejected
    elif status == 403:
        kind = errors.UpstreamAuthFailed
    elif status == 404:
        kind = errors.UpstreamNotFound
    elif status == 429:
        kind = errors.UpstreamRateLimited
    elif status in (408, 504):
        kind = errors.UpstreamTimeout
    else:  # 5xx, 529 overloaded, and anything unexpected
        kind = errors.UpstreamUnavailable
    hint = retry_after_seconds(headers)
    return kind(text, provider=provider, status=status, retry_after_seconds=retry_after if hint is None else hint)


def transport_error(provider: str, exc: Exception) -> errors.UpstreamError:
    """The exception for a request that got no (complete) HTTP answer: a timeout
    (connect or read; aiohttp's timeouts are `TimeoutError`s) or unreachable (refused,
    reset, dropped mid-answer, not HTTP)."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return errors.UpstreamTimeout(f"{provider} did not answer in time ({detail})", provider=provider)
    return errors.UpstreamUnavailable(f"{provider} could not be reached ({detail})", provider=provider)
