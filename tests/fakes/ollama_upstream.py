"""A fake Ollama server on loopback that speaks Ollama's native API, for tests.

    fake = FakeOllama()
    await fake.start()        # fake.base_url == "http://127.0.0.1:PORT" (an OLLAMA_HOST)
    ...                       # POST /api/chat, POST /api/embed
    fake.requests[-1].json    # what the gateway sent

Ollama has no official Python SDK types to check against, so the wire format is
written down here as pydantic models, from Ollama's API documentation (docs/api.md:
"Generate a chat completion", "Generate Embeddings", and the thinking / tool-name
fields added to messages since). The fake validates every request against them and
answers 400 `{"error": ...}` when one does not fit: the real server ignores unknown
fields, the fake refuses them so that a test notices a gateway sending something
Ollama would silently ignore. Tests validate the fake's answers with the response
models.

Like Ollama: `stream` defaults to true; streams are NDJSON (one JSON object per line)
ending with a `done: true` line that carries done_reason and the token counts; tool
calls come whole, with `arguments` as an object and no id; errors are
`{"error": "..."}`, also as a line in the middle of a stream; an unknown model is 404
`model "x" not found, try pulling it first`; `options.num_predict` cuts the reply
(done_reason "length"); `format` makes it JSON.

Behaviour by model name: see `SCENARIO_MODELS`; `PULLED_MODELS` answer normally
("echo: <last user text>", usage counted in words); any other name is not pulled.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import random
import re
from collections.abc import AsyncGenerator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from tests.fakes._http import AbortConnection, HttpServer, Request, Response
from tests.fakes.openai_upstream import RecordedRequest

JSON = dict[str, Any]
CREATED_AT = "2024-07-22T20:33:28.123648Z"

PULLED_MODELS = ("llama3.2", "llava", "qwen3", "nomic-embed-text")
SCENARIO_MODELS = (
    "tools",  # calls the first tool with {"city": "Paris"}; answers tool results in text
    "tools-parallel",  # two calls in one message (Paris, London)
    "thinking",  # with `think`, a `thinking` text before the answer
    "old-embed",  # an embedding model on a server too old for `dimensions`: ignores it
    "error-400",  # "error-NNN": that status with {"error": "..."}
    "error-401",
    "error-403",
    "error-429",  # with retry-after: 7
    "error-500",
    "error-502",
    "error-503",
    "malformed",  # 200 with a body (or line) that is not JSON
    "slow",  # waits `slow_seconds` before answering
    "stream-cut",  # streams 2 lines, then drops the connection (no done line)
    "stream-error",  # streams 2 lines, then an {"error": ...} line
)
_ERROR_MESSAGES = {
    400: "registry.ollama.ai/library/error-400:latest does not support tools",
    401: "unauthorized",
    403: "forbidden",
    429: "too many requests, please slow down",
    500: "llama runner process has terminated: exit status 2",
    502: "bad gateway",
    503: "server busy, please try again.  maximum pending requests exceeded",
}


# ------------------------------------------------------ the documented wire format


class _Wire(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolCallFunction(_Wire):
    index: int | None = None
    name: str
    arguments: dict[str, Any]


class ToolCall(_Wire):
    function: ToolCallFunction


class Message(_Wire):
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    thinking: str | None = None
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None
    tool_name: str | None = None


class ToolFunction(_Wire):
    name: str
    description: str | None = None
    parameters: dict[str, Any]


class Tool(_Wire):
    type: Literal["function"]
    function: ToolFunction


class Options(_Wire):
    """The runtime options of the Modelfile documentation."""

    num_keep: int | None = None
    seed: int | None = None
    num_predict: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    typical_p: float | None = None
    repeat_last_n: int | None = None
    temperature: float | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: list[str] | None = None
    num_ctx: int | None = None


class ChatRequest(_Wire):
    model: str
    messages: list[Message]
    tools: list[Tool] | None = None
    format: Literal["json"] | dict[str, Any] | None = None
    options: Options | None = None
    stream: bool | None = None
    keep_alive: str | int | None = None
    think: bool | Literal["low", "medium", "high"] | None = None


class ChatResponse(_Wire):
    model: str
    created_at: str
    message: Message
    done: bool
    done_reason: str | None = None
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None
    prompt_eval_duration: int | None = None
    eval_count: int | None = None
    eval_duration: int | None = None


class EmbedRequest(_Wire):
    model: str
    input: str | list[str]
    truncate: bool | None = None
    dimensions: int | None = None
    options: Options | None = None
    keep_alive: str | int | None = None


class EmbedResponse(_Wire):
    model: str
    embeddings: list[list[float]]
    total_duration: int | None = None
    load_duration: int | None = None
    prompt_eval_count: int | None = None


class ErrorResponse(_Wire):
    error: str


# -------------------------------------------------------------------------- the fake


class OllamaError(Exception):
    """Answered as an HTTP error with Ollama's `{"error": ...}` body."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = headers or {}


