"""OpenAI and the OpenAI-compatible family (DeepSeek, xAI, OpenRouter, vLLM,
llama.cpp's server, Ollama's /v1, ...): the internal format is OpenAI's, so requests
go upstream nearly unchanged.

One adapter instance per configured provider; all share the process's httpx client.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx

from server import errors
from server.providers.base import (
    JSON,
    AudioFile,
    Capability,
    TranscriptionInput,
    TranscriptionOutput,
    auth_headers,
)
from server.providers.credentials import probe
from server.providers.http_errors import (
    error_message_from_body,
    transport_error,
    upstream_status_error,
)

ALL_CAPABILITIES = frozenset(Capability)


class OpenAIAdapter:
    """Speaks OpenAI's REST API at `base_url` (which includes the `/v1` part)."""

    # Where a per-call credential from the vault goes (see server.providers.credentials).
    credential_header = ("authorization", "Bearer ")

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        client: httpx.AsyncClient,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = ALL_CAPABILITIES,
        reasoning_field: str = "reasoning_content",
    ) -> None:
        self.name = name
        # Where this dialect puts visible reasoning (DeepSeek: reasoning_content,
        # OpenRouter: reasoning); it is always handed on as reasoning_content.
        self._reasoning_field = reasoning_field
        self.capabilities = capabilities
        self._base_url = base_url.rstrip("/")
        self._client = client
        self._headers = auth_headers(self.credential_header, api_key, extra_headers)

    async def aclose(self) -> None:
        """Nothing of its own to release: the HTTP client is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the provider's models with `secret` (see `base.CredentialProbe`)."""
        await probe(
            self._client,
            self._base_url + "/models",
            provider=self.name,
            headers=self._headers,
            credential_header=self.credential_header,
            secret=secret,
            error_of=lambda r: upstream_status_error(
                self.name, r.status_code, r.headers, error_message_from_body(r.content)
            ),
        )

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str) -> JSON:
        body = {**request, "model": model}
        body.pop("stream", None)
        body.pop("stream_options", None)
        return self._rename_reasoning(await self._post_json("/chat/completions", body), "message")

    async def stream_chat_completion(self, request: JSON, model: str) -> AsyncGenerator[JSON, None]:
        # Usage is always asked for: billing needs it even when the client did not.
        body = {**request, "model": model, "stream": True, "stream_options": {"include_usage": True}}
        async with self._open_stream("/chat/completions", body) as response:
            done = False
            async for event in _sse_data(response, self.name):
                # After [DONE] the body is still read to its end: only then does the
                # connection go back to the pool instead of being dropped.
                if done:
                    continue
                if event == "[DONE]":
                    done = True
                    continue
                chunk = self._parse_event(event)
                if "error" in chunk:  # OpenRouter sends it beside choices
                    raise self._stream_error(chunk["error"])
                yield self._rename_reasoning(chunk, "delta")
        if done:
            return
        raise errors.UpstreamUnavailable(f"{self.name} ended the stream before [DONE]", provider=self.name)

    # -- embeddings, images, audio --------------------------------------------------------

    async def create_embedding(self, request: JSON, model: str) -> JSON:
        return await self._post_json("/embeddings", {**request, "model": model})

    async def create_image(self, request: JSON, model: str) -> JSON:
        body = {**request, "model": model}
        rules = IMAGE_MODELS.get(model) if self.name == "openai" else None
        if rules is not None:
            body = rules.check(self.name, model, body)
        return await self._post_json("/images/generations", body)

    async def create_speech(self, request: JSON, model: str) -> AudioFile:
        response = await self._send("POST", "/audio/speech", json={**request, "model": model})
        content_type = response.headers.get("content-type", "application/octet-stream")
        return AudioFile(content_type=content_type, data=response.content)

    async def create_transcription(self, audio: TranscriptionInput, model: str) -> TranscriptionOutput:
        # text, srt and vtt carry no usage: ask for a JSON format that does and render
        # the client's format here, so that the audio is billed whatever was asked.
        asked = richer_transcription_format(audio.response_format, model)
        if asked != audio.response_format:
            fields = [(n, v) for n, v in audio.fields if n != "response_format"] + [("response_format", asked)]
            output = await self._transcribe(
                TranscriptionInput(audio.file, audio.filename, audio.file_content_type, fields), model
            )
            return render_transcription(self.name, output.body, audio.response_format)
        return await self._transcribe(audio, model)

    async def _transcribe(self, audio: TranscriptionInput, model: str) -> TranscriptionOutput:
        data: dict[str, str | list[str]] = {"model": model}
        for name, value in audio.fields:  # repeated fields (`include[]`) become lists
            previous = data.get(name)
            if previous is None:
                data[name] = value
            else:
                data[name] = [*([previous] if isinstance(previous, str) else previous), value]
        files = {"file": (audio.filename, audio.file, audio.file_content_type)}
        response = await self._send("POST", "/audio/transcriptions", data=data, files=files)
        content_type = response.headers.get("content-type", "text/plain")
        return TranscriptionOutput(content_type=content_type, body=response.content)

    # -- HTTP plumbing --------------------------------------------------------------------

    async def _post_json(self, path: str, body: JSON) -> JSON:
        response = await self._send("POST", path, json=body)
        return self._parse_json(response.content)

    async def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = await self._client.request(method, self._base_url + path, headers=self._headers, **kwargs)
        except httpx.HTTPError as exc:
            raise transport_error(self.name, exc) from exc
        if response.status_code >= 400:
            message = error_message_from_body(response.content)
            raise upstream_status_error(self.name, response.status_code, response.headers, message)
        return response

    def _open_stream(self, path: str, body: JSON) -> _StreamContext:
        request = self._client.build_request("POST", self._base_url + path, headers=self._headers, json=body)
        return _StreamContext(self._client, request, self.name)

    def _parse_json(self, content: bytes) -> JSON:
        try:
            parsed = json.loads(content)
        except ValueError as exc:
            raise errors.UpstreamMalformedResponse(
                f"{self.name} answered with invalid JSON: {content[:200]!r}", provider=self.name
            ) from exc
        if not isinstance(parsed, dict):
            raise errors.UpstreamMalformedResponse(
                f"{self.name} answered with JSON that is not an object", provider=self.name
            )
        return parsed

    def _rename_reasoning(self, answer: JSON, part: str) -> JSON:
        if self._reasoning_field == "reasoning_content":
            return answer
        for choice in answer.get("choices") or ():
            message = choice.get(part) if isinstance(choice, dict) else None
            if isinstance(message, dict) and self._reasoning_field in message:
                message["reasoning_content"] = message.pop(self._reasoning_field)
        return answer

    def _parse_event(self, data: str) -> JSON:
        return self._parse_json(data.encode())

    def _stream_error(self, error: Any) -> errors.UpstreamError:
        message = error.get("message") if isinstance(error, dict) else None
        return errors.UpstreamUnavailable(f"{self.name} failed mid-stream: {message or error}", provider=self.name)


