"""A fake OpenAI API on loopback that speaks OpenAI's wire format, for tests.

In a test::

    server = FakeOpenAI()
    await server.start()            # server.base_url == "http://127.0.0.1:PORT/v1"
    ...                             # point the gateway (or an SDK) at server.base_url
    assert server.requests[-1].json["model"] == "gpt-4o-mini"
    await server.stop()

Standalone (benchmarks, manual use)::

    python -m tests.fakes.openai_upstream --port 8099

Behaviour is chosen by the requested model name, so that tests are deterministic and
need no set-up beyond naming a model (see `SCENARIO_MODELS`). Any other model name
answers normally: chat replies "echo: <last user text>", with usage counted in words.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import logging
import math
import random
import re
import signal
import struct
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from types import EllipsisType
from typing import Any

from tests.fakes._http import (
    AbortConnection,
    HttpServer,
    Request,
    Response,
    UploadedFile,
    parse_multipart,
)

__all__ = ["SCENARIO_MODELS", "FakeOpenAI", "RecordedRequest", "UploadedFile"]

_log = logging.getLogger(__name__)

JSON = dict[str, Any]

# Fixed so that responses are byte-for-byte reproducible.
CREATED = 1_700_000_000
# Output tokens of one image from a gpt-image model.
IMAGE_OUTPUT_TOKENS = 100

SCENARIO_MODELS = (
    "tools",  # calls the first tool with {"city": "Paris"}; answers a tool result in text
    "tools-parallel",  # two tool calls in one turn: {"city": "Paris"}, {"city": "London"}
    "length",  # the reply cut to its first 2 words, finish_reason "length"
    "content-filter",  # finish_reason "content_filter", no content
    "error-400",  # "error-NNN": that HTTP status with OpenAI's error body
    "error-401",
    "error-403",
    "error-404",
    "error-429",  # also retry-after: 7 and x-ratelimit-* headers
    "error-500",
    "error-503",
    "malformed",  # 200 with a body (or SSE event) that is not valid JSON
    "slow",  # waits server.slow_seconds before answering
    "stream-cut",  # streams 2 chunks, then drops the connection (no [DONE])
    "stream-error",  # streams 2 chunks, then `data: {"error": {...}}`
    "stream-slow",  # waits server.chunk_delay before each chunk
    "stream-burst",  # the whole stream in one write (a fast model, a cached answer)
    "stream-stall",  # streams 2 chunks, then goes silent until the client hangs up
    "stream-trickle",  # streams 2 chunks, then only SSE comments (every 0.2 s) until the client hangs up
)
_NORMAL_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "text-embedding-3-small",
    "dall-e-3",
    "tts-1",
    "whisper-1",
)

# (type, code, message) of OpenAI's error bodies, by HTTP status.
_ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: (
        "request_forbidden",
        "unsupported_country_region_territory",
        "Country, region, or territory not supported",
    ),
    404: ("invalid_request_error", "model_not_found", "The model does not exist or you do not have access to it."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: (
        "server_error",
        None,
        "The server had an error while processing your request. Sorry about that!",
    ),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}
_RATE_LIMIT_HEADERS = {
    "retry-after": "7",
    "x-ratelimit-limit-requests": "500",
    "x-ratelimit-remaining-requests": "0",
    "x-ratelimit-reset-requests": "7s",
    "x-ratelimit-limit-tokens": "200000",
    "x-ratelimit-remaining-tokens": "199950",
    "x-ratelimit-reset-tokens": "15ms",
}

_SPEECH_CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": "audio/pcm",
}
# Each format's usual leading bytes, so that the fake audio is recognisable as such.
_SPEECH_MAGIC = {
    "mp3": b"ID3\x04\x00\x00",
    "opus": b"OggS\x00\x02",
    "aac": b"\xff\xf1\x50\x80",
    "flac": b"fLaC",
    "wav": b"RIFF\x00\x00\x00\x00WAVEfmt ",
    "pcm": b"",
}
_TRANSCRIPTION_FORMATS = ("json", "text", "srt", "verbose_json", "vtt")
# A valid 1x1 transparent PNG.
_PNG_B64 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
_SECONDS_PER_WORD = 0.5  # of fake transcribed speech


@dataclass
class RecordedRequest:
    """A request the fake received, as the gateway sent it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any = None  # the parsed body, when it is JSON
    form_fields: list[tuple[str, str]] = field(default_factory=list)  # multipart text fields
    files: dict[str, UploadedFile] = field(default_factory=dict)  # multipart files

    @property
    def form(self) -> dict[str, str]:
        """The multipart text fields by name (the last one wins for repeated names)."""
        return dict(self.form_fields)

    @property
    def model(self) -> str:
        """The requested model, from the JSON body or the multipart form."""
        if isinstance(self.json, dict):
            return str(self.json.get("model", ""))
        return self.form.get("model", "")


