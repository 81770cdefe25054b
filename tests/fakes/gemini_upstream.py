"""A fake Gemini Developer API on loopback that speaks Google's wire format, for tests.

In a test::

    fake = FakeGemini(api_key="gm-fake")
    await fake.start()      # fake.base_url == "http://127.0.0.1:PORT" (no version, like
    ...                     # the SDK's GOOGLE_GEMINI_BASE_URL)
    assert fake.last_request.json["contents"][0]["role"] == "user"
    await fake.stop()

Endpoints, all POST, the key in `x-goog-api-key` (or `?key=`):
    /v1beta/models/{model}:generateContent
    /v1beta/models/{model}:streamGenerateContent?alt=sse   one GenerateContentResponse per event
    /v1beta/models/{model}:embedContent
    /v1beta/models/{model}:batchEmbedContents
    /v1beta/models/{model}:countTokens                     totalTokens: the words of the text parts

Like the real API it refuses, with 400 INVALID_ARGUMENT, request fields it does not know:
each part of a body is validated against the official google-genai SDK's types, which
forbid unknown fields (and check base64 in `data` and `thoughtSignature`). A wrong key is
answered as Google does, 400 with ErrorInfo reason API_KEY_INVALID; a missing one 403.

Thought signatures: on the "tools" models the first functionCall part of each call turn
carries a thoughtSignature. When a request answers a call turn with functionResponse
parts, that turn must carry back a signature the fake issued on its first functionCall
part, as Gemini 3 requires, and every call must be answered by name (and by id, when the
call had one), as Gemini requires; otherwise 400.

Behaviour is chosen by the model name (see `SCENARIO_MODELS`). Other models answer
"echo: <last user text>" (`{"echo": ...}` with responseMimeType application/json), with
usage counted in words.

Image generation (generateContent with `generationConfig.responseModalities` holding
"IMAGE") works on models whose name contains "image" (see `IMAGE_SCENARIO_MODELS`); other
models refuse the modality. Like the real image models they refuse candidateCount > 1 and,
in `imageConfig`, anything but aspectRatio (one of `IMAGE_ASPECT_RATIOS`) and imageSize
(1K, 2K, 4K): personGeneration, outputMimeType and the like are Vertex-only. An image is a
real PNG of `IMAGE_UNIT` pixels per ratio unit (times 2 at 2K, 4 at 4K), e.g. 16:9 ->
128x72, carrying tEXt chunks "prompt" (the request's text) and "serial" (1, 2, ... per
fake), with usage IMAGE_TOKENS per image.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import math
import random
import re
import secrets
import struct
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import pydantic
from google.genai import types

from tests.fakes._http import AbortConnection, HttpServer, Request, Response

JSON = dict[str, Any]

SCENARIO_MODELS = (
    "tools",  # calls the first declared (or allowed) function with {"city": "Paris"}
    "tools-parallel",  # two calls in one turn, with ids "fc-1" and "fc-2"
    "length",  # the reply cut to 2 words, finishReason MAX_TOKENS
    "safety",  # finishReason SAFETY, no content
    "recitation",  # finishReason RECITATION, no content
    "blocked",  # promptFeedback.blockReason SAFETY, no candidates
    "thinking",  # a thought part, then the echo; thoughtsTokenCount and cachedContentTokenCount
    "error-400",  # "error-NNN": that HTTP status with Google's error body
    "error-401",
    "error-403",
    "error-404",
    "error-429",  # with a RetryInfo detail, retryDelay "7s" (and no retry-after header)
    "error-500",
    "error-503",
    "error-504",
    "malformed",  # 200 with a body (or SSE event) that is not JSON
    "slow",  # waits fake.slow_seconds before answering
    "stream-cut",  # 2 events, then the connection drops
    "stream-error",  # 2 events, then a bare pretty-printed JSON error, as Google sends it
    "stream-error-event",  # 2 events, then `data: {"error": ...}`
    "stream-truncated",  # 2 events, then a clean end without any finishReason
    "stream-slow",  # waits fake.chunk_delay before each event
)
TOOL_ARGS = {"city": "Paris"}
RETRY_DELAY_SECONDS = 7
THOUGHT_TOKENS = 12
CACHED_TOKENS = 3
IMAGE_SCENARIO_MODELS = (
    "gemini-3.1-flash-image",  # any name containing "image": one PNG
    "image-thinking",  # a thought text and a thought (draft) image before the final image
    "image-two",  # two final images in one candidate
    "image-blocked",  # promptFeedback.blockReason PROHIBITED_CONTENT, no candidates
    "image-safety",  # finishReason IMAGE_SAFETY with a finishMessage, no content
    "image-no-image",  # finishReason NO_IMAGE with a text part
    "image-bad-base64",  # inlineData.data that is not base64
)
IMAGE_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_UNIT = 8
IMAGE_TOKENS = 1290  # what Google documents for one 1K image
IMAGE_SAFETY_MESSAGE = "The generated image was blocked by the image safety filter."
NO_IMAGE_TEXT = "I can describe a cat, but I was not able to draw one."

_STATUSES = {
    400: ("INVALID_ARGUMENT", "Request contains an invalid argument."),
    401: (
        "UNAUTHENTICATED",
        "Request had invalid authentication credentials. Expected OAuth 2 access token, login cookie "
        "or other valid authentication credential.",
    ),
    403: ("PERMISSION_DENIED", "The caller does not have permission"),
    404: ("NOT_FOUND", "{model} is not found for API version v1beta, or is not supported for {method}."),
    429: (
        "RESOURCE_EXHAUSTED",
        "You exceeded your current quota, please check your plan and billing details. For more "
        "information on this error, head to: https://ai.google.dev/gemini-api/docs/rate-limits.",
    ),
    500: (
        "INTERNAL",
        "An internal error has occurred. Please retry or report in "
        "https://developers.generativeai.google/guide/troubleshooting",
    ),
    503: ("UNAVAILABLE", "The model is overloaded. Please try again later."),
    504: ("DEADLINE_EXCEEDED", "Deadline expired before operation could complete."),
}


class _WireGenerationConfig(types.GenerationConfig):
    """GenerationConfig as the Developer API takes it: the SDK's type lacks the
    `imageConfig` that the SDK itself sends (GenerateContentConfig.image_config)."""

    image_config: types.ImageConfig | None = None


_REQUEST_FIELDS: dict[str, tuple[str, Any]] = {
    # wire name (camelCase; the API also takes the proto's snake_case) -> (canonical, SDK type)
    "contents": ("contents", list[types.Content]),
    "systemInstruction": ("systemInstruction", types.Content),
    "tools": ("tools", list[types.Tool]),
    "toolConfig": ("toolConfig", types.ToolConfig),
    "generationConfig": ("generationConfig", _WireGenerationConfig),
    "safetySettings": ("safetySettings", list[types.SafetySetting]),
    "cachedContent": ("cachedContent", str),
}
_EMBED_FIELDS: dict[str, tuple[str, Any]] = {
    "model": ("model", str),
    "content": ("content", types.Content),
    "taskType": ("taskType", str),
    "title": ("title", str),
    "outputDimensionality": ("outputDimensionality", int),
}
_SAFETY_RATINGS = [
    {"category": "HARM_CATEGORY_HATE_SPEECH", "probability": "NEGLIGIBLE"},
    {"category": "HARM_CATEGORY_DANGEROUS_CONTENT", "probability": "HIGH", "blocked": True},
]


def _snake(name: str) -> str:
    return re.sub(r"([A-Z])", lambda m: "_" + m.group(1).lower(), name)


@dataclass
class RecordedRequest:
    """A request the fake received, as the gateway sent it."""

    method: str
    path: str
    query: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    json: Any = None


class GoogleError(Exception):
    """Answered as an HTTP error with Google's error body."""

    def __init__(self, code: int, message: str | None = None, details: list[JSON] | None = None) -> None:
        status, default = _STATUSES.get(code, ("UNKNOWN", "Unknown error."))
        self.code = code
        self.body: JSON = {"error": {"code": code, "message": message or default, "status": status}}
        if details:
            self.body["error"]["details"] = details
        super().__init__(self.body["error"]["message"])


