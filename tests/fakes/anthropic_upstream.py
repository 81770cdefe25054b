"""A fake Anthropic Messages API on loopback that speaks Anthropic's wire format, for tests.

    fake = FakeAnthropic()
    await fake.start()              # fake.base_url == "http://127.0.0.1:PORT" (no /v1)
    ...                             # point the gateway (or the anthropic SDK) at it
    assert fake.requests[-1].json["max_tokens"] == 32000
    await fake.stop()

`POST /v1/messages` only, with Anthropic's headers (`x-api-key`, `anthropic-version`),
JSON bodies, SSE event sequences (named events, a ping, CUMULATIVE usage in
message_delta) and error bodies `{"type": "error", "error": {"type", "message"}}`. It
refuses what the real API refuses and a translating gateway tends to get wrong: fields
the API does not know, roles other than user/assistant, empty text blocks, tool_use
blocks without tool_result blocks right after and the reverse, a thinking model's
tool-calling turn sent back without its thinking block.

Behaviour is chosen by the model name (see `SCENARIO_MODELS`); any other model
answers "echo: <last user text>", with usage counted in words. Every reply honours
`max_tokens` (in words) and `stop_sequences`.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import itertools
import json
import re
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any

from tests.fakes._http import AbortConnection, HttpServer, Request, Response

JSON = dict[str, Any]
# The gateway's version, and the one the anthropic SDK 2.x sends (which refuses sampling
# parameters and takes the key as a bearer token too).
API_VERSIONS = ("2023-06-01", "2026-10-21")

SCENARIO_MODELS = (
    "tools",  # text, then a call of the first tool with {"city": "Paris"}; a tool result → text
    "tools-parallel",  # text, then calls for Paris and London
    "tools-noargs",  # a call of the first tool with {} as input
    "thinking",  # like "tools", after a signed thinking block that must come back with the results
    "max-tokens",  # the reply cut to 2 words, stop_reason max_tokens
    "context-window",  # stop_reason model_context_window_exceeded
    "refusal",  # partial text, stop_reason refusal
    "pause-turn",  # stop_reason pause_turn
    "cached",  # usage with cache reads (100) and cache writes (20)
    "error-400",  # "error-NNN": that status with Anthropic's error body of that type
    "error-401",
    "error-402",
    "error-403",
    "error-404",
    "error-413",
    "error-429",  # also retry-after: 7 and anthropic-ratelimit-* headers
    "error-500",
    "error-504",
    "error-529",
    "malformed",  # 200 with a body (or SSE event) that is not JSON
    "slow",  # waits slow_seconds before answering
    "stream-cut",  # a few events, then the connection drops
    "stream-error",  # a few events, then an overloaded_error event
    "stream-slow",  # waits chunk_delay before each event
)

ERROR_TYPES = {
    400: ("invalid_request_error", "Invalid request."),
    401: ("authentication_error", "invalid x-api-key"),
    402: ("billing_error", "Your credit balance is too low to access the Anthropic API."),
    403: ("permission_error", "Your API key does not have permission to use the specified resource."),
    404: ("not_found_error", "The requested resource could not be found."),
    413: ("request_too_large", "Request exceeds the maximum allowed number of bytes."),
    429: ("rate_limit_error", "Number of request tokens has exceeded your per-minute rate limit."),
    500: ("api_error", "Internal server error"),
    504: ("timeout_error", "Request timed out"),
    529: ("overloaded_error", "Overloaded"),
}
_RATE_LIMIT_HEADERS = {
    "retry-after": "7",
    "anthropic-ratelimit-requests-limit": "50",
    "anthropic-ratelimit-requests-remaining": "0",
    "anthropic-ratelimit-requests-reset": "2026-01-01T00:00:07Z",
}
# The top-level fields of a Messages request; the API refuses any other.
_KNOWN_FIELDS = frozenset(
    {
        "model",
        "messages",
        "max_tokens",
        "system",
        "stop_sequences",
        "stream",
        "temperature",
        "top_p",
        "top_k",
        "tools",
        "tool_choice",
        "metadata",
        "thinking",
        "output_config",
        "service_tier",
        "container",
        "cache_control",
        "inference_geo",
    }
)
_BLOCK_TYPES = {
    "user": {"text", "image", "document", "tool_result"},
    "assistant": {"text", "tool_use", "thinking", "redacted_thinking"},
}
_IMAGE_TYPES = {"image/jpeg", "image/png", "image/gif", "image/webp"}
_CITIES = ("Paris", "London")


def signature_of(thinking: str) -> str:
    """The fake's signature of a thinking block: a check it can repeat on the way back."""
    return base64.b64encode(hashlib.sha256(b"fake-signature:" + thinking.encode()).digest()).decode()