class OpenAIError(Exception):
    """Answered as an HTTP error with OpenAI's error body."""

    def __init__(
        self,
        status: int,
        message: str | None = None,
        *,
        param: str | None = None,
        code: str | EllipsisType | None = ...,  # ...: the status's usual code
        headers: dict[str, str] | None = None,
    ) -> None:
        kind, default_code, default_message = _ERRORS.get(
            status, ("server_error" if status >= 500 else "invalid_request_error", None, "Error.")
        )
        self.status = status
        self.body = {
            "error": {
                "message": message or default_message,
                "type": kind,
                "param": param,
                "code": default_code if code is ... else code,
            }
        }
        self.headers = headers or {}
        super().__init__(self.body["error"]["message"])


@dataclass
class _Reply:
    """What the fake model says in one choice."""

    content: str | None
    finish_reason: str
    tool_calls: list[JSON] = field(default_factory=list)


class FakeOpenAI:
    """A fake OpenAI server. See the module docstring and `SCENARIO_MODELS`.

    Attributes tests may read or set:
      requests: every request received, oldest first (if `record_requests`).
      slow_seconds: how long model "slow" waits before answering.
      chunk_delay: the wait before each chunk of model "stream-slow".
      embedding_dimensions: the vector size when a request gives no `dimensions`.
      connections, cancelled_requests, cancelled_streams, completed_streams: counters
        of TCP connections accepted, of requests whose client hung up before the
        answer, of streams whose client hung up mid-stream, and of streams sent whole.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "sk-fake",
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
        chunk_delay: float = 0.1,
        embedding_dimensions: int = 16,
        record_requests: bool = True,
    ) -> None:
        self.api_key = api_key  # None accepts any or no Authorization header
        self.slow_seconds = slow_seconds
        self.chunk_delay = chunk_delay
        self.embedding_dimensions = embedding_dimensions
        self.record_requests = record_requests
        self.requests: list[RecordedRequest] = []
        # Scripted answers by model, consumed one per request (see `script`).
        self.scripts: dict[str, list[tuple[int, dict[str, str], str | None]]] = {}
        self._http = HttpServer(self._handle, host, port)
        self._ids = itertools.count(1)
        # Streams being sent now, and the most sent at once since the last reset.
        self.open_streams = 0
        self.max_open_streams = 0

    # ----------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    async def __aenter__(self) -> FakeOpenAI:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        return self._http.port

    @property
    def base_url(self) -> str:
        return f"http://{self._http.host}:{self._http.port}/v1"

    def script(
        self, model: str, *statuses: int, headers: dict[str, str] | None = None, message: str | None = None
    ) -> None:
        """The next requests for `model` answer these HTTP statuses in turn (200: the
        normal answer, streamed or not; others: OpenAI's error body, with `message` if
        given, and `headers`); after the script, the model answers normally."""
        entries = [(status, dict(headers or {}), message) for status in statuses]
        self.scripts.setdefault(model, []).extend(entries)

    def reset(self) -> None:
        """Forgets the recorded requests and scripts, and zeroes the counters."""
        self.scripts.clear()
        self.requests.clear()
        self._http.reset_counters()
        self.max_open_streams = self.open_streams

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    @property
    def connections(self) -> int:
        return self._http.connections

    @property
    def cancelled_requests(self) -> int:
        return self._http.cancelled_requests

    @property
    def cancelled_streams(self) -> int:
        return self._http.cancelled_streams

    @property
    def completed_streams(self) -> int:
        return self._http.completed_streams

    async def wait_until(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        """Waits until `predicate()` holds, e.g. until a cancellation has been noticed."""
        async with asyncio.timeout(seconds):
            # Polling: the predicate is arbitrary, so there is no single event to wait on.
            while not predicate():  # noqa: ASYNC110
                await asyncio.sleep(0.01)

    # ------------------------------------------------------------------- routing

    async def _handle(self, request: Request) -> Response:
        recorded = _record(request)
        if self.record_requests:
            self.requests.append(recorded)
        try:
            response = await self._dispatch(request, recorded)
        except OpenAIError as exc:
            response = _json_response(exc.body, exc.status, exc.headers)
        except Exception:  # noqa: BLE001 - a bug in the fake: answer like OpenAI's 500 and log it
            _log.exception("fake OpenAI failed on %s %s", request.method, request.path)
            error = OpenAIError(500)
            response = _json_response(error.body, error.status)
        response.headers.setdefault("x-request-id", f"req_fake{next(self._ids):06d}")
        response.headers.setdefault("openai-processing-ms", "1")
        return response

    async def _dispatch(self, request: Request, recorded: RecordedRequest) -> Response:
        self._check_auth(request)
        if request.method == "GET" and request.path == "/v1/models":
            return _json_response(_model_list())
        if request.method == "GET" and request.path.startswith("/v1/models/"):
            return _json_response(_model_object(request.path.removeprefix("/v1/models/")))
        endpoint = self._endpoints().get((request.method, request.path))
        if endpoint is None:
            raise OpenAIError(404, f"Invalid URL ({request.method} {request.path})", code=None)
        body = _request_body(request, recorded)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _missing("model")
        if early := await self._scenario_response(model, body):
            return early
        return endpoint(body, recorded)

    def _endpoints(self) -> dict[tuple[str, str], Callable[[JSON, RecordedRequest], Response]]:
        return {
            ("POST", "/v1/chat/completions"): self._chat,
            ("POST", "/v1/embeddings"): self._embeddings,
            ("POST", "/v1/images/generations"): self._images,
            ("POST", "/v1/audio/speech"): self._speech,
            ("POST", "/v1/audio/transcriptions"): self._transcriptions,
        }

    def _check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        if not auth:
            message = "You didn't provide an API key. Provide it as 'Authorization: Bearer KEY'."
            raise OpenAIError(401, message, code="invalid_api_key")
        if auth != f"Bearer {self.api_key}":
            shown = auth.removeprefix("Bearer ")[:8]
            raise OpenAIError(401, f"Incorrect API key provided: {shown}***.")

    async def _scenario_response(self, model: str, body: JSON) -> Response | None:
        """Handles the scenarios that apply to every endpoint, by model name."""
        if script := self.scripts.get(model):
            status, headers, message = script.pop(0)
            if status != 200:
                raise OpenAIError(status, message, headers=headers)
        if match := re.fullmatch(r"error-(\d{3})", model):
            status = int(match.group(1))
            headers = dict(_RATE_LIMIT_HEADERS) if status == 429 else {}
            message = f"The model `{model}` does not exist or you do not have access to it." if status == 404 else None
            raise OpenAIError(status, message, headers=headers)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "malformed":
            if body.get("stream"):
                return _sse_response(_events([b'data: {"id": "chatcmpl-broken", "choices": [\n\n']))
            return Response(200, b'{"id": "chatcmpl-broken", "choices": [')
        return None

    # ---------------------------------------------------------------------- chat

    def _chat(self, body: JSON, _: RecordedRequest) -> Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise _missing("messages")
        model = body["model"]
        reply = _plan_reply(model, body)
        n = int(body.get("n") or 1)
        usage = _chat_usage(messages, reply)
        completion_id = f"chatcmpl-fake{next(self._ids):06d}"
        top = int(body.get("top_logprobs") or 0) if body.get("logprobs") else None
        if not body.get("stream"):
            return _json_response(_completion(completion_id, model, reply, n, usage, top))
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = _completion_chunks(completion_id, model, reply, n, usage if include_usage else None, top)
        events = [b"data: " + json.dumps(chunk).encode() + b"\n\n" for chunk in chunks]
        return _sse_response(self._stream_events(model, events))

    async def _stream_events(self, model: str, events: list[bytes]) -> AsyncGenerator[bytes, None]:
        """Sends the SSE events, cut short or slowed down as the model name asks."""
        self.open_streams += 1
        self.max_open_streams = max(self.max_open_streams, self.open_streams)
        try:
            async for event in self._stream_body(model, events):
                yield event
        finally:
            self.open_streams -= 1

    async def _stream_body(self, model: str, events: list[bytes]) -> AsyncGenerator[bytes, None]:
        if model == "stream-burst":
            yield b"".join(events) + b"data: [DONE]\n\n"
            return
        broken = model in ("stream-cut", "stream-error", "stream-stall", "stream-trickle")
        for event in events[:2] if broken else events:
            if model == "stream-slow":
                await asyncio.sleep(self.chunk_delay)
            yield event
        if model == "stream-cut":
            raise AbortConnection
        if model == "stream-stall":
            await asyncio.Event().wait()  # the server cancels this when the client leaves
        while model == "stream-trickle":
            await asyncio.sleep(0.2)
            yield b": still thinking\n\n"
        if model == "stream-error":
            error = OpenAIError(500, "The model crashed mid-stream (stream-error).")
            yield b"data: " + json.dumps(error.body).encode() + b"\n\n"
            return
        yield b"data: [DONE]\n\n"

    # ---------------------------------------------------------------- embeddings

    def _embeddings(self, body: JSON, _: RecordedRequest) -> Response:
        inputs = _embedding_inputs(body.get("input"))
        dimensions = body.get("dimensions") or self.embedding_dimensions
        if not isinstance(dimensions, int) or dimensions < 1:
            raise OpenAIError(400, "'dimensions' must be a positive integer.", param="dimensions")
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise OpenAIError(400, f"Invalid encoding_format: {encoding!r}.", param="encoding_format")
        data = []
        for index, item in enumerate(inputs):
            vector = _embedding_vector(item, dimensions)
            embedding: Any = vector if encoding == "float" else _b64_floats(vector)
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        tokens = sum(len(item) if isinstance(item, list) else _count_words(item) for item in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return _json_response({"object": "list", "data": data, "model": body["model"], "usage": usage})

    # -------------------------------------------------------------------- images

    def _images(self, body: JSON, _: RecordedRequest) -> Response:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise _missing("prompt")
        response_format = body.get("response_format") or "url"
        token_billed = str(body.get("model", "")).startswith("gpt-image")
        if token_billed:
            # OpenAI's gpt-image models take no response_format and always answer base64.
            if "response_format" in body:
                raise OpenAIError(400, "Unknown parameter: 'response_format'.", param="response_format")
            response_format = "b64_json"
        if response_format not in ("url", "b64_json"):
            raise OpenAIError(400, f"Invalid response_format: {response_format!r}.", param="response_format")
        digest = hashlib.sha256(prompt.encode()).hexdigest()[:16]
        images: list[JSON] = []
        for index in range(int(body.get("n") or 1)):
            if response_format == "url":
                images.append({"url": f"https://images.fake-openai.invalid/{digest}-{index}.png"})
            else:
                images.append({"b64_json": _PNG_B64})
        answer: JSON = {"created": CREATED, "data": images}
        if token_billed:
            answer.update(_gpt_image_details(body, prompt, len(images)))
        return _json_response(answer)

    # --------------------------------------------------------------------- audio

    def _speech(self, body: JSON, _: RecordedRequest) -> Response:
        text, voice = body.get("input"), body.get("voice")
        if not isinstance(text, str) or not text:
            raise _missing("input")
        if not voice:
            raise _missing("voice")
        fmt = body.get("response_format") or "mp3"
        if fmt not in _SPEECH_CONTENT_TYPES:
            raise OpenAIError(400, f"Invalid response_format: {fmt!r}.", param="response_format")
        audio = _SPEECH_MAGIC[fmt] + f"|{body['model']}|{voice}|{text}".encode()
        # OpenAI streams speech with chunked transfer encoding; so does the fake.
        pieces = [audio[i : i + 1024] for i in range(0, len(audio), 1024)]
        return Response(200, content_type=_SPEECH_CONTENT_TYPES[fmt], stream=_events(pieces))

    def _transcriptions(self, body: JSON, recorded: RecordedRequest) -> Response:
        upload = recorded.files.get("file")
        if upload is None:
            raise _missing("file")
        fmt = body.get("response_format") or "json"
        if fmt not in _TRANSCRIPTION_FORMATS:
            raise OpenAIError(400, f"Invalid response_format: {fmt!r}.", param="response_format")
        text = _transcript(upload.data)
        granularities = [v for k, v in recorded.form_fields if k == "timestamp_granularities[]"]
        # The gpt-4o transcribe models answer json or text only, and bill tokens.
        by_tokens = "transcribe" in str(body.get("model"))
        if by_tokens and fmt not in ("json", "text"):
            message = (
                f"response_format '{fmt}' is not compatible with model '{body.get('model')}'. Use 'json' or 'text'."
            )
            raise OpenAIError(400, message, param="response_format", code="unsupported_value")
        if fmt == "json":
            return _json_response({"text": text, "usage": _token_usage(text) if by_tokens else _audio_usage(text)})
        if fmt == "verbose_json":
            return _json_response(_verbose_transcription(text, body.get("language"), granularities))
        subtitles = {"text": text + "\n", "srt": _srt(text), "vtt": _vtt(text)}[fmt]
        # OpenAI answers text, srt and vtt alike as text/plain.
        return Response(200, subtitles.encode(), "text/plain; charset=utf-8")


# ------------------------------------------------------------------ request parsing


def _gpt_image_details(body: JSON, prompt: str, images: int) -> JSON:
    """What gpt-image models add to the answer: the settings used and ImageGenUsage
    (a word per prompt token, IMAGE_OUTPUT_TOKENS per image)."""
    text_tokens = _count_words(prompt)
    output_tokens = IMAGE_OUTPUT_TOKENS * images
    return {
        "background": body.get("background") or "opaque",
        "output_format": body.get("output_format") or "png",
        "quality": body.get("quality") or "high",
        "size": body.get("size") or "1024x1024",
        "usage": {
            "input_tokens": text_tokens,
            "input_tokens_details": {"image_tokens": 0, "text_tokens": text_tokens},
            "output_tokens": output_tokens,
            "total_tokens": text_tokens + output_tokens,
        },
    }


def _record(request: Request) -> RecordedRequest:
    recorded = RecordedRequest(request.method, request.path, request.query, request.headers, request.body)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        with contextlib.suppress(ValueError):
            recorded.json = json.loads(request.body)
    elif content_type.startswith("multipart/form-data"):
        with contextlib.suppress(ValueError):
            recorded.form_fields, recorded.files = parse_multipart(request.body, content_type)
    return recorded


def _request_body(request: Request, recorded: RecordedRequest) -> JSON:
    """The request's parameters: its JSON object, or its multipart text fields."""
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        return recorded.form
    if not isinstance(recorded.json, dict):
        raise OpenAIError(
            400,
            "We could not parse the JSON body of your request. (HINT: This likely means you "
            "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)",
        )
    return recorded.json