class FakeOllama:
    """A fake Ollama server; see the module docstring."""

    def __init__(
        self, *, host: str = "127.0.0.1", port: int = 0, slow_seconds: float = 5.0, dimensions: int = 8
    ) -> None:
        self.slow_seconds = slow_seconds
        self.dimensions = dimensions
        self.requests: list[RecordedRequest] = []
        self._http = HttpServer(self._handle, host, port)

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self._http.host}:{self._http.port}"

    @property
    def host(self) -> str:
        """The server as an OLLAMA_HOST value: host:port, without a scheme."""
        return f"{self._http.host}:{self._http.port}"

    def reset(self) -> None:
        self.requests.clear()
        self._http.reset_counters()

    async def _handle(self, request: Request) -> Response:
        recorded = RecordedRequest(request.method, request.path, request.query, request.headers, request.body)
        try:
            recorded.json = json.loads(request.body) if request.body else None
        except ValueError:
            recorded.json = None
        self.requests.append(recorded)
        try:
            return await self._dispatch(request, recorded.json)
        except OllamaError as exc:
            body = json.dumps({"error": str(exc)}).encode()
            return Response(exc.status, body, "application/json; charset=utf-8", exc.headers)

    async def _dispatch(self, request: Request, body: Any) -> Response:
        if request.method == "GET" and request.path == "/api/tags":
            return _json({"models": [{"name": f"{m}:latest", "model": f"{m}:latest"} for m in PULLED_MODELS]})
        routes = {"/api/chat": (ChatRequest, self._chat), "/api/embed": (EmbedRequest, self._embed)}
        if request.method != "POST" or request.path not in routes:
            raise OllamaError(404, "404 page not found")
        wire, handler = routes[request.path]
        try:
            wire.model_validate(body)
        except ValidationError as exc:
            raise OllamaError(400, str(exc).replace("\n", " ")) from exc
        model = body["model"]
        if model not in PULLED_MODELS and model not in SCENARIO_MODELS:
            raise OllamaError(404, f'model "{model}" not found, try pulling it first')
        if early := await self._scenario(model, body):
            return early
        return handler(body)

    async def _scenario(self, model: str, body: JSON) -> Response | None:
        if match := re.fullmatch(r"error-(\d{3})", model):
            status = int(match.group(1))
            raise OllamaError(status, _ERROR_MESSAGES[status], {"retry-after": "7"} if status == 429 else None)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "malformed":
            if body.get("stream", True):
                return _ndjson(_lines([b'{"model": "malformed", "message": {\n']))
            return Response(200, b'{"model": "malformed", "message": {')
        return None

    # ---------------------------------------------------------------------- chat

    def _chat(self, body: JSON) -> Response:
        model = body["model"]
        message, thinking, done_reason = _reply(body)
        prompt_tokens = sum(_words(m.get("content", "")) for m in body["messages"])
        calls = [json.dumps(call["function"]["arguments"]) for call in message.get("tool_calls") or []]
        generated = _words(message["content"]) + _words(thinking) + sum(_words(c) for c in calls)
        counts = {"prompt_eval_count": prompt_tokens, "eval_count": generated}
        if not body.get("stream", True):
            if thinking:
                message["thinking"] = thinking
            return _json(_final(model, message, done_reason, counts))
        lines = [*_stream_lines(model, message, thinking), _final(model, _assistant(""), done_reason, counts)]
        return _ndjson(self._send_lines(model, [json.dumps(line).encode() + b"\n" for line in lines]))

    async def _send_lines(self, model: str, lines: list[bytes]) -> AsyncGenerator[bytes, None]:
        broken = model in ("stream-cut", "stream-error")
        for line in lines[:2] if broken else lines:
            yield line
        if model == "stream-cut":
            raise AbortConnection
        if model == "stream-error":
            yield json.dumps({"error": "an error was encountered while running the model: unexpected EOF"}).encode()
            yield b"\n"

    # ---------------------------------------------------------------- embeddings

    def _embed(self, body: JSON) -> Response:
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        dimensions = self.dimensions if body["model"] == "old-embed" else body.get("dimensions") or self.dimensions
        answer = {
            "model": body["model"],
            "embeddings": [_vector(text, dimensions) for text in inputs],
            "total_duration": 14143917,
            "load_duration": 1019500,
            "prompt_eval_count": sum(_words(text) for text in inputs),
        }
        return _json(answer)


