"""A fake Mistral API on loopback that speaks Mistral's wire format, for tests.

    fake = FakeMistral()
    await fake.start()        # fake.base_url == "http://127.0.0.1:PORT" (Mistral's server URL)
    ...                       # POST /v1/chat/completions, /v1/embeddings
    fake.requests[-1].json    # what the gateway sent

Like the real API it is strict about what it accepts, which is what makes it useful:
  - a field Mistral does not document, at the top level or in a message, is refused
    with 422 `extra_forbidden` (the allowed names come from the official `mistralai`
    SDK's request models, so they follow the real API), and the body must validate
    against the SDK's `ChatCompletionRequest` / `EmbeddingRequest`;
  - tool call ids must be 9 letters or digits (400, code 3280, as Mistral answers);
  - the key must be `Authorization: Bearer <api_key>` (401 `{"detail": "Unauthorized"}`).

Its answers are Mistral's: `content` "" next to tool calls, tool call `arguments` as
a JSON string with an `index`, streamed tool calls whole in one delta (parallel calls
all with index 0), the usage on the last chunk (Mistral has no `stream_options`), then
`data: [DONE]`. Tests parse them with the SDK's response types.

Behaviour by model name (see `SCENARIO_MODELS`); any other name answers
"echo: <last user text>" with usage counted in words.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import math
import random
import re
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import pydantic
from mistralai.client import models as mistral

from tests.fakes._http import AbortConnection, HttpServer, Request, Response
from tests.fakes.openai_upstream import RecordedRequest

JSON = dict[str, Any]
CREATED = 1_700_000_000

SCENARIO_MODELS = (
    "tools",  # calls the first tool with {"city": "Paris"}; answers tool results in text
    "tools-parallel",  # two calls in one turn (Paris, London); streamed both with index 0
    "tools-fragmented",  # streams the call's arguments in pieces, later pieces with id "null"
    "thinking",  # Magistral-style content: a "thinking" chunk, then a "text" chunk
    "length",  # the reply cut to 2 words, finish_reason "length"
    "model-length",  # finish_reason "model_length" (the context window is full)
    "finish-error",  # a few words, then finish_reason "error"
    "error-400",  # "error-NNN": that status with Mistral's error body for it
    "error-401",
    "error-403",
    "error-404",
    "error-422",
    "error-429",  # with retry-after: 7
    "error-500",
    "error-503",
    "malformed",  # 200 with a body (or SSE event) that is not JSON
    "slow",  # waits `slow_seconds` before answering
    "stream-cut",  # streams 2 events, then drops the connection (no [DONE])
    "stream-slow",  # waits `chunk_delay` before each event
)

_TOOL_CALL_ID = re.compile(r"[A-Za-z0-9]{9}")
_MESSAGE_MODELS: dict[str, type[pydantic.BaseModel]] = {
    "system": mistral.SystemMessage,
    "user": mistral.UserMessage,
    "assistant": mistral.AssistantMessage,
    "tool": mistral.ToolMessage,
}


def _error(message: str, kind: str, code: str | None) -> JSON:
    return {"object": "error", "message": message, "type": kind, "param": None, "code": code}


_ERROR_BODIES: dict[int, JSON] = {
    400: _error("Invalid model: error-400", "invalid_model", "1500"),
    401: {"detail": "Unauthorized"},
    403: {"detail": "Forbidden"},
    404: {"detail": "Not Found"},
    429: _error("Requests rate limit exceeded", "rate_limited", "1300"),
    500: _error("Internal server error", "internal_server_error", "1000"),
    503: _error("Service unavailable, please retry later", "service_unavailable", "1001"),
}


class MistralError(Exception):
    """Answered as an HTTP error with a Mistral error body."""

    def __init__(self, status: int, body: JSON, headers: dict[str, str] | None = None) -> None:
        super().__init__(json.dumps(body))
        self.status = status
        self.body = body
        self.headers = headers or {}


@dataclass
class _Reply:
    content: Any  # a string, or Mistral's list of content chunks
    finish_reason: str
    tool_calls: list[JSON] = field(default_factory=list)


class FakeMistral:
    """A fake Mistral server; see the module docstring."""

    def __init__(
        self,
        *,
        api_key: str = "mistral-fake-key",
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
        chunk_delay: float = 0.2,
        embedding_dimensions: int = 8,
    ) -> None:
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.chunk_delay = chunk_delay
        self.embedding_dimensions = embedding_dimensions
        self.requests: list[RecordedRequest] = []
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
    def cancelled_streams(self) -> int:
        """Streams whose client (the gateway) hung up before their end."""
        return self._http.cancelled_streams

    def reset(self) -> None:
        self.requests.clear()
        self._http.reset_counters()

    # ------------------------------------------------------------------- routing

    async def _handle(self, request: Request) -> Response:
        recorded = RecordedRequest(request.method, request.path, request.query, request.headers, request.body)
        try:
            recorded.json = json.loads(request.body) if request.body else None
        except ValueError:
            recorded.json = None
        self.requests.append(recorded)
        try:
            return await self._dispatch(request, recorded.json)
        except MistralError as exc:
            return Response(exc.status, json.dumps(exc.body).encode(), headers=exc.headers)

    async def _dispatch(self, request: Request, body: Any) -> Response:
        if request.headers.get("authorization") != f"Bearer {self.api_key}":
            raise MistralError(401, _ERROR_BODIES[401])
        if (request.method, request.path) == ("GET", "/v1/models"):  # the gateway's credential probe
            return Response(200, json.dumps({"object": "list", "data": [{"id": "mistral-small-latest"}]}).encode())
        routes = {"/v1/chat/completions": self._chat, "/v1/embeddings": self._embeddings}
        handler = routes.get(request.path)
        if request.method != "POST" or handler is None:
            raise MistralError(404, _ERROR_BODIES[404])
        if not isinstance(body, dict):
            raise MistralError(400, _error("Invalid JSON body", "invalid_request_error", None))
        model = str(body.get("model", ""))
        if early := await self._scenario(model, body):
            return early
        return handler(body)

    async def _scenario(self, model: str, body: JSON) -> Response | None:
        if match := re.fullmatch(r"error-(\d{3})", model):
            status = int(match.group(1))
            if status == 422:
                raise _validation_error([_extra_forbidden(["body", "scenario"], "error-422")])
            headers = {"retry-after": "7"} if status == 429 else {}
            raise MistralError(status, _ERROR_BODIES.get(status, _error("Error", "api_error", None)), headers)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "malformed":
            if body.get("stream"):
                return _sse([b'data: {"id": "broken", "choices": [\n\n'])
            return Response(200, b'{"id": "broken", "choices": [')
        return None

    # ---------------------------------------------------------------------- chat

    def _chat(self, body: JSON) -> Response:
        _check_chat_request(body)
        model = body["model"]
        reply = _plan_reply(model, body)
        usage = _usage(body["messages"], reply)
        completion_id = f"{next(self._ids):032x}"
        if not body.get("stream"):
            return _json(_completion(completion_id, model, reply, usage))
        events = [b"data: " + json.dumps(c).encode() + b"\n\n" for c in _chunks(completion_id, model, reply, usage)]
        delay = self.chunk_delay if model == "stream-slow" else 0.0
        return _sse(_stream(events, cut=model == "stream-cut", delay=delay))

    # ---------------------------------------------------------------- embeddings

    def _embeddings(self, body: JSON) -> Response:
        _check_fields(body, mistral.EmbeddingRequest, ["body"])
        _validate(mistral.EmbeddingRequest, body)
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = body.get("output_dimension") or self.embedding_dimensions
        data = [
            {"object": "embedding", "embedding": _vector(text, dimensions), "index": i} for i, text in enumerate(inputs)
        ]
        tokens = sum(len(text.split()) for text in inputs)
        usage = {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
        answer = {"id": f"{next(self._ids):032x}", "object": "list", "data": data, "model": body["model"]}
        return _json({**answer, "usage": usage})


# ---------------------------------------------------------------- request checks


def _check_chat_request(body: JSON) -> None:
    _check_fields(body, mistral.ChatCompletionRequest, ["body"])
    messages = body.get("messages")
    if isinstance(messages, list):
        for index, message in enumerate(messages):
            role = message.get("role") if isinstance(message, dict) else None
            model = _MESSAGE_MODELS.get(str(role))
            if model is None:
                raise _validation_error([_extra_forbidden(["body", "messages", index, "role"], role)])
            _check_fields(message, model, ["body", "messages", index, str(role)])
    _validate(mistral.ChatCompletionRequest, body)
    _check_tool_call_ids(body["messages"])


def _check_fields(obj: JSON, model: type[pydantic.BaseModel], location: list[Any]) -> None:
    """422 `extra_forbidden` for each key the SDK's model does not know, as Mistral does."""
    known = {info.alias or name for name, info in model.model_fields.items()}
    extra = [_extra_forbidden([*location, key], obj[key]) for key in obj if key not in known]
    if extra:
        raise _validation_error(extra)


