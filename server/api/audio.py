"""AudioService: speech from text, and transcription (typed bytes or multipart)."""

from __future__ import annotations

import json
from dataclasses import replace
from email import errors as email_errors
from email.message import EmailMessage, MIMEPart
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any

import grpc
from google.api import httpbody_pb2

from aigne.hub.v1 import audio_service_pb2 as audio_pb
from aigne.hub.v1 import audio_service_pb2_grpc as audio_grpc
from server.accounts.credits import Usage
from server.api.calls import MeteredServicer, unary
from server.api.convert import from_json, to_json
from server.api.metering import usage_from_openai
from server.api.validation import check_model_name
from server.errors import InvalidRequest, RequestTooLarge
from server.providers.base import (
    Capability,
    SpeechSynthesis,
    Transcription,
    TranscriptionInput,
    TranscriptionOutput,
)
from server.routing.router import Route

SPEECH_FORMATS = frozenset({"", "mp3", "opus", "aac", "flac", "wav", "pcm"})
TRANSCRIPTION_FORMATS = frozenset({"", "json", "text", "srt", "verbose_json", "vtt"})
# The bounds of CreateTranscriptionRequest's model and filename (see validation.LIMITS),
# for the multipart upload, which is no typed message.
MAX_MODEL_CHARACTERS = 256
MAX_FILENAME_CHARACTERS = 256
# Form fields OpenAI's transcription endpoint takes besides `file` and `model`.
TRANSCRIPTION_FIELDS = frozenset(
    {
        "language",
        "prompt",
        "response_format",
        "temperature",
        "timestamp_granularities[]",
        "chunking_strategy",
        "include[]",
    }
)


class AudioServicer(MeteredServicer, audio_grpc.AudioServiceServicer):
    @unary
    async def CreateSpeech(
        self,
        request: audio_pb.CreateSpeechRequest,
        context: grpc.aio.ServicerContext[audio_pb.CreateSpeechRequest, httpbody_pb2.HttpBody],
    ) -> httpbody_pb2.HttpBody:
        _check_speech(request)
        plan, options = self._plan(request.model, Capability.SPEECH, SpeechSynthesis, context)
        body = to_json(request)
        body.pop("model", None)
        characters = Usage(characters=len(request.input))
        async with self._routed(plan, options, context, "speech", characters) as call:
            audio = (
                await call.unary(lambda adapter, model, attempt: adapter.create_speech(dict(body), model, attempt))
            ).result
            call.meter.usage = characters
        return httpbody_pb2.HttpBody(content_type=audio.content_type, data=audio.data)

    @unary
    async def CreateTranscription(
        self,
        request: audio_pb.CreateTranscriptionRequest,
        context: grpc.aio.ServicerContext[audio_pb.CreateTranscriptionRequest, audio_pb.CreateTranscriptionResponse],
    ) -> audio_pb.CreateTranscriptionResponse:
        if not request.file:
            raise InvalidRequest("file is required: the audio file's bytes", field="file")
        _check_transcription_format(request.response_format)
        fields = [(name, str(value)) for name, value in to_json(request).items() if name in TRANSCRIPTION_FIELDS]
        audio = TranscriptionInput(
            file=request.file,
            filename=request.filename or "audio.wav",
            file_content_type="application/octet-stream",
            fields=fields,
        )
        route, output = await self._transcribe(request.model, audio, context)
        return _typed_transcription(output, audio.response_format, route)

    @unary
    async def UploadTranscription(
        self,
        request: httpbody_pb2.HttpBody,
        context: grpc.aio.ServicerContext[httpbody_pb2.HttpBody, httpbody_pb2.HttpBody],
    ) -> httpbody_pb2.HttpBody:
        model, audio = parse_transcription_upload(request.content_type, request.data)
        _check_transcription_format(audio.response_format)
        _, output = await self._transcribe(model, audio, context)
        return httpbody_pb2.HttpBody(content_type=output.content_type, data=output.body)

    async def _transcribe(
        self, model: str, audio: TranscriptionInput, context: grpc.aio.ServicerContext[Any, Any]
    ) -> tuple[Route, TranscriptionOutput]:
        plan, options = self._plan(model, Capability.TRANSCRIPTION, Transcription, context)
        async with self._routed(plan, options, context, "transcription", Usage()) as call:
            served = await call.unary(
                lambda adapter, model, attempt: adapter.create_transcription(audio, model, attempt)
            )
            output = served.result
            call.meter.usage = _transcription_usage(output)
        route = served.target.route
        return route, output


def _check_speech(request: audio_pb.CreateSpeechRequest) -> None:
    if not request.input:
        raise InvalidRequest("input is required: the text to speak", field="input")
    if not request.voice:
        raise InvalidRequest("voice is required, e.g. alloy", field="voice")
    if request.response_format not in SPEECH_FORMATS:
        raise InvalidRequest(
            f"response_format must be one of mp3, opus, aac, flac, wav, pcm; got {request.response_format[:64]!r}",
            field="response_format",
        )