def _missing(param: str) -> OpenAIError:
    return OpenAIError(
        400,
        f"Missing required parameter: '{param}'.",
        param=param,
        code="missing_required_parameter",
    )


def _count_words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text parts of a part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text"]
        return " ".join(parts)
    return ""


# ----------------------------------------------------------------------- chat replies


def _plan_reply(model: str, body: JSON) -> _Reply:
    messages: list[JSON] = body["messages"]
    if model in ("tools", "tools-parallel"):
        tool_results = _trailing_tool_results(messages)
        if tool_results:
            return _Reply("tool result: " + " | ".join(tool_results), "stop")
        if body.get("tools"):
            return _Reply(None, "tool_calls", _tool_calls(body["tools"], model == "tools-parallel"))
    user_text = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"echo: {user_text}"
    if model == "length":
        return _Reply(" ".join(text.split()[:2]), "length")  # as if max_tokens were 2
    if model == "content-filter":
        return _Reply(None, "content_filter")
    if (body.get("response_format") or {}).get("type") in ("json_object", "json_schema"):
        return _Reply(json.dumps({"echo": user_text}), "stop")
    return _Reply(text, "stop")


def _trailing_tool_results(messages: list[JSON]) -> list[str]:
    """The contents of the "tool" messages that end the conversation, in order."""
    results: list[str] = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, _text_of(message.get("content")))
    return results


