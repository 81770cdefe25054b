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
Timeouts: the HTTP client's connect / read / pool timeouts (the settings'); the call's
attempt, first-token, idle and total bounds are the routing's (`server.routing`), above.

The HTTP client underneath is an `httpx.AsyncClient`, made by the application
(`server.app.upstream_client`); its own transport may be swapped (an aiohttp-based one,
say) without any adapter noticing: adapters see only `Upstream`, `Answer` and
`StreamBody`, whose headers are a case-insensitive `Mapping[str, str]`.

Only a 401 says the credential itself is bad (`UpstreamCredentialRejected`: the gateway
confirms with a probe and may take a stored credential out of rotation); a 403 is a
refused permission, often for one model, and leaves the credential alone. Upstream text
is redacted of anything key-shaped when the `UpstreamError` is built.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from time import time
from typing import Any

import httpx

from server import errors
from server.calls import Call
from server.providers.base import JSON
from server.redaction import register_secret

# Response headers: case-insensitive (httpx.Headers, or another client's equivalent).
Headers = Mapping[str, str]
# How a provider's failed answer becomes the gateway's error: (status, headers, body).
ErrorReader = Callable[[int, Headers, bytes], errors.UpstreamError]
REQUEST_ID_HEADER = "x-request-id"
_MAX_MESSAGE_CHARS = 500


@dataclass(frozen=True, slots=True)
class Answer:
    """A complete upstream answer with a success status."""

    status: int
    headers: Headers
    content: bytes


class StreamBody:
    """An open streaming answer with a success status; read it one way."""

    def __init__(self, response: httpx.Response, provider: str) -> None:
        self._response = response
        self._provider = provider
        self.headers: Headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for data in self._response.aiter_bytes():
                yield data
        except httpx.HTTPError as exc:
            raise transport_error(self._provider, exc) from exc

    def sse(self, *, bare_json: bool = False) -> AsyncIterator[str]:
        """The `data` of each server-sent event (see `sse_data`)."""
        return sse_data(self._response.aiter_lines(), bare_json=bare_json, provider=self._provider)

    async def ndjson(self) -> AsyncIterator[JSON]:
        """Each non-blank line as a JSON object."""
        try:
            async for line in self._response.aiter_lines():
                if line.strip():
                    yield parse_object(self._provider, line)
        except httpx.HTTPError as exc:
            raise transport_error(self._provider, exc) from exc


class Transport:
    """The process's upstream transport over one pooled HTTP client; each provider
    gets its `Upstream` view of it."""

    def __init__(self, client: httpx.AsyncClient | None = None) -> None:
        # No client: one with httpx's defaults (tests, the CLI's capability table).
        self._client = client or httpx.AsyncClient()

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
            self._client,
            provider,
            credential_header=credential_header,
            api_key=api_key,
            headers=headers,
            error_reader=error_reader,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


class Upstream:
    """One provider's view of the transport: its name, its fixed headers, the header
    its API reads the key from, and how its error bodies read."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        provider: str,
        *,
        credential_header: tuple[str, str],
        api_key: str | None = None,
        headers: Mapping[str, str] | None = None,
        error_reader: ErrorReader | None = None,
    ) -> None:
        self.provider = provider
        self._client = client
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

    async def send(
        self, method: str, url: str, call: Call, *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> Answer:
        """Sends one request (`body`: httpx's json / content / data / files / params) and
        returns the answer; raises the mapped error for an error status or no answer."""
        _drop_empty_params(body)
        try:
            response = await self._client.request(method, url, headers=self.request_headers(call, headers), **body)
        except httpx.HTTPError as exc:
            raise transport_error(self.provider, exc) from exc
        if response.status_code >= 400:
            raise self._error_of(response.status_code, response.headers, response.content)
        return Answer(response.status_code, response.headers, response.content)

    async def post_json(self, url: str, body: JSON, call: Call, **options: Any) -> JSON:
        """POSTs `body` as JSON and returns the answer's JSON object."""
        answer = await self.send("POST", url, call, json=body, **options)
        return parse_object(self.provider, answer.content)

    @asynccontextmanager
    async def stream(
        self, method: str, url: str, call: Call, *, headers: Mapping[str, str] | None = None, **body: Any
    ) -> AsyncIterator[StreamBody]:
        """`async with`: sends the request, raises the mapped error on a failed status
        (its body read first), and closes the upstream response on exit."""
        _drop_empty_params(body)
        request = self._client.build_request(method, url, headers=self.request_headers(call, headers), **body)
        try:
            response = await self._client.send(request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(self.provider, exc) from exc
        try:
            if response.status_code >= 400:
                try:
                    content = await response.aread()
                except httpx.HTTPError:
                    content = b""
                raise self._error_of(response.status_code, response.headers, content)
            yield StreamBody(response, self.provider)
        finally:
            await response.aclose()


def _drop_empty_params(body: dict[str, Any]) -> None:
    """No `params` when there are none: httpx re-parses the whole URL to merge even an
    empty mapping (measured: the largest share of the transport's own CPU)."""
    if "params" in body and not body["params"]:
        del body["params"]


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


async def sse_data(
    lines: AsyncIterator[str], *, bare_json: bool = False, provider: str = "upstream"
) -> AsyncIterator[str]:
    """The `data` of each server-sent event, multi-line data joined with newlines.

    Other fields (event:, id:, retry:) and comments (:) carry nothing an adapter uses.
    With `bare_json`, a line outside any field that (with the lines before it) is a
    JSON document is an event too: Google sends a failure mid-stream that way. One
    generator over the response's lines (no layer per concern: this runs per line)."""
    data: list[str] = []
    bare: list[str] = []
    try:
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
    except httpx.HTTPError as exc:
        raise transport_error(provider, exc) from exc
    for rest in (data, bare):
        if rest:
            yield "\n".join(rest)


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def parse_object(provider: str, content: bytes | str) -> JSON:
    """The JSON object an upstream answered; UPSTREAM_MALFORMED_RESPONSE otherwise."""
    try:
        parsed = json.loads(content)
    except ValueError as exc:
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
    """The exception for a request that got no (complete) HTTP answer."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return errors.UpstreamTimeout(f"{provider} did not answer in time ({detail})", provider=provider)
    return errors.UpstreamUnavailable(f"{provider} could not be reached ({detail})", provider=provider)