def richer_transcription_format(wanted: str, model: str) -> str:
    """The format to ask for: Whisper models give segments and the duration in
    verbose_json (enough to render text, srt and vtt); the gpt-4o transcribe models
    know only json and text, and report token usage in json."""
    if wanted not in ("text", "srt", "vtt"):
        return wanted
    if "whisper" in model:
        return "verbose_json"
    return "json" if wanted == "text" else wanted


def render_transcription(provider: str, body: bytes, wanted: str) -> TranscriptionOutput:
    """The client's text, srt or vtt rendered from a json / verbose_json answer, with
    the answer's usage (or its duration as a usage of type duration) kept aside."""
    try:
        parsed = json.loads(body)
    except ValueError as exc:
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered a transcription that is not JSON", provider=provider
        ) from exc
    if not isinstance(parsed, dict) or not isinstance(parsed.get("text"), str):
        raise errors.UpstreamMalformedResponse(f"{provider} answered a transcription without text", provider=provider)
    usage = parsed.get("usage") if isinstance(parsed.get("usage"), dict) else None
    if isinstance(parsed.get("duration"), int | float):
        usage = {"type": "duration", "seconds": parsed["duration"]}
    rendered = parsed["text"] + "\n" if wanted == "text" else _subtitles(parsed, wanted)
    return TranscriptionOutput("text/plain; charset=utf-8", rendered.encode(), usage=usage)


def _subtitles(parsed: JSON, wanted: str) -> str:
    """SubRip or WebVTT cues, one per segment (the whole text as one cue without them)."""
    segments = parsed.get("segments") or [{"start": 0.0, "end": parsed.get("duration") or 0.0, "text": parsed["text"]}]
    separator = "," if wanted == "srt" else "."
    cues = []
    for number, segment in enumerate(segments, start=1):
        timing = f"{_timestamp(segment['start'], separator)} --> {_timestamp(segment['end'], separator)}"
        text = str(segment.get("text", "")).strip()
        cues.append(f"{number}\n{timing}\n{text}\n" if wanted == "srt" else f"{timing}\n{text}\n")
    body = "\n".join(cues) + "\n"
    return body if wanted == "srt" else "WEBVTT\n\n" + body