def _tool_calls(tools: list[JSON], parallel: bool) -> list[JSON]:
    cities = ["Paris", "London"] if parallel else ["Paris"]
    calls = []
    for index, city in enumerate(cities):
        name = tools[index % len(tools)].get("function", {}).get("name", "")
        calls.append(
            {
                "id": f"call_fake{index}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps({"city": city})},
            }
        )
    return calls


def _chat_usage(messages: list[JSON], reply: _Reply) -> JSON:
    prompt = sum(_count_words(_text_of(m.get("content"))) for m in messages)
    completion = _count_words(reply.content) + sum(
        _count_words(call["function"]["arguments"]) for call in reply.tool_calls
    )
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _completion(completion_id: str, model: str, reply: _Reply, n: int, usage: JSON, top: int | None) -> JSON:
    message: JSON = {"role": "assistant", "content": reply.content, "refusal": None, "annotations": []}
    if reply.tool_calls:
        message["tool_calls"] = reply.tool_calls
    logprobs = None if top is None else _logprobs(_words(reply.content or ""), top)
    choices = [
        {"index": i, "message": message, "logprobs": logprobs, "finish_reason": reply.finish_reason} for i in range(n)
    ]
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": CREATED,
        "model": model,
        "choices": choices,
        "usage": usage,
        "service_tier": "default",
        "system_fingerprint": "fp_fake",
    }