class AnthropicError(Exception):
    """Answered as an HTTP error with Anthropic's error body."""

    def __init__(self, status: int, message: str | None = None, headers: dict[str, str] | None = None) -> None:
        kind, default = ERROR_TYPES.get(status, ("api_error", "Error"))
        self.status = status
        self.body = {"type": "error", "error": {"type": kind, "message": message or default}}
        self.headers = headers or {}
        super().__init__(self.body["error"]["message"])


def invalid(message: str) -> AnthropicError:
    return AnthropicError(400, message)


@dataclass
class RecordedRequest:
    """A request the fake received, as the gateway sent it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    json: Any = None


@dataclass
class Reply:
    """What the fake model answers: content blocks, why it stopped, and usage."""

    blocks: list[JSON]
    stop_reason: str
    stop_sequence: str | None = None
    usage: JSON = field(default_factory=dict)


class FakeAnthropic:
    """A fake Anthropic API. See the module docstring and `SCENARIO_MODELS`."""

    def __init__(
        self,
        *,
        api_key: str | None = "sk-ant-fake",
        host: str = "127.0.0.1",
        port: int = 0,
        slow_seconds: float = 5.0,
        chunk_delay: float = 0.1,
    ) -> None:
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.chunk_delay = chunk_delay
        self.requests: list[RecordedRequest] = []
        self._http = HttpServer(self._handle, host, port)
        self._ids = itertools.count(1)

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    async def __aenter__(self) -> FakeAnthropic:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def base_url(self) -> str:
        return f"http://{self._http.host}:{self._http.port}"

    @property
    def cancelled_streams(self) -> int:
        return self._http.cancelled_streams

    def reset(self) -> None:
        self.requests.clear()
        self._http.reset_counters()

    async def wait_until(self, predicate: Callable[[], bool], seconds: float = 5.0) -> None:
        async with asyncio.timeout(seconds):
            while not predicate():  # noqa: ASYNC110 - an arbitrary predicate, nothing to wait on
                await asyncio.sleep(0.01)

    # ------------------------------------------------------------------- routing

    async def _handle(self, request: Request) -> Response:
        recorded = RecordedRequest(request.method, request.path, request.headers, request.body)
        with contextlib.suppress(ValueError):
            recorded.json = json.loads(request.body)
        self.requests.append(recorded)
        try:
            response = await self._dispatch(request, recorded.json)
        except AnthropicError as exc:
            body = {**exc.body, "request_id": self._id("req_011Fake")}
            response = Response(exc.status, json.dumps(body).encode(), headers=exc.headers)
        response.headers.setdefault("request-id", self._id("req_011Fake"))
        return response

    async def _dispatch(self, request: Request, body: Any) -> Response:
        if (request.method, request.path) == ("GET", "/v1/models"):  # the gateway's credential probe
            self._check_headers(request.headers)
            models = [{"type": "model", "id": "claude-haiku-4-5", "display_name": "Claude Haiku 4.5"}]
            return Response(200, json.dumps({"data": models, "has_more": False}).encode())
        if (request.method, request.path) != ("POST", "/v1/messages"):
            raise AnthropicError(404, f"Not Found: {request.method} {request.path}")
        self._check_headers(request.headers)
        if not isinstance(body, dict):
            raise invalid("There was an issue with your request body: it must be a JSON object.")
        validate(body, request.headers["anthropic-version"])
        model = body["model"]
        if match := re.fullmatch(r"error-(\d{3})", model):
            status = int(match.group(1))
            raise AnthropicError(status, headers=dict(_RATE_LIMIT_HEADERS) if status == 429 else None)
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if model == "malformed":
            if body.get("stream"):
                return _sse(_events([b'event: message_start\ndata: {"type": "message_start", "message": {\n\n']))
            return Response(200, b'{"id": "msg_broken", "content": [')
        message = self._message(model, body, plan_reply(model, body))
        if not body.get("stream"):
            return Response(200, json.dumps(message).encode())
        return _sse(self._paced(model, [_event(e) for e in stream_events(message)]))

    def _check_headers(self, headers: dict[str, str]) -> None:
        version = headers.get("anthropic-version")
        if version not in API_VERSIONS:
            raise invalid("anthropic-version: header is required" if version is None else "anthropic-version: invalid")
        bearer = headers.get("authorization", "").removeprefix("Bearer ") or None
        key = headers.get("x-api-key") or bearer
        if self.api_key is not None and key != self.api_key:
            raise AnthropicError(401, "x-api-key header is required" if key is None else "invalid x-api-key")

    def _id(self, prefix: str) -> str:
        return f"{prefix}{next(self._ids):014d}"

    def _message(self, model: str, body: JSON, reply: Reply) -> JSON:
        for block in reply.blocks:
            if block["type"] == "tool_use":
                block["id"] = self._id("toolu_01Fake")
        return {
            "id": self._id("msg_01Fake"),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": reply.blocks,
            "stop_reason": reply.stop_reason,
            "stop_sequence": reply.stop_sequence,
            "usage": reply.usage,
        }

    async def _paced(self, model: str, events: list[bytes]) -> AsyncGenerator[bytes, None]:
        """Sends the SSE events, cut short or slowed down as the model name asks."""
        broken = model in ("stream-cut", "stream-error")
        for event in events[:4] if broken else events:
            if model == "stream-slow":
                await asyncio.sleep(self.chunk_delay)
            yield event
        if model == "stream-cut":
            raise AbortConnection
        if model == "stream-error":
            yield _event({"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})


# --------------------------------------------------------------------------- validation


def validate(body: JSON, version: str = API_VERSIONS[0]) -> None:
    """Refuses the request as the real API would (the checks a translator can fail)."""
    extra = sorted(set(body) - _KNOWN_FIELDS)
    if extra:
        raise invalid(f"{extra[0]}: Extra inputs are not permitted")
    sampling = [name for name in ("temperature", "top_p", "top_k") if name in body]
    if sampling and version != API_VERSIONS[0]:
        raise invalid(f"{sampling[0]}: this parameter was removed in API version {version}")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise invalid("model: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise invalid("max_tokens: Field required (an integer of at least 1)")
    for name in ("temperature", "top_p"):
        if name in body and not 0 <= body[name] <= 1:
            raise invalid(f"{name}: Input should be less than or equal to 1")
    stops = body.get("stop_sequences", [])
    if not isinstance(stops, list) or not all(isinstance(s, str) and s.strip() for s in stops):
        raise invalid("stop_sequences: each stop sequence must contain non-whitespace")
    _validate_system(body.get("system"))
    _validate_tools(body)
    _validate_output_config(body.get("output_config"))
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages: Field required (at least one message)")
    for index, message in enumerate(messages):
        _validate_message(index, message)
    _validate_tool_pairing(messages)


def _validate_system(system: Any) -> None:
    if system is None or (isinstance(system, str) and system):
        return
    if not isinstance(system, list) or not all(_is_text_block(b) for b in system):
        raise invalid("system: Input should be a valid string or a list of non-empty text blocks")


def _is_text_block(block: Any) -> bool:
    return isinstance(block, dict) and block.get("type") == "text" and isinstance(block.get("text"), str)


def _validate_tools(body: JSON) -> None:
    for index, tool in enumerate(body.get("tools", [])):
        schema = tool.get("input_schema") if isinstance(tool, dict) else None
        if not tool.get("name") or not isinstance(schema, dict) or schema.get("type") != "object":
            raise invalid(f"tools.{index}.custom.input_schema.type: Input should be 'object'")
    choice = body.get("tool_choice")
    if choice is None:
        return
    if choice.get("type") not in ("auto", "any", "tool", "none") or (choice["type"] == "tool") != ("name" in choice):
        raise invalid("tool_choice: Input tag does not match any of the expected tags")
    if not body.get("tools") and choice["type"] != "none":
        raise invalid("tool_choice may only be specified while providing tools.")


def _validate_output_config(config: Any) -> None:
    if config is None:
        return
    fmt = config.get("format")
    if fmt is not None and (fmt.get("type") != "json_schema" or not isinstance(fmt.get("schema"), dict)):
        raise invalid("output_config.format: a json_schema format needs a schema object")
    if config.get("effort") not in (None, "low", "medium", "high", "xhigh", "max"):
        raise invalid("output_config.effort: Input should be 'low', 'medium', 'high', 'xhigh' or 'max'")


def _validate_message(index: int, message: Any) -> None:
    where = f"messages.{index}"
    role = message.get("role") if isinstance(message, dict) else None
    if role not in _BLOCK_TYPES:
        raise invalid(f"{where}.role: Input should be 'user' or 'assistant'")
    content = message.get("content")
    if isinstance(content, str):
        if not content:
            raise invalid(f"{where}: text content blocks must be non-empty")
        return
    if not isinstance(content, list) or not content:
        raise invalid(f"{where}: all messages must have non-empty content")
    for block_index, block in enumerate(content):
        _validate_block(f"{where}.content.{block_index}", role, block)


def _validate_block(where: str, role: str, block: Any) -> None:
    kind = block.get("type") if isinstance(block, dict) else None
    if kind not in _BLOCK_TYPES[role]:
        raise invalid(f"{where}.type: {kind!r} blocks are not allowed in {role} messages")
    if kind == "text" and not block.get("text"):
        raise invalid(f"{where}: text content blocks must be non-empty")
    if kind == "tool_use" and not (block.get("id") and block.get("name") and isinstance(block.get("input"), dict)):
        raise invalid(f"{where}: tool_use blocks need an id, a name and an input object")
    if kind == "image":
        source = block.get("source") or {}
        base64_ok = source.get("type") == "base64" and source.get("media_type") in _IMAGE_TYPES and source.get("data")
        if not base64_ok and not (source.get("type") == "url" and source.get("url")):
            raise invalid(f"{where}.source: a base64 source with an image media type, or a url source")


def _validate_tool_pairing(messages: list[JSON]) -> None:
    """Each tool_use answered in the very next message, each tool_result answering one."""
    previous_calls: list[str] = []
    for index, message in enumerate(messages):
        blocks = message["content"] if isinstance(message["content"], list) else []
        results = [b.get("tool_use_id") for b in blocks if b.get("type") == "tool_result"]
        missing = [call for call in previous_calls if call not in results]
        if missing:
            raise invalid(
                f"messages.{index}: `tool_use` ids were found without `tool_result` blocks immediately after: "
                f"{', '.join(missing)}. Each `tool_use` block must have a corresponding `tool_result` block "
                "in the next message."
            )
        unexpected = [result for result in results if result not in previous_calls]
        if unexpected:
            raise invalid(
                f"messages.{index}: unexpected `tool_use_id` found in `tool_result` blocks: {unexpected[0]}. "
                "Each `tool_result` block must have a corresponding `tool_use` block in the previous message."
            )
        previous_calls = [b["id"] for b in blocks if b.get("type") == "tool_use"]


# ------------------------------------------------------------------------------ replies


def plan_reply(model: str, body: JSON) -> Reply:
    messages = body["messages"]
    results = _tool_results(messages[-1])
    if model == "thinking" and results:
        _check_thinking_came_back(messages)
    if model in ("tools", "tools-parallel", "tools-noargs", "thinking") and (results or body.get("tools")):
        reply = Reply([_text("tool result: " + " | ".join(results))], "end_turn") if results else _calls(model, body)
    else:
        reply = _text_reply(model, body)
    reply.usage = _usage(model, body, reply.blocks)
    return reply


def _text_reply(model: str, body: JSON) -> Reply:
    user_text = _text_of(next(m for m in reversed(body["messages"]) if m["role"] == "user"))
    text = json.dumps({"echo": user_text}) if (body.get("output_config") or {}).get("format") else f"echo: {user_text}"
    special = {"refusal": "refusal", "pause-turn": "pause_turn", "context-window": "model_context_window_exceeded"}
    if model in special:
        return Reply([_text(" ".join(text.split()[:2]))], special[model])
    for stop in body.get("stop_sequences", []):
        if stop in text:
            return Reply([_text(text[: text.index(stop)])], "stop_sequence", stop)
    limit = 2 if model == "max-tokens" else body["max_tokens"]
    if len(text.split()) > limit:
        return Reply([_text(" ".join(text.split()[:limit]))], "max_tokens")
    return Reply([_text(text)], "end_turn")


def _calls(model: str, body: JSON) -> Reply:
    name = body["tools"][0]["name"]
    cities = _CITIES if model == "tools-parallel" else _CITIES[:1]
    calls = [{"type": "tool_use", "id": "", "name": name, "input": {"city": city}} for city in cities]
    if model == "tools-noargs":
        return Reply([{"type": "tool_use", "id": "", "name": name, "input": {}}], "tool_use")
    blocks: list[JSON] = [_text("Let me check.")]
    if model == "thinking":
        thought = "The user wants the weather; the tool knows it."
        blocks.insert(0, {"type": "thinking", "thinking": thought, "signature": signature_of(thought)})
    return Reply(blocks + calls, "tool_use")


def _check_thinking_came_back(messages: list[JSON]) -> None:
    turn = messages[-2]["content"] if len(messages) > 1 else []
    first = turn[0] if isinstance(turn, list) and turn else {}
    if first.get("type") != "thinking":
        raise invalid(
            f"messages.{len(messages) - 2}.content.0.type: Expected `thinking` or `redacted_thinking`, but found "
            f"`{first.get('type')}`. When `thinking` is enabled, a final `assistant` message must start with a "
            "thinking block (preceeding the lastmost set of `tool_use` and `tool_result` blocks)."
        )
    if first.get("signature") != signature_of(first.get("thinking", "")):
        raise invalid(f"messages.{len(messages) - 2}.content.0: Invalid `signature` in `thinking` block")


def _tool_results(message: JSON) -> list[str]:
    if message["role"] != "user" or not isinstance(message["content"], list):
        return []
    return [_text_of(b) for b in message["content"] if b.get("type") == "tool_result"]


def _text_of(item: JSON) -> str:
    """The text of a message or block: its string content or its text blocks."""
    content = item.get("content", item.get("text", ""))
    if isinstance(content, str):
        return content
    return " ".join(b.get("text", "") for b in content if b.get("type") == "text")


def _text(text: str) -> JSON:
    return {"type": "text", "text": text}


def _usage(model: str, body: JSON, blocks: list[JSON]) -> JSON:
    system = body.get("system") or ""
    prompt = sum(len(_text_of(m).split()) for m in body["messages"])
    prompt += len(system.split()) if isinstance(system, str) else sum(len(b["text"].split()) for b in system)
    output = sum(len(json.dumps(b.get("input") or b.get("text") or b.get("thinking")).split()) for b in blocks)
    cache_read, cache_write = (100, 20) if model == "cached" else (0, 0)
    return {
        "input_tokens": prompt,
        "cache_creation_input_tokens": cache_write,
        "cache_read_input_tokens": cache_read,
        "cache_creation": {"ephemeral_5m_input_tokens": cache_write, "ephemeral_1h_input_tokens": 0},
        "output_tokens": output,
        "service_tier": "standard",
    }


# ------------------------------------------------------------------------------ streams


def stream_events(message: JSON) -> list[JSON]:
    """The stream of `message` as Anthropic sends it: message_start (usage so far), a
    ping, each block's start / deltas / stop, message_delta (stop reason, cumulative
    usage), message_stop."""
    usage = message["usage"]
    start = {
        **message,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {**usage, "output_tokens": 1},
    }
    events: list[JSON] = [{"type": "message_start", "message": start}, {"type": "ping"}]
    for index, block in enumerate(message["content"]):
        events += _block_events(index, block)
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": message["stop_sequence"]}
    cumulative = {key: usage[key] for key in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")}
    events.append(
        {"type": "message_delta", "delta": stop, "usage": {**cumulative, "output_tokens": usage["output_tokens"]}}
    )
    events.append({"type": "message_stop"})
    return events


def _block_events(index: int, block: JSON) -> list[JSON]:
    kind = block["type"]
    deltas: list[JSON]
    if kind == "text":
        start: JSON = {"type": "text", "text": ""}
        deltas = [{"type": "text_delta", "text": piece} for piece in re.findall(r"\S+\s*|\s+", block["text"])]
    elif kind == "thinking":
        start = {"type": "thinking", "thinking": "", "signature": ""}
        pieces = re.findall(r"\S+\s*", block["thinking"])
        deltas = [{"type": "thinking_delta", "thinking": piece} for piece in pieces]
        deltas.append({"type": "signature_delta", "signature": block["signature"]})
    else:
        start = {**block, "input": {}}
        arguments = json.dumps(block["input"]) if block["input"] else ""
        pieces = [arguments[i : i + 5] for i in range(0, len(arguments), 5)] or [""]
        deltas = [{"type": "input_json_delta", "partial_json": piece} for piece in pieces]
    return [
        {"type": "content_block_start", "index": index, "content_block": start},
        *({"type": "content_block_delta", "index": index, "delta": delta} for delta in deltas),
        {"type": "content_block_stop", "index": index},
    ]


def _event(data: JSON) -> bytes:
    return f"event: {data['type']}\ndata: {json.dumps(data)}\n\n".encode()


def _sse(events: AsyncGenerator[bytes, None]) -> Response:
    return Response(200, content_type="text/event-stream; charset=utf-8", stream=events)


async def _events(items: list[bytes]) -> AsyncGenerator[bytes, None]:
    for item in items:
        yield item