def _timestamp(seconds: Any, separator: str) -> str:
    millis = round(float(seconds or 0) * 1000)
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    return f"{hours:02d}:{minutes:02d}:{rest // 1000:02d}{separator}{rest % 1000:03d}"


@dataclass(frozen=True)
class ImageModelRules:
    """What one of OpenAI's image models accepts, checked before the call so the client
    gets a message naming the allowed values rather than the upstream's."""

    sizes: frozenset[str]
    qualities: frozenset[str]
    max_n: int
    # gpt-image-1 always answers base64 and takes no response_format at all.
    base64_only: bool = False

    def check(self, provider: str, model: str, body: JSON) -> JSON:
        for name, allowed in (("size", self.sizes), ("quality", self.qualities)):
            if name in body and body[name] not in allowed:
                raise errors.InvalidRequest(
                    f"{name} {body[name]!r} is not available for {provider}/{model}; "
                    f"choose one of {', '.join(sorted(allowed))}",
                    field=name,
                )
        if body.get("n", 1) > self.max_n:
            raise errors.InvalidRequest(f"{provider}/{model} makes at most {self.max_n} image(s) per call", field="n")
        if self.base64_only:
            if body.get("response_format", "b64_json") != "b64_json":
                raise errors.UnsupportedFeature(
                    f"{provider}/{model} only returns b64_json images, not URLs",
                    field="response_format",
                    metadata={"provider": provider, "feature": "response_format=url"},
                )
            body = {k: v for k, v in body.items() if k not in ("response_format", "style")}
        return body


_GPT_IMAGE = ImageModelRules(
    sizes=frozenset({"auto", "1024x1024", "1536x1024", "1024x1536"}),
    qualities=frozenset({"auto", "low", "medium", "high"}),
    max_n=10,
    base64_only=True,
)
IMAGE_MODELS: dict[str, ImageModelRules] = {
    "dall-e-2": ImageModelRules(frozenset({"256x256", "512x512", "1024x1024"}), frozenset({"standard"}), 10),
    "dall-e-3": ImageModelRules(frozenset({"1024x1024", "1792x1024", "1024x1792"}), frozenset({"standard", "hd"}), 1),
    "gpt-image-1": _GPT_IMAGE,
    "gpt-image-1-mini": _GPT_IMAGE,
}


class _StreamContext:
    """`async with`: sends the request, raises the mapped error on a failed status,
    and closes the upstream connection on exit, which is how a client's cancellation
    reaches the upstream at once."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        request: httpx.Request,
        provider: str,
        error_of: Callable[[int, httpx.Headers, bytes], errors.UpstreamError] | None = None,
    ) -> None:
        self._client = client
        self._request = request
        self._provider = provider
        # How a failed status and its body become the error (a dialect may read more).
        self._error_of = error_of or self._openai_error
        self._response: httpx.Response | None = None

    def _openai_error(self, status: int, headers: httpx.Headers, body: bytes) -> errors.UpstreamError:
        return upstream_status_error(self._provider, status, headers, error_message_from_body(body))

    async def __aenter__(self) -> httpx.Response:
        try:
            response = await self._client.send(self._request, stream=True)
        except httpx.HTTPError as exc:
            raise transport_error(self._provider, exc) from exc
        if response.status_code >= 400:
            try:
                body = await response.aread()
            except httpx.HTTPError:
                body = b""
            finally:
                await response.aclose()
            raise self._error_of(response.status_code, response.headers, body)
        self._response = response
        return response

    async def __aexit__(self, *exc_info: object) -> None:
        if self._response is not None:
            await self._response.aclose()


async def _sse_data(response: httpx.Response, provider: str) -> AsyncIterator[str]:
    """The `data` of each server-sent event, multi-line data joined with newlines."""
    data_lines: list[str] = []
    try:
        async for line in response.aiter_lines():
            if not line:
                if data_lines:
                    yield "\n".join(data_lines)
                    data_lines = []
            elif line.startswith("data:"):
                data_lines.append(line[5:].removeprefix(" "))
            # Other fields (event:, id:, retry:) and comments (:) carry nothing we use.
    except httpx.HTTPError as exc:
        raise transport_error(provider, exc) from exc
    if data_lines:
        yield "\n".join(data_lines)