# ------------------------------------------------------------------------- replies


def _words(text: str | None) -> int:
    return len(text.split()) if text else 0


def _assistant(content: str, tool_calls: list[JSON] | None = None) -> JSON:
    message: JSON = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


def _reply(body: JSON) -> tuple[JSON, str, str]:
    """(message, thinking, done_reason) of the answer to a chat request."""
    model, messages = body["model"], body["messages"]
    results = []
    for message in reversed(messages):
        if message["role"] != "tool":
            break
        results.insert(0, f"{message.get('tool_name', '?')}={message['content']}")
    if model.startswith("tools") and results:
        return _assistant("tool result: " + " | ".join(results)), "", "stop"
    if model.startswith("tools") and body.get("tools"):
        name = body["tools"][0]["function"]["name"]
        cities = ["Paris", "London"] if model == "tools-parallel" else ["Paris"]
        calls = [{"function": {"name": name, "arguments": {"city": city}}} for city in cities]
        return _assistant("", calls), "", "stop"
    last = next((m for m in reversed(messages) if m["role"] == "user"), {"content": ""})
    text = f"echo: {last['content']}"
    if last.get("images"):
        text += f" (and {len(last['images'])} image)"
    if body.get("format"):
        text = json.dumps({"echo": last["content"]})
    thinking = "the user said something" if model == "thinking" and body.get("think") else ""
    limit = (body.get("options") or {}).get("num_predict")
    if limit is not None and _words(text) > limit:
        return _assistant(" ".join(text.split()[:limit])), thinking, "length"
    return _assistant(text), thinking, "stop"


def _final(model: str, message: JSON, done_reason: str, counts: JSON) -> JSON:
    durations = {"total_duration": 4883583458, "load_duration": 1334875, "prompt_eval_duration": 342546000}
    return {
        "model": model,
        "created_at": CREATED_AT,
        "message": message,
        "done_reason": done_reason,
        "done": True,
        **durations,
        "prompt_eval_count": counts["prompt_eval_count"],
        "eval_count": counts["eval_count"],
        "eval_duration": 4535599000,
    }


def _stream_lines(model: str, message: JSON, thinking: str) -> list[JSON]:
    def line(**fields: Any) -> JSON:
        return {"model": model, "created_at": CREATED_AT, "message": _assistant("") | fields, "done": False}

    lines = [line(thinking=piece) for piece in re.findall(r"\S+\s*", thinking)]
    if message.get("tool_calls"):
        return [*lines, line(tool_calls=message["tool_calls"])]
    return lines + [line(content=piece) for piece in re.findall(r"\S+\s*", message["content"])]


def _vector(text: str, dimensions: int) -> list[float]:
    rng = random.Random(hashlib.sha256(text.encode()).digest())
    values = [rng.uniform(-1.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [round(v / norm, 6) for v in values]


def _json(body: JSON) -> Response:
    return Response(200, json.dumps(body).encode(), "application/json; charset=utf-8")


async def _lines(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item


def _ndjson(lines: AsyncGenerator[bytes, None]) -> Response:
    return Response(200, content_type="application/x-ndjson", stream=lines)