def _logprobs(tokens: list[str], top: int) -> JSON:
    """OpenAI's `choices[].logprobs` for `tokens` (a word each), with `top` alternatives
    per position: the token itself first, then made-up, less likely ones."""

    def entry(token: str, logprob: float) -> JSON:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    content = []
    for position, token in enumerate(tokens):
        logprob = -0.25 * (position % 4)
        alternatives = [entry(token, logprob)] + [entry(f"alt{k}", logprob - k) for k in range(1, top)]
        content.append({**entry(token, logprob), "top_logprobs": alternatives[:top]})
    return {"content": content, "refusal": None}


def _words(text: str) -> list[str]:
    return re.findall(r"\S+\s*", text)


def _completion_chunks(
    completion_id: str, model: str, reply: _Reply, n: int, usage: JSON | None, top: int | None = None
) -> list[JSON]:
    """The `chat.completion.chunk` objects of a streamed reply, as OpenAI sends them.

    With `usage` (stream_options.include_usage), every chunk has "usage": null and a
    last chunk with no choices carries the usage.
    """

    def chunk(choices: list[JSON]) -> JSON:
        obj: JSON = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": model,
            "service_tier": "default",
            "system_fingerprint": "fp_fake",
            "choices": choices,
        }
        if usage is not None:
            obj["usage"] = None
        return obj

    def logprobs(delta: JSON) -> JSON | None:
        piece = delta.get("content")
        return _logprobs([piece], top) if top is not None and piece else None

    chunks = [
        chunk([{"index": i, "delta": delta, "logprobs": logprobs(delta), "finish_reason": finish}])
        for i in range(n)
        for delta, finish in _deltas(reply)
    ]
    if usage is not None:
        chunks.append({**chunk([]), "usage": usage})
    return chunks