@dataclass
class _Reply:
    """What the fake model answers, the same in every candidate."""

    text: str | None
    finish: str
    calls: list[JSON] = field(default_factory=list)  # functionCall objects
    thought: str | None = None
    blocked: str | None = None  # promptFeedback.blockReason


class FakeGemini:
    """A fake Gemini server. See the module docstring and `SCENARIO_MODELS`.

    Attributes tests may read or set: `requests` (oldest first), `signatures` (the thought
    signatures issued), `slow_seconds`, `chunk_delay`, `embedding_dimensions` and the
    counters `cancelled_streams`, `completed_streams`.
    """

    def __init__(
        self,
        *,
        api_key: str | None = "gm-fake",
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
        chunk_delay: float = 0.1,
        embedding_dimensions: int = 16,
    ) -> None:
        self.api_key = api_key  # None accepts any or no key
        self.slow_seconds = slow_seconds
        self.chunk_delay = chunk_delay
        self.embedding_dimensions = embedding_dimensions
        self.requests: list[RecordedRequest] = []
        self.signatures: list[str] = []
        self.images_drawn = 0
        # When set, countTokens answers 503 (the gateway must still answer embeddings).
        self.count_tokens_down = False
        self._http = HttpServer(self._handle, host, port)
        self._ids = itertools.count(1)

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self._http.host}:{self._http.port}"

    @property
    def last_request(self) -> RecordedRequest:
        return self.requests[-1]

    @property
    def cancelled_streams(self) -> int:
        return self._http.cancelled_streams

    @property
    def completed_streams(self) -> int:
        return self._http.completed_streams

    def reset(self) -> None:
        self.requests.clear()
        self._http.reset_counters()

    # ------------------------------------------------------------------- routing

    async def _handle(self, request: Request) -> Response:
        recorded = RecordedRequest(request.method, request.path, request.query, request.headers, request.body)
        with contextlib.suppress(ValueError):
            recorded.json = json.loads(request.body) if request.body else None
        self.requests.append(recorded)
        try:
            return await self._dispatch(request, recorded.json)
        except GoogleError as exc:
            return _json_response(exc.body, exc.code)

    async def _dispatch(self, request: Request, body: Any) -> Response:
        if (request.method, request.path) == ("GET", "/v1beta/models"):  # the gateway's credential probe
            self._check_key(request)
            return _json_response({"models": [_model_entry(m) for m in MODEL_LIST]}, 200)
        match = re.fullmatch(r"/v1beta/models/([^/:]+):(\w+)", request.path)
        endpoints = {
            "generateContent": self._generate,
            "streamGenerateContent": self._stream,
            "embedContent": self._embed,
            "batchEmbedContents": self._batch_embed,
            "countTokens": self._count_tokens,
        }
        if request.method != "POST" or not match or match.group(2) not in endpoints:
            raise GoogleError(404, f"Method not found: {request.method} {request.path}")
        self._check_key(request)
        if not isinstance(body, dict):
            raise GoogleError(400, "Invalid JSON payload received. Expected an object.")
        model, method = match.groups()
        if early := await self._scenario_response(model, method, request):
            return early
        return endpoints[method](model, body, request)

    def _check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        key = request.headers.get("x-goog-api-key") or (parse_qs(request.query).get("key") or [""])[0]
        if not key:
            raise GoogleError(
                403,
                "Method doesn't allow unregistered callers (callers without established identity). "
                "Please use API Key or other form of API consumer identity to call this API.",
            )
        if key != self.api_key:
            message = "API key not valid. Please pass a valid API key."
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                    "metadata": {"service": "generativelanguage.googleapis.com"},
                },
                {"@type": "type.googleapis.com/google.rpc.LocalizedMessage", "locale": "en-US", "message": message},
            ]
            raise GoogleError(400, message, details)

    async def _scenario_response(self, model: str, method: str, request: Request) -> Response | None:
        if match := re.fullmatch(r"error-(\d{3})", model):
            code = int(match.group(1))
            message = _STATUSES.get(code, ("", None))[1]
            if code == 404 and message:
                message = message.format(model=f"models/{model}", method=method)
            raise GoogleError(code, message, _rate_limit_details(model) if code == 429 else None)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "malformed":
            if method == "streamGenerateContent":
                return _sse_response(_items([b'data: {"candidates": [{"content": \r\n\r\n']))
            return Response(200, b'{"candidates": [{"content": ')
        return None

    # ------------------------------------------------------------- generation

    def _generate(self, model: str, body: JSON, _: Request) -> Response:
        request = self._checked_request(body)
        if "IMAGE" in (request.get("generationConfig") or {}).get("responseModalities", []):
            return _json_response(self._image_response(model, request))
        reply = self._plan(model, request)
        n = int(request.get("generationConfig", {}).get("candidateCount") or 1)
        return _json_response(self._response(model, request, reply, n, self._response_id()))

    def _stream(self, model: str, body: JSON, request: Request) -> Response:
        if parse_qs(request.query).get("alt") != ["sse"]:
            raise GoogleError(400, "This fake streams server-sent events only: add ?alt=sse.")
        checked = self._checked_request(body)
        reply = self._plan(model, checked)
        n = int(checked.get("generationConfig", {}).get("candidateCount") or 1)
        events = self._events(model, checked, reply, n)
        return _sse_response(self._send_events(model, [_sse(event) for event in events]))

    def _response_id(self) -> str:
        return f"fakeResp{next(self._ids):06d}"

    def _checked_request(self, body: JSON) -> JSON:
        """The body with canonical field names, validated like the API does."""
        request = _validated(body, _REQUEST_FIELDS, "GenerateContentRequest")
        contents = request.get("contents")
        if not contents:
            raise GoogleError(400, "* GenerateContentRequest.contents: contents is not specified")
        for index, content in enumerate(contents):
            if content.get("role") not in ("user", "model"):
                raise GoogleError(400, "Please use a valid role: user, model.")
            if not content.get("parts"):
                raise GoogleError(
                    400, f"* GenerateContentRequest.contents[{index}].parts: contents.parts must not be empty."
                )
        self._check_function_turn(contents)
        return request

    def _check_function_turn(self, contents: list[JSON]) -> None:
        """A last user turn of function responses must answer the model turn before it."""
        responses = [p["functionResponse"] for p in _parts(contents[-1]) if "functionResponse" in p]
        if not responses:
            return
        calls_turn = contents[-2] if len(contents) > 1 and contents[-2].get("role") == "model" else {}
        call_parts = [p for p in _parts(calls_turn) if "functionCall" in p]
        if not call_parts:
            raise GoogleError(400, "Function response parts must follow a turn of function call parts.")
        if _signature_bytes(call_parts[0].get("thoughtSignature")) not in map(_signature_bytes, self.signatures):
            name = call_parts[0]["functionCall"].get("name")
            raise GoogleError(
                400,
                f"Function call is missing a thought_signature in functionCall parts. Additional data, "
                f"function call `default_api:{name}`. Please refer to "
                "https://ai.google.dev/gemini-api/docs/thought-signatures for more details.",
            )
        calls = [p["functionCall"] for p in call_parts]
        answered = sorted((r.get("name"), r.get("id")) for r in responses)
        if answered != sorted((c.get("name"), c.get("id")) for c in calls):
            raise GoogleError(
                400,
                "Please ensure that the number of function response parts is equal to the number of "
                "function call parts of the function call turn, and that they match by name and id.",
            )

    def _plan(self, model: str, request: JSON) -> _Reply:
        contents = request["contents"]
        if model in ("tools", "tools-parallel"):
            results = [p["functionResponse"] for p in _parts(contents[-1]) if "functionResponse" in p]
            if results:
                rendered = " | ".join(json.dumps(r.get("response"), sort_keys=True) for r in results)
                return _Reply("tool result: " + rendered, "STOP")
            if names := _callable_names(request):
                return _Reply(None, "STOP", self._calls(names, parallel=model == "tools-parallel"))
        user_text = next((_text(c) for c in reversed(contents) if c["role"] == "user" and _text(c)), "")
        text = f"echo: {user_text}"
        if model == "length":
            return _Reply(" ".join(text.split()[:2]), "MAX_TOKENS")
        if model in ("safety", "recitation"):
            return _Reply(None, model.upper())
        if model == "blocked":
            return _Reply(None, "", blocked="SAFETY")
        if request.get("generationConfig", {}).get("responseMimeType") == "application/json":
            text = json.dumps({"echo": user_text})
        return _Reply(text, "STOP", thought="Let me think about it." if model == "thinking" else None)

    def _calls(self, names: list[str], parallel: bool) -> list[JSON]:
        cities = ["Paris", "London"] if parallel else ["Paris"]
        calls: list[JSON] = []
        for index, city in enumerate(cities):
            call: JSON = {"name": names[index % len(names)], "args": {"city": city}}
            if parallel:
                call["id"] = f"fc-{index + 1}"
            calls.append(call)
        return calls

    def _new_signature(self) -> str:
        # Real signatures are opaque base64; `+`, `/` and `=` test that they survive as is.
        signature = base64.b64encode(b"\xfb\xff" + secrets.token_bytes(31)).decode()
        self.signatures.append(signature)
        return signature

    def _reply_parts(self, reply: _Reply) -> list[JSON]:
        """All of the reply's parts; the first call (or a thinking answer) is signed."""
        parts: list[JSON] = []
        if reply.thought:
            parts.append({"text": reply.thought, "thought": True})
        if reply.text is not None:
            parts.append({"text": reply.text})
        for index, call in enumerate(reply.calls):
            part: JSON = {"functionCall": call}
            if index == 0:
                part["thoughtSignature"] = self._new_signature()
            parts.append(part)
        if reply.thought:
            parts[-1]["thoughtSignature"] = self._new_signature()
        return parts

    def _response(self, model: str, request: JSON, reply: _Reply, n: int, response_id: str) -> JSON:
        response: JSON = {"modelVersion": model, "responseId": response_id}
        if reply.blocked:
            response["promptFeedback"] = {"blockReason": reply.blocked, "safetyRatings": _SAFETY_RATINGS}
        else:
            response["candidates"] = [_candidate(i, self._reply_parts(reply), reply.finish) for i in range(n)]
        response["usageMetadata"] = _usage(request, reply, n, final=True)
        return response

    def _events(self, model: str, request: JSON, reply: _Reply, n: int) -> list[JSON]:
        """The stream's events: text a word at a time, calls whole, finishReason last."""
        response_id = self._response_id()
        if reply.blocked or not reply.text:
            return [self._response(model, request, reply, n, response_id)]
        parts = self._reply_parts(reply)
        pieces: list[list[JSON]] = [[p] for p in parts if p.get("thought")]
        answer = next(p for p in parts if not p.get("thought"))
        words = re.findall(r"\S+\s*", answer["text"]) or [""]
        pieces += [[{"text": word}] for word in words]
        if "thoughtSignature" in answer:
            pieces[-1][0]["thoughtSignature"] = answer["thoughtSignature"]
        events = []
        for index, piece in enumerate(pieces):
            last = index == len(pieces) - 1
            events.append(
                {
                    "candidates": [_candidate(i, piece, reply.finish if last else None) for i in range(n)],
                    "usageMetadata": _usage(request, reply, n, final=last),
                    "modelVersion": model,
                    "responseId": response_id,
                }
            )
        return events

    async def _send_events(self, model: str, events: list[bytes]) -> AsyncGenerator[bytes, None]:
        broken = model in ("stream-cut", "stream-error", "stream-error-event", "stream-truncated")
        for event in events[:2] if broken else events:
            if model == "stream-slow":
                await asyncio.sleep(self.chunk_delay)
            yield event
        if model == "stream-cut":
            raise AbortConnection
        error = GoogleError(500, "The model crashed mid-stream.").body
        if model == "stream-error":
            yield json.dumps(error, indent=2).encode() + b"\n"
        if model == "stream-error-event":
            yield _sse(error)

    # -------------------------------------------------------------- images

    def _image_response(self, model: str, request: JSON) -> JSON:
        """An image model's GenerateContentResponse, checked like the real ones check."""
        config = _camel_part(request.get("generationConfig") or {})
        if "image" not in model:
            raise GoogleError(400, f"Image output is not supported by models/{model}.")
        if int(config.get("candidateCount") or 1) > 1:
            raise GoogleError(400, f"Multiple candidates is not enabled for models/{model}")
        image_config = _checked_image_config(config.get("imageConfig") or {})
        prompt = _text(request["contents"][-1])
        response: JSON = {"modelVersion": model, "responseId": self._response_id()}
        prompt_tokens = _words(prompt)
        usage: JSON = {"promptTokenCount": prompt_tokens, "totalTokenCount": prompt_tokens}
        usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt_tokens}]
        response["usageMetadata"] = usage
        if model == "image-blocked":
            response["promptFeedback"] = {"blockReason": "PROHIBITED_CONTENT"}
            return response
        candidate = self._image_candidate(model, prompt, image_config)
        response["candidates"] = [candidate]
        drawn = sum(
            1 for p in candidate.get("content", {}).get("parts", []) if "inlineData" in p and not p.get("thought")
        )
        thoughts = THOUGHT_TOKENS if model == "image-thinking" else 0
        usage["candidatesTokenCount"] = drawn * IMAGE_TOKENS
        if drawn:
            usage["candidatesTokensDetails"] = [{"modality": "IMAGE", "tokenCount": drawn * IMAGE_TOKENS}]
        if thoughts:
            usage["thoughtsTokenCount"] = thoughts
        usage["totalTokenCount"] = prompt_tokens + drawn * IMAGE_TOKENS + thoughts
        return response

    def _image_candidate(self, model: str, prompt: str, image_config: JSON) -> JSON:
        if model == "image-safety":
            return {"index": 0, "finishReason": "IMAGE_SAFETY", "finishMessage": IMAGE_SAFETY_MESSAGE}
        if model == "image-no-image":
            return _candidate(0, [{"text": NO_IMAGE_TEXT}], "NO_IMAGE")
        if model == "image-bad-base64":
            return _candidate(0, [{"inlineData": {"mimeType": "image/png", "data": "not base64!"}}], "STOP")
        parts: list[JSON] = []
        if model == "image-thinking":
            parts += [{"text": "Sketching the layout first.", "thought": True}, self._image_part(prompt, image_config)]
            parts[-1]["thought"] = True
        parts += [self._image_part(prompt, image_config) for _ in range(2 if model == "image-two" else 1)]
        parts[-1]["thoughtSignature"] = self._new_signature()
        return _candidate(0, parts, "STOP")

    def _image_part(self, prompt: str, image_config: JSON) -> JSON:
        across, down = (int(side) for side in image_config.get("aspectRatio", "1:1").split(":"))
        scale = IMAGE_UNIT * {"1K": 1, "2K": 2, "4K": 4}[image_config.get("imageSize", "1K")]
        self.images_drawn += 1
        png = _png(across * scale, down * scale, {"prompt": prompt, "serial": str(self.images_drawn)})
        return {"inlineData": {"mimeType": "image/png", "data": base64.b64encode(png).decode()}}

    # -------------------------------------------------------------- embeddings

    def _embed(self, model: str, body: JSON, _: Request) -> Response:
        request = _validated(body, _EMBED_FIELDS, "EmbedContentRequest")
        return _json_response({"embedding": self._embedding(request, "EmbedContentRequest")})

    def _count_tokens(self, model: str, body: JSON, _: Request) -> Response:
        """countTokens: one token per word of every text part (free at Google, too)."""
        if self.count_tokens_down:
            raise GoogleError(503, "The model is overloaded. Please try again later.")
        if set(body) - {"contents", "generateContentRequest"} or not isinstance(body.get("contents"), list):
            raise GoogleError(400, "* CountTokensRequest.contents: contents is not specified")
        tokens = sum(len(_text(content).split()) for content in body["contents"])
        return _json_response(
            {"totalTokens": tokens, "promptTokensDetails": [{"modality": "TEXT", "tokenCount": tokens}]}
        )

    def _batch_embed(self, model: str, body: JSON, _: Request) -> Response:
        if set(body) - {"requests"} or not isinstance(body.get("requests"), list) or not body["requests"]:
            raise GoogleError(400, "* BatchEmbedContentsRequest.requests: requests is not specified")
        embeddings = []
        for index, item in enumerate(body["requests"]):
            where = f"BatchEmbedContentsRequest.requests[{index}]"
            request = _validated(item if isinstance(item, dict) else {}, _EMBED_FIELDS, where)
            if request.get("model") != f"models/{model}":
                raise GoogleError(400, f"* {where}.model: the model must be models/{model}, as in the URL")
            embeddings.append(self._embedding(request, where))
        return _json_response({"embeddings": embeddings})

    def _embedding(self, request: JSON, where: str) -> JSON:
        text = _text(request.get("content") or {})
        if not text:
            raise GoogleError(400, f"* {where}.content: content is not specified")
        dimensions = int(request.get("outputDimensionality") or self.embedding_dimensions)
        return {"values": _vector(text, dimensions)}