def _check_transcription_format(response_format: str) -> None:
    if response_format not in TRANSCRIPTION_FORMATS:
        raise InvalidRequest(
            f"response_format must be one of json, text, srt, verbose_json, vtt; got {response_format[:64]!r}",
            field="response_format",
        )


def parse_transcription_upload(content_type: str, body: bytes) -> tuple[str, TranscriptionInput]:
    """The model and audio of an OpenAI-style multipart/form-data upload.

    Strict where the email parser is lenient: a body cut short (no closing boundary,
    which is also what a truncated upload looks like) or a `file` sent as a plain field
    (no filename, so not a file) is refused before any provider sees it.
    """
    message = _multipart(content_type, body)
    model = ""
    audio: tuple[bytes, str, str] | None = None
    fields: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        payload = part.get_payload(decode=True)
        if not isinstance(name, str) or not isinstance(payload, bytes):
            continue
        if name == "file":
            audio = (payload, _upload_filename(part), part.get_content_type())
        elif name == "model":
            model = payload.decode("utf-8", "replace").strip()
        elif name in TRANSCRIPTION_FIELDS:
            fields.append((name, payload.decode("utf-8", "replace")))
    if audio is None or not audio[0]:
        raise InvalidRequest("file is required: a non-empty audio file part named 'file'", field="file")
    if len(model) > MAX_MODEL_CHARACTERS:
        raise RequestTooLarge(
            f"model must have at most {MAX_MODEL_CHARACTERS} characters, got {len(model)}", field="model"
        )
    check_model_name(model)
    data, filename, file_type = audio
    return model, TranscriptionInput(file=data, filename=filename, file_content_type=file_type, fields=fields)


def _multipart(content_type: str, body: bytes) -> EmailMessage:
    if not content_type.lower().startswith("multipart/form-data") or "boundary=" not in content_type:
        raise InvalidRequest("the body must be multipart/form-data with a file part and a model field", field="file")
    header = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode()
    message = BytesParser(policy=HTTP).parsebytes(header + body)
    if not isinstance(message, EmailMessage) or not message.is_multipart():
        raise InvalidRequest("the multipart body could not be parsed", field="file")
    defects = [defect for part in message.walk() for defect in part.defects]
    if any(isinstance(defect, email_errors.CloseBoundaryNotFoundDefect) for defect in defects):
        raise InvalidRequest("the multipart body is incomplete: its closing boundary is missing", field="file")
    if any(isinstance(defect, email_errors.StartBoundaryNotFoundDefect) for defect in defects):
        raise InvalidRequest("the multipart body has no part starting with its boundary", field="file")
    return message


def _upload_filename(part: MIMEPart) -> str:
    filename = part.get_filename()
    if filename is None:
        raise InvalidRequest(
            "file must be a file part (Content-Disposition with a filename), not a plain form field", field="file"
        )
    if len(filename) > MAX_FILENAME_CHARACTERS:
        raise RequestTooLarge(
            f"the file's name must have at most {MAX_FILENAME_CHARACTERS} characters, got {len(filename)}", field="file"
        )
    return filename or "audio.wav"


def _typed_transcription(
    output: TranscriptionOutput, response_format: str, route: Route
) -> audio_pb.CreateTranscriptionResponse:
    if response_format in ("json", "verbose_json"):
        try:
            parsed = json.loads(output.body)
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            return from_json(parsed, audio_pb.CreateTranscriptionResponse(), provider=route.provider.name)
    return audio_pb.CreateTranscriptionResponse(text=output.body.decode("utf-8", "replace"))


def _transcription_usage(output: TranscriptionOutput) -> Usage:
    """Audio seconds (verbose_json's `duration`, or a `usage` of type duration) and
    tokens (a `usage` of type tokens), from the body or from what the adapter learnt
    when it asked for a richer format than the client's (`output.usage`)."""
    try:
        parsed = json.loads(output.body) if output.content_type.startswith("application/json") else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        parsed = {}
    usage = output.usage or parsed.get("usage")
    usage = usage if isinstance(usage, dict) else {}
    duration = parsed.get("duration")
    if not isinstance(duration, (int, float)) and usage.get("type") == "duration":
        duration = usage.get("seconds")
    audio_ms = round(duration * 1000) if isinstance(duration, (int, float)) else 0
    if usage.get("type") == "tokens":
        usage = {"prompt_tokens": usage.get("input_tokens"), "completion_tokens": usage.get("output_tokens")}
    return replace(usage_from_openai(usage), audio_ms=audio_ms)