def _validate(model: type[pydantic.BaseModel], body: JSON) -> None:
    try:
        model.model_validate(body)
    except pydantic.ValidationError as exc:
        details = [
            {"type": e["type"], "loc": ["body", *e["loc"]], "msg": e["msg"], "input": e.get("input")}
            for e in exc.errors(include_url=False)
        ]
        raise _validation_error(json.loads(json.dumps(details, default=str))) from exc


def _check_tool_call_ids(messages: list[JSON]) -> None:
    ids = [call.get("id", "") for m in messages for call in m.get("tool_calls") or []]
    ids += [m["tool_call_id"] for m in messages if m.get("role") == "tool" and "tool_call_id" in m]
    for call_id in ids:
        if not _TOOL_CALL_ID.fullmatch(str(call_id)):
            message = f"Tool call id was {call_id} but must be a-z, A-Z, 0-9, with a length of 9."
            raise MistralError(400, _error(message, "invalid_request_error", "3280"))


def _extra_forbidden(location: list[Any], value: Any) -> JSON:
    return {"type": "extra_forbidden", "loc": location, "msg": "Extra inputs are not permitted", "input": value}


def _validation_error(details: list[JSON]) -> MistralError:
    # The shape Mistral answers today: `detail` (what the SDK's HTTPValidationError
    # reads) and the same list as `message`.
    body = {"object": "error", "detail": details, "message": details, "type": "invalid_request_error", "code": 3001}
    return MistralError(422, body)