def _deltas(reply: _Reply) -> list[tuple[JSON, str | None]]:
    """One choice's deltas with their finish_reason (set on the last one only)."""
    deltas: list[JSON]
    if reply.tool_calls:
        deltas = []
        for index, call in enumerate(reply.tool_calls):
            # The first piece of a call names it; later pieces carry argument fragments.
            head = {
                "index": index,
                "id": call["id"],
                "type": "function",
                "function": {"name": call["function"]["name"], "arguments": ""},
            }
            deltas.append(
                {"role": "assistant", "content": None, "tool_calls": [head]} if index == 0 else {"tool_calls": [head]}
            )
            arguments = call["function"]["arguments"]
            deltas += [
                {"tool_calls": [{"index": index, "function": {"arguments": arguments[i : i + 5]}}]}
                for i in range(0, len(arguments), 5)
            ]
    else:
        pieces = _words(reply.content or "")
        deltas = [{"role": "assistant", "content": "", "refusal": None}]
        deltas += [{"content": piece} for piece in pieces]
    return [(delta, None) for delta in deltas] + [({}, reply.finish_reason)]


# -------------------------------------------------------------------------- embeddings


def _embedding_inputs(value: Any) -> list[str | list[int]]:
    """Normalises `input`: a string, a list of strings, a token array or a list of them."""
    one_token_array = isinstance(value, list) and value and all(isinstance(v, int) for v in value)
    if isinstance(value, str) or one_token_array:
        value = [value]
    if not isinstance(value, list) or not value:
        raise _missing("input")
    for item in value:
        if not (isinstance(item, str) and item) and not (isinstance(item, list) and item):
            raise OpenAIError(400, "'$.input' is invalid. Please check the API reference.", param="input")
    return value


def _embedding_vector(item: str | list[int], dimensions: int) -> list[float]:
    """A deterministic unit vector for `item`, with float32 values like OpenAI's."""
    seed = int.from_bytes(hashlib.sha256(json.dumps(item).encode()).digest()[:8], "little")
    rng = random.Random(seed)
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    packed = struct.pack(f"<{dimensions}f", *(v / norm for v in values))
    return list(struct.unpack(f"<{dimensions}f", packed))


