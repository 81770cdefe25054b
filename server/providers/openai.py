"""OpenAI and the OpenAI-compatible family (DeepSeek, xAI, OpenRouter, vLLM,
llama.cpp's server, Ollama's /v1, ...): the internal format is OpenAI's, so requests
go upstream nearly unchanged.

One adapter instance per configured provider; all share the process's upstream
transport (`server.providers.transport`).
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ModelEntry, ProviderConfig
from server.providers.base import (
    JSON,
    AudioFile,
    Capability,
    TranscriptionInput,
    TranscriptionOutput,
)
from server.providers.spec import ProviderSpec
from server.providers.transport import ErrorReader, Transport, parse_object

ALL_CAPABILITIES = frozenset(Capability)
API_KEY_ENV = "OPENAI_API_KEY"
BASE_URL_ENV = "OPENAI_BASE_URL"
DEFAULT_BASE_URL = "https://api.openai.com/v1"


class OpenAIAdapter:
    """Speaks OpenAI's REST API at `base_url` (which includes the `/v1` part)."""

    # Where the key, and a call's credential, go (see server.providers.transport).
    credential_header = ("authorization", "Bearer ")

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        transport: Transport,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = ALL_CAPABILITIES,
        reasoning_field: str = "reasoning_content",
        error_reader: ErrorReader | None = None,
    ) -> None:
        self.name = name
        # Where this dialect puts visible reasoning (DeepSeek: reasoning_content,
        # OpenRouter: reasoning); it is always handed on as reasoning_content.
        self._reasoning_field = reasoning_field
        self.capabilities = capabilities
        self._base_url = base_url.rstrip("/")
        self._http = transport.upstream(
            name,
            credential_header=self.credential_header,
            api_key=api_key,
            headers=extra_headers,
            error_reader=error_reader,
        )
        # Query parameters of every request (Azure's api-version).
        self._params: dict[str, str] = {}

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the provider's models with `secret` (see `base.CredentialProbe`)."""
        await self._http.send("GET", self._base_url + "/models", probe_call(secret), params=self._params)

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = {**request, "model": model}
        body.pop("stream", None)
        body.pop("stream_options", None)
        return self._rename_reasoning(await self._post_json("/chat/completions", body, call), "message")

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        # Usage is always asked for: billing needs it even when the client did not.
        body = {**request, "model": model, "stream": True, "stream_options": {"include_usage": True}}
        url = self._url("/chat/completions", model)
        async with self._http.stream("POST", url, call, json=body, params=self._params) as response:
            done = False
            async for event in response.sse():
                # After [DONE] the body is still read to its end: only then does the
                # connection go back to the pool instead of being dropped.
                if done:
                    continue
                if event == "[DONE]":
                    done = True
                    continue
                chunk = parse_object(self.name, event)
                if "error" in chunk:  # OpenRouter sends it beside choices
                    raise self._stream_error(chunk["error"])
                yield self._rename_reasoning(chunk, "delta")
        if done:
            return
        raise errors.UpstreamUnavailable(f"{self.name} ended the stream before [DONE]", provider=self.name)

    # -- embeddings, images, audio --------------------------------------------------------

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        return await self._post_json("/embeddings", {**request, "model": model}, call)

    async def create_image(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = {**request, "model": model}
        rules = IMAGE_MODELS.get(model) if self.name == "openai" else None
        if rules is not None:
            body = rules.check(self.name, model, body)
        return await self._post_json("/images/generations", body, call)

    async def create_speech(self, request: JSON, model: str, call: Call = NO_CALL) -> AudioFile:
        url = self._url("/audio/speech", model)
        response = await self._http.send("POST", url, call, json={**request, "model": model}, params=self._params)
        content_type = response.headers.get("content-type", "application/octet-stream")
        return AudioFile(content_type=content_type, data=response.content)

    async def create_transcription(
        self, audio: TranscriptionInput, model: str, call: Call = NO_CALL
    ) -> TranscriptionOutput:
        # text, srt and vtt carry no usage: ask for a JSON format that does and render
        # the client's format here, so that the audio is billed whatever was asked.
        asked = richer_transcription_format(audio.response_format, model)
        if asked != audio.response_format:
            fields = [(n, v) for n, v in audio.fields if n != "response_format"] + [("response_format", asked)]
            output = await self._transcribe(
                TranscriptionInput(audio.file, audio.filename, audio.file_content_type, fields), model, call
            )
            return render_transcription(self.name, output.body, audio.response_format)
        return await self._transcribe(audio, model, call)

    async def _transcribe(self, audio: TranscriptionInput, model: str, call: Call) -> TranscriptionOutput:
        data: dict[str, str | list[str]] = {"model": model}
        for name, value in audio.fields:  # repeated fields (`include[]`) become lists
            previous = data.get(name)
            if previous is None:
                data[name] = value
            else:
                data[name] = [*([previous] if isinstance(previous, str) else previous), value]
        files = {"file": (audio.filename, audio.file, audio.file_content_type)}
        url = self._url("/audio/transcriptions", model)
        response = await self._http.send("POST", url, call, data=data, files=files, params=self._params)
        content_type = response.headers.get("content-type", "text/plain")
        return TranscriptionOutput(content_type=content_type, body=response.content)

    # -- translation --------------------------------------------------------------------

    def _url(self, path: str, model: str) -> str:
        """The URL of an operation on `model` (Azure's deployments put the model in it)."""
        return self._base_url + path

    async def _post_json(self, path: str, body: JSON, call: Call) -> JSON:
        return await self._http.post_json(self._url(path, body["model"]), body, call, params=self._params)

    def _rename_reasoning(self, answer: JSON, part: str) -> JSON:
        if self._reasoning_field == "reasoning_content":
            return answer
        for choice in answer.get("choices") or ():
            message = choice.get(part) if isinstance(choice, dict) else None
            if isinstance(message, dict) and self._reasoning_field in message:
                message["reasoning_content"] = message.pop(self._reasoning_field)
        return answer

    def _stream_error(self, error: Any) -> errors.UpstreamError:
        message = error.get("message") if isinstance(error, dict) else None
        return errors.UpstreamUnavailable(f"{self.name} failed mid-stream: {message or error}", provider=self.name)


def build_openai(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> OpenAIAdapter:
    """The factory of OpenAI and of every OpenAI-compatible spec (`server.providers.presets`)."""
    base_url = cfg.base_url or spec.base_url
    if not base_url:
        raise errors.ProviderNotConfigured(f"provider {name!r} needs a base_url", field="base_url")
    return OpenAIAdapter(
        name=name,
        base_url=base_url,
        api_key=spec.key_from_environment(cfg, os.environ),
        transport=transport,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities,
        reasoning_field=spec.reasoning_field,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    if not (environ.get(API_KEY_ENV) or environ.get(BASE_URL_ENV)):
        return None
    return ProviderConfig(api_key_env=API_KEY_ENV, base_url=environ.get(BASE_URL_ENV) or None)


_C = Capability
_OPENAI_CHAT = [_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.JSON_SCHEMA, _C.VISION]
MODELS = tuple(
    ModelEntry(id=model_id, capabilities=caps)
    for model_id, caps in [
        ("gpt-4o", _OPENAI_CHAT),
        ("gpt-4o-mini", _OPENAI_CHAT),
        ("gpt-4.1", _OPENAI_CHAT),
        ("gpt-4.1-mini", _OPENAI_CHAT),
        ("gpt-4.1-nano", _OPENAI_CHAT),
        ("o4-mini", _OPENAI_CHAT),
        ("text-embedding-3-small", [_C.EMBEDDINGS]),
        ("text-embedding-3-large", [_C.EMBEDDINGS]),
        ("dall-e-2", [_C.IMAGES]),
        ("dall-e-3", [_C.IMAGES]),
        ("gpt-image-1", [_C.IMAGES]),
        ("tts-1", [_C.SPEECH]),
        ("gpt-4o-mini-tts", [_C.SPEECH]),
        ("whisper-1", [_C.TRANSCRIPTION]),
        ("gpt-4o-mini-transcribe", [_C.TRANSCRIPTION]),
    ]
)

SPEC = ProviderSpec(
    name="openai",
    build=build_openai,
    api_key_env=API_KEY_ENV,
    base_url=DEFAULT_BASE_URL,
    models=MODELS,
    from_environment=_from_environment,
    adapter="openai",
    variables=(API_KEY_ENV, BASE_URL_ENV),
)


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