# -------------------------------------------------------------------- chat replies


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(c.get("text", "") for c in content if isinstance(c, dict) and c.get("type") == "text")
    return ""


def _plan_reply(model: str, body: JSON) -> _Reply:
    messages: list[JSON] = body["messages"]
    results = []
    for message in reversed(messages):
        if message.get("role") != "tool":
            break
        results.insert(0, _text_of(message.get("content")))
    if model.startswith("tools") and results:
        return _Reply("tool result: " + " | ".join(results), "stop")
    if model.startswith("tools") and body.get("tools"):
        cities = ["Paris", "London"] if model == "tools-parallel" else ["Paris"]
        name = body["tools"][0]["function"]["name"]
        return _Reply("", "tool_calls", [_tool_call(name, city) for city in cities])
    user_text = next((_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), "")
    text = f"echo: {user_text}"
    if model == "thinking":
        thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "the user said hi"}]}
        return _Reply([thinking, {"type": "text", "text": text}], "stop")
    cut = {"length": "length", "model-length": "model_length", "finish-error": "error"}
    if model in cut:
        return _Reply(" ".join(text.split()[:2]), cut[model])
    return _Reply(text, "stop")


def _tool_call(name: str, city: str) -> JSON:
    call_id = hashlib.sha256(city.encode()).hexdigest()[:9]
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": json.dumps({"city": city})}}


def _usage(messages: list[JSON], reply: _Reply) -> JSON:
    prompt = sum(len(_text_of(m.get("content")).split()) for m in messages)
    completion = len(_text_of(reply.content).split()) + sum(
        len(c["function"]["arguments"].split()) for c in reply.tool_calls
    )
    return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


def _completion(completion_id: str, model: str, reply: _Reply, usage: JSON) -> JSON:
    calls = [{**call, "index": i} for i, call in enumerate(reply.tool_calls)] or None
    message = {"role": "assistant", "content": reply.content, "tool_calls": calls, "prefix": False}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "model": model,
        "usage": usage,
        "created": CREATED,
        "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason, "logprobs": None}],
    }


def _chunks(completion_id: str, model: str, reply: _Reply, usage: JSON) -> list[JSON]:
    """Mistral's chunks: role first, then pieces, the finish_reason and usage last."""

    def chunk(delta: JSON, finish: str | None = None, **extra: Any) -> JSON:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        head = {"id": completion_id, "object": "chat.completion.chunk", "created": CREATED, "model": model}
        return {**head, "choices": [choice], **extra}

    deltas = _deltas(model, reply)
    return [
        chunk({"role": "assistant", "content": ""}),
        *(chunk(delta) for delta in deltas[:-1]),
        chunk(deltas[-1], reply.finish_reason, usage=usage),
    ]


def _deltas(model: str, reply: _Reply) -> list[JSON]:
    """The content of a reply, in the deltas Mistral would send (the last one included)."""
    if reply.tool_calls:
        calls = [{**call, "index": 0} for call in reply.tool_calls]  # Mistral: all index 0
        if model != "tools-fragmented":
            return [{"content": "", "tool_calls": calls}]
        arguments = calls[0]["function"]["arguments"]
        head = {**calls[0], "function": {"name": calls[0]["function"]["name"], "arguments": arguments[:5]}}
        rest = [
            {"id": "null", "index": 0, "function": {"name": "", "arguments": arguments[i : i + 5]}}
            for i in range(5, len(arguments), 5)
        ]
        return [{"tool_calls": [head]}, *({"tool_calls": [piece]} for piece in rest), {"content": ""}]
    if isinstance(reply.content, list):
        return [{"content": [chunk]} for chunk in reply.content] + [{"content": ""}]
    pieces = re.findall(r"\S+\s*", reply.content)
    return [{"content": piece} for piece in pieces] + [{"content": ""}]


async def _stream(events: list[bytes], *, cut: bool, delay: float) -> AsyncGenerator[bytes, None]:
    for event in events[:2] if cut else events:
        await asyncio.sleep(delay)
        yield event
    if cut:
        raise AbortConnection
    yield b"data: [DONE]\n\n"


async def _events(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


def _sse(events: AsyncGenerator[bytes, None] | list[bytes]) -> Response:
    stream = _events(events) if isinstance(events, list) else events
    return Response(200, content_type="text/event-stream; charset=utf-8", stream=stream)


def _json(body: JSON) -> Response:
    return Response(200, json.dumps(body).encode())


def _vector(text: str, dimensions: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]