def _b64_floats(vector: list[float]) -> str:
    """OpenAI's `encoding_format: base64`: little-endian float32 values, base64-encoded."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


# ------------------------------------------------------------------------------ audio


def _transcript(audio: bytes) -> str:
    """The fake transcript: the upload itself when it is text, so tests can choose it."""
    try:
        text = audio.decode("utf-8").strip()
    except UnicodeDecodeError:
        text = ""
    return text if text.isprintable() and text else f"fake transcript of {len(audio)} bytes"


def _audio_usage(text: str) -> JSON:
    return {"type": "duration", "seconds": math.ceil(_duration(text))}


def _token_usage(text: str) -> JSON:
    audio_tokens = 10 * max(1, _count_words(text))
    output_tokens = _count_words(text)
    return {
        "type": "tokens",
        "input_tokens": audio_tokens,
        "input_token_details": {"text_tokens": 0, "audio_tokens": audio_tokens},
        "output_tokens": output_tokens,
        "total_tokens": audio_tokens + output_tokens,
    }


def _duration(text: str) -> float:
    return max(1, _count_words(text)) * _SECONDS_PER_WORD


def _verbose_transcription(text: str, language: str | None, granularities: list[str]) -> JSON:
    duration = _duration(text)
    result: JSON = {
        "task": "transcribe",
        "language": "english" if language in (None, "", "en") else language,
        "duration": duration,
        "text": text,
        "usage": _audio_usage(text),
    }
    if "word" in granularities:
        result["words"] = [
            {"word": word, "start": i * _SECONDS_PER_WORD, "end": (i + 1) * _SECONDS_PER_WORD}
            for i, word in enumerate(text.split())
        ]
    if "segment" in granularities or not granularities:
        result["segments"] = [
            {
                "id": 0,
                "seek": 0,
                "start": 0.0,
                "end": duration,
                "text": " " + text,
                "tokens": list(range(50364, 50364 + _count_words(text))),
                "temperature": 0.0,
                "avg_logprob": -0.2,
                "compression_ratio": 1.0,
                "no_speech_prob": 0.01,
            }
        ]
    return result


def _timestamp(seconds: float, separator: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{millis:03d}"


def _srt(text: str) -> str:
    end = _timestamp(_duration(text), ",")
    return f"1\n00:00:00,000 --> {end}\n{text}\n\n"


def _vtt(text: str) -> str:
    end = _timestamp(_duration(text), ".")
    return f"WEBVTT\n\n00:00:00.000 --> {end}\n{text}\n\n"


# ----------------------------------------------------------------------------- models


def _model_object(model_id: str) -> JSON:
    owner = "openai" if model_id in _NORMAL_MODELS else "fake-openai"
    return {"id": model_id, "object": "model", "created": CREATED, "owned_by": owner}


def _model_list() -> JSON:
    return {"object": "list", "data": [_model_object(m) for m in _NORMAL_MODELS + SCENARIO_MODELS]}


# --------------------------------------------------------------------------- responses


def _json_response(body: JSON, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(status, json.dumps(body).encode(), "application/json", dict(headers or {}))


def _sse_response(events: AsyncGenerator[bytes, None]) -> Response:
    return Response(200, content_type="text/event-stream; charset=utf-8", stream=events)


async def _events(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


# ---------------------------------------------------------------------------- the CLI


async def _serve_forever(args: argparse.Namespace) -> None:
    server = FakeOpenAI(
        api_key=args.api_key or None,
        host=args.host,
        port=args.port,
        slow_seconds=args.slow_seconds,
        chunk_delay=args.chunk_delay,
        # Nobody can read the record of a standalone server; don't grow it forever.
        record_requests=False,
    )
    await server.start()
    print(f"fake OpenAI listening on {server.base_url}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await server.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake OpenAI upstream.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8099, help="0 picks a free port")
    parser.add_argument("--api-key", default="sk-fake", help='"" accepts any key')
    parser.add_argument("--slow-seconds", type=float, default=5.0)
    parser.add_argument("--chunk-delay", type=float, default=0.1)
    args = parser.parse_args(argv)
    try:
        import uvloop  # a project dependency: a faster loop, for benchmarks
    except ImportError:
        asyncio.run(_serve_forever(args))
    else:
        uvloop.run(_serve_forever(args))


if __name__ == "__main__":
    main()