# ---------------------------------------------------------------------------- helpers


def _validated(body: JSON, fields: dict[str, tuple[str, Any]], what: str) -> JSON:
    """`body` under canonical names, each field checked against the SDK's type."""
    known = {**{_snake(name): spec for name, spec in fields.items()}, **fields}
    request: JSON = {}
    for name, value in body.items():
        if name not in known:
            raise GoogleError(400, f'Invalid JSON payload received. Unknown name "{name}": Cannot find field.')
        canonical, sdk_type = known[name]
        try:
            pydantic.TypeAdapter(sdk_type).validate_json(json.dumps(value))
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            location = ".".join(str(part) for part in first["loc"])
            raise GoogleError(
                400, f"Invalid JSON payload received at '{what}.{canonical}.{location}': {first['msg']}"
            ) from exc
        request[canonical] = value
    return request


def _checked_image_config(image_config: JSON) -> JSON:
    """The Developer API's ImageConfig has aspectRatio and imageSize only."""
    config = _camel_part(image_config)
    for name in config:
        if name not in ("aspectRatio", "imageSize"):
            raise GoogleError(
                400,
                f'Invalid JSON payload received. Unknown name "{name}" at '
                "'generation_config.image_config': Cannot find field.",
            )
    if config.get("aspectRatio", "1:1") not in IMAGE_ASPECT_RATIOS:
        raise GoogleError(400, f"Unsupported aspect ratio: {config['aspectRatio']}")
    if config.get("imageSize", "1K") not in ("1K", "2K", "4K"):
        raise GoogleError(400, f"Unsupported image size: {config['imageSize']}")
    return config


