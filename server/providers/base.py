"""The adapter seam: the internal types and one small interface per capability.

Internally a request or response is the OpenAI-shaped JSON object (a dict) of the
matching OpenAI endpoint, because that is the lingua franca every client and most
providers already speak: the OpenAI adapter forwards it nearly as is, and an adapter
for another API translates it both ways. The `model` an adapter receives is the
upstream model name (the part after `provider/`); the `call` (`server.calls.Call`) is
what the upstream request carries of the client's call (its credential, request id,
trace), handed to the transport as is; it defaults to `NO_CALL` outside a client call.
"""

from __future__ import annotations

import base64
import struct
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, runtime_checkable

from server.calls import Call

JSON = dict[str, Any]


class Capability(StrEnum):
    """What a provider (or one of its models) can do; names appear in /models."""

    CHAT = "chat"
    CHAT_STREAM = "chat_stream"
    TOOLS = "tools"
    VISION = "vision"
    JSON_SCHEMA = "json_schema"
    EMBEDDINGS = "embeddings"
    IMAGES = "images"
    SPEECH = "speech"
    TRANSCRIPTION = "transcription"


@dataclass(frozen=True, slots=True)
class AudioFile:
    """Speech audio returned by a provider: the file's bytes and their MIME type."""

    content_type: str
    data: bytes


@dataclass(frozen=True, slots=True)
class TranscriptionInput:
    """An audio file to transcribe and the OpenAI form fields that go with it."""

    file: bytes
    filename: str
    file_content_type: str
    # OpenAI's form fields other than `file` and `model` (language, prompt,
    # response_format, temperature, ...), as strings, in the order given.
    fields: list[tuple[str, str]] = field(default_factory=list)

    @property
    def response_format(self) -> str:
        for name, value in self.fields:
            if name == "response_format":
                return value
        return "json"


@dataclass(frozen=True, slots=True)
class TranscriptionOutput:
    """A transcription as the provider rendered it in the requested response_format."""

    content_type: str
    body: bytes
    # OpenAI's transcription `usage` ({"type": "duration", "seconds": ...} or
    # {"type": "tokens", ...}) when the adapter had to ask for a richer format than the
    # client's to learn it (text, srt and vtt bodies carry none).
    usage: JSON | None = None


@runtime_checkable
class ChatCompletions(Protocol):
    """Chat completions, complete and streamed."""

    async def create_chat_completion(self, request: JSON, model: str, call: Call = ...) -> JSON:
        """Answers an OpenAI chat request with an OpenAI `chat.completion` object."""
        ...

    def stream_chat_completion(self, request: JSON, model: str, call: Call = ...) -> AsyncGenerator[JSON, None]:
        """Yields OpenAI `chat.completion.chunk` objects as the upstream produces them.

        Always ends with a chunk carrying `usage` (with empty `choices`) when the
        upstream reports usage, whatever the client asked: billing needs it.
        Raises an `UpstreamError` if the stream fails or ends early.
        """
        ...


@runtime_checkable
class Embeddings(Protocol):
    """Text embeddings."""

    async def create_embedding(self, request: JSON, model: str, call: Call = ...) -> JSON:
        """Answers an OpenAI embeddings request with an OpenAI embedding `list`."""
        ...


@runtime_checkable
class ImageGeneration(Protocol):
    """Images from prompts."""

    async def create_image(self, request: JSON, model: str, call: Call = ...) -> JSON:
        """Answers an OpenAI images request with OpenAI's images response."""
        ...


@runtime_checkable
class SpeechSynthesis(Protocol):
    """Text to speech."""

    async def create_speech(self, request: JSON, model: str, call: Call = ...) -> AudioFile:
        """Answers an OpenAI speech request with the audio file."""
        ...


@runtime_checkable
class Transcription(Protocol):
    """Speech to text."""

    async def create_transcription(
        self, audio: TranscriptionInput, model: str, call: Call = ...
    ) -> TranscriptionOutput:
        """Transcribes audio, rendered in `audio.response_format`."""
        ...


CAPABILITY_INTERFACES: dict[Capability, type] = {
    Capability.CHAT: ChatCompletions,
    Capability.EMBEDDINGS: Embeddings,
    Capability.IMAGES: ImageGeneration,
    Capability.SPEECH: SpeechSynthesis,
    Capability.TRANSCRIPTION: Transcription,
}


@runtime_checkable
class CredentialProbe(Protocol):
    """Adapters that can check a credential on their own (every built-in one)."""

    async def probe_credential(self, secret: str) -> None:
        """Sends the provider's cheapest authenticated request (its model list) with
        `secret`: returns if accepted, raises `UpstreamCredentialRejected` if the
        provider says the key is invalid, another `UpstreamError` if it cannot tell."""
        ...


@runtime_checkable
class Preloading(Protocol):
    """Adapters with something slow to prepare (the local models): the gateway calls
    `start_loading` once at start; it returns at once and the work goes on elsewhere."""

    def start_loading(self) -> None: ...


class Provider(Protocol):
    """What every adapter has besides its capability methods."""

    name: str
    # Everything the adapter can do; a model's catalog entry may narrow it.
    capabilities: frozenset[Capability]

    async def aclose(self) -> None:
        """Releases what the adapter holds (the shared transport is not its own)."""
        ...


def floats_to_base64(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32 values, base64-encoded
    (for providers whose embeddings come back as float lists only)."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