def _png(width: int, height: int, texts: dict[str, str]) -> bytes:
    """A valid 8-bit RGB PNG of one colour, with tEXt chunks."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = b"".join(b"\x00" + b"\xc8\x78\x28" * width for _ in range(height))
    text_chunks = b"".join(
        chunk(b"tEXt", key.encode("latin-1") + b"\x00" + value.encode("latin-1", "replace"))
        for key, value in texts.items()
    )
    body = chunk(b"IHDR", header) + text_chunks + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _signature_bytes(signature: Any) -> bytes | None:
    """The signature's bytes: like the API, compare bytes, whichever base64 alphabet
    carried them (the SDK sends back URL-safe base64)."""
    if not isinstance(signature, str):
        return None
    with contextlib.suppress(ValueError):
        return base64.urlsafe_b64decode(signature.replace("+", "-").replace("/", "_"))
    return None


def _parts(content: JSON) -> list[JSON]:
    return [_camel_part(p) for p in content.get("parts") or [] if isinstance(p, dict)]


def _camel_part(part: JSON) -> JSON:
    return {re.sub(r"_(\w)", lambda m: m.group(1).upper(), key): value for key, value in part.items()}


# What Google's models.list names today (Developer API, 2026-11; Google's deprecations
# page): the catalog test flags a gateway catalog entry missing here.
MODEL_LIST = {
    "gemini-3.8-flash": ("generateContent", "countTokens"),
    "gemini-3.7-flash": ("generateContent", "countTokens"),
    "gemini-3.6-flash": ("generateContent", "countTokens"),
    "gemini-3.5-flash": ("generateContent", "countTokens"),
    "gemini-3.5-flash-lite": ("generateContent", "countTokens"),
    "gemini-3.1-flash-lite": ("generateContent", "countTokens"),
    "gemini-3.1-pro-preview": ("generateContent", "countTokens"),
    "gemini-2.5-flash": ("generateContent", "countTokens"),  # retires 2026-12-01
    "gemini-2.5-pro": ("generateContent", "countTokens"),  # retires 2026-12-01
    "gemini-2.5-flash-lite": ("generateContent", "countTokens"),
    "gemini-3.1-flash-image": ("generateContent", "countTokens"),
    "gemini-3-pro-image": ("generateContent", "countTokens"),
    "gemini-embedding-001": ("embedContent", "countTextTokens", "countTokens"),
}


def _model_entry(model: str) -> JSON:
    return {
        "name": f"models/{model}",
        "version": "001",
        "displayName": model,
        "inputTokenLimit": 1_048_576,
        "outputTokenLimit": 65_536,
        "supportedGenerationMethods": list(MODEL_LIST[model]),
    }


def _text(content: JSON) -> str:
    return " ".join(p["text"] for p in _parts(content) if isinstance(p.get("text"), str) and not p.get("thought"))


def _callable_names(request: JSON) -> list[str]:
    """The functions the model may call, given the declarations and the toolConfig."""
    declared = [
        d.get("name", "")
        for tool in request.get("tools") or []
        for d in tool.get("functionDeclarations") or tool.get("function_declarations") or []
    ]
    config = (request.get("toolConfig") or {}).get("functionCallingConfig") or {}
    if config.get("mode") == "NONE":
        return []
    return config.get("allowedFunctionNames") or declared


def _candidate(index: int, parts: list[JSON], finish: str | None) -> JSON:
    candidate: JSON = {"index": index}
    if parts:
        candidate["content"] = {"parts": parts, "role": "model"}
    if finish:
        candidate["finishReason"] = finish
    if finish == "SAFETY":
        candidate["safetyRatings"] = _SAFETY_RATINGS
    return candidate


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _usage(request: JSON, reply: _Reply, n: int, final: bool) -> JSON:
    contents = [*request["contents"], request.get("systemInstruction") or {}]
    prompt = sum(_words(_text(c)) for c in contents)
    usage: JSON = {"promptTokenCount": prompt, "totalTokenCount": prompt}
    usage["promptTokensDetails"] = [{"modality": "TEXT", "tokenCount": prompt}]
    if not final or reply.blocked:
        return usage
    per_candidate = _words(reply.text) + sum(_words(json.dumps(c["args"])) for c in reply.calls)
    thoughts = THOUGHT_TOKENS if reply.thought else 0
    usage["candidatesTokenCount"] = per_candidate * n
    usage["totalTokenCount"] = prompt + per_candidate * n + thoughts
    if reply.thought:
        usage["thoughtsTokenCount"] = thoughts
        usage["cachedContentTokenCount"] = CACHED_TOKENS
    return usage


def _rate_limit_details(model: str) -> list[JSON]:
    return [
        {
            "@type": "type.googleapis.com/google.rpc.QuotaFailure",
            "violations": [
                {
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_free_tier_requests",
                    "quotaId": "GenerateRequestsPerMinutePerProjectPerModel-FreeTier",
                    "quotaDimensions": {"location": "global", "model": model},
                    "quotaValue": "10",
                }
            ],
        },
        {
            "@type": "type.googleapis.com/google.rpc.Help",
            "links": [
                {
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits",
                }
            ],
        },
        {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": f"{RETRY_DELAY_SECONDS}s"},
    ]


def _vector(text: str, dimensions: int) -> list[float]:
    """A deterministic unit vector for `text`, of float32 values."""
    rng = random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return list(struct.unpack(f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(v / norm for v in values))))


def _sse(event: JSON) -> bytes:
    # Google ends each event with CRLF CRLF.
    return b"data: " + json.dumps(event).encode() + b"\r\n\r\n"


def _json_response(body: JSON, status: int = 200) -> Response:
    # Google pretty-prints its JSON answers.
    return Response(status, json.dumps(body, indent=2).encode(), "application/json; charset=UTF-8")


def _sse_response(events: AsyncGenerator[bytes, None]) -> Response:
    return Response(200, content_type="text/event-stream", stream=events)


async def _items(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


__all__ = ["IMAGE_SCENARIO_MODELS", "SCENARIO_MODELS", "FakeGemini", "GoogleError", "RecordedRequest"]
