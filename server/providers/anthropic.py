"""Anthropic's Messages API (`POST {base_url}/v1/messages`) behind the OpenAI-shaped seam.

Requests (OpenAI chat → Anthropic message):
  - system and developer messages → the top-level `system` (a string, or text blocks
    when there are several or one carries `cache_control`);
  - user parts: text → text blocks, `image_url` → image blocks (a base64 data URL →
    a base64 source, an http(s) URL → a url source), a PDF `file` data URL → a
    document block; assistant `tool_calls` → `tool_use` blocks (the JSON string
    `arguments` → the `input` object); `tool` messages → `tool_result` blocks in a
    user message, consecutive ones (and any user text after them) in one message;
  - `max_completion_tokens` / `max_tokens` → `max_tokens`, which Anthropic requires:
    without one the model's default (`default_max_tokens`) is sent;
  - `stop` → `stop_sequences`; `user` → `metadata.user_id`; `temperature`, `top_p`;
    tools → `tools` (`parameters` → `input_schema`); `tool_choice` auto / none /
    required / a function → auto / none / any / tool; `parallel_tool_calls: false` →
    `disable_parallel_tool_use`; `response_format` json_schema → the native structured
    output `output_config.format`; `reasoning_effort` → `output_config.effort`.
  - Anthropic has no equivalent for n > 1, penalties, logit_bias, seed, logprobs or a schema-less
    JSON mode: those raise `UnsupportedFeature` rather than being dropped.

Responses: the message id is the completion id and tool_use ids are the tool call
ids; text blocks → `content`, thinking blocks → `reasoning_content`; stop_reason →
finish_reason (`FINISH_REASONS`); usage → OpenAI usage, where prompt_tokens counts
cache reads and writes too and `cached_tokens` the cache reads. A stream's events
(message_start, content_block_start/delta/stop, message_delta with CUMULATIVE usage,
message_stop, ping, error) become chunks; tool calls are numbered among tool calls,
not by content block index.

Models that think (adaptive thinking is on by default on current Claude models) need
the thinking blocks of a tool-calling turn sent back with the tool results, and
OpenAI's format has no place for them: `server.providers.anthropic_turns` keeps such
turns in the shared conversation store (every replica, restarts included) and puts
them back when a client echoes the same tool calls.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import AsyncGenerator, Mapping
from typing import Any

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ModelEntry, ProviderConfig
from server.providers.anthropic_turns import Recall, ThinkingTurns
from server.providers.base import JSON, Capability
from server.providers.conversation_state import ConversationStore
from server.providers.spec import ProviderSpec
from server.providers.transport import Headers, Transport, parse_object, retry_after_seconds, upstream_status_error

API_VERSION = "2023-06-01"
DEFAULT_BASE_URL = "https://api.anthropic.com"
API_KEY_ENV = "ANTHROPIC_API_KEY"
BASE_URL_ENV = "ANTHROPIC_BASE_URL"

_C = Capability
CLAUDE_CHAT = frozenset({_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.VISION, _C.JSON_SCHEMA})
CLAUDE_MODELS = tuple(
    ModelEntry(id=model_id, capabilities=sorted(CLAUDE_CHAT))
    for model_id in ("claude-opus-5-5", "claude-sonnet-5-5", "claude-haiku-5-5", "claude-haiku-4-5")
)

# stop_reason → finish_reason; pause_turn (a server tool's long turn) ends the turn too.
FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}

# Anthropic's error types → the gateway's errors. Billing is the operator's to fix,
# like a bad key, so it counts as a refusal rather than an outage; only
# authentication_error (401) says the key itself is invalid.
_ERROR_KINDS: dict[str, type[errors.UpstreamError]] = {
    "invalid_request_error": errors.UpstreamBadRequest,
    "authentication_error": errors.UpstreamCredentialRejected,
    "permission_error": errors.UpstreamAuthFailed,
    "billing_error": errors.UpstreamAuthFailed,
    "not_found_error": errors.UpstreamNotFound,
    "rate_limit_error": errors.UpstreamRateLimited,
    "timeout_error": errors.UpstreamTimeout,
    "api_error": errors.UpstreamUnavailable,
    "overloaded_error": errors.UpstreamUnavailable,
}

# 32K is the output limit of the Claude 4+ model with the smallest one (Opus 4/4.1),
# so it is valid for all of them; the larger limits (64K, 128K) are not used as a
# default because output rate limits and idle connections punish needlessly large
# `max_tokens`. Older models have smaller limits.
_DEFAULT_MAX_TOKENS = 32_000
_OLD_MODEL_MAX_TOKENS = (("claude-3-5-", 8192), ("claude-3-7-", 32_000), ("claude-3-", 4096))
# Structured outputs exist from the 4.5 generation on.
_NO_STRUCTURED_OUTPUTS = re.compile(r"claude-(3-|opus-4-(0|1|2025)|sonnet-4-(0|2025))")
_DATA_URL = re.compile(r"data:(?P<media>[\w.+-]+/[\w.+-]+)(;[^,;]*)*;base64,(?P<data>.*)", re.DOTALL)


def default_max_tokens(model: str) -> int:
    """The `max_tokens` sent when the client gave none (Anthropic requires one)."""
    for prefix, limit in _OLD_MODEL_MAX_TOKENS:
        if model.startswith(prefix):
            return limit
    return _DEFAULT_MAX_TOKENS


class AnthropicAdapter:
    """Speaks Anthropic's Messages API at `base_url` (without `/v1`)."""

    # Where the key, and a call's credential, go (see server.providers.transport).
    credential_header = ("x-api-key", "")

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        transport: Transport,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = CLAUDE_CHAT,
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        # Tolerate an OpenAI-style base URL that already ends in /v1.
        self._url = base_url.rstrip("/").removesuffix("/v1") + "/v1/messages"
        self._http = transport.upstream(
            name,
            credential_header=self.credential_header,
            api_key=api_key,
            headers={"anthropic-version": API_VERSION, **(extra_headers or {})},
            error_reader=self._status_error,
        )
        self.turns = ThinkingTurns()

    def keep_state_in(self, store: ConversationStore, ttl_s: float) -> None:
        """Thinking turns go to `store` (shared by every replica) instead of process memory."""
        self.turns = ThinkingTurns(store, ttl_s)

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the provider's models with `secret` (see `base.CredentialProbe`)."""
        await self._http.send("GET", self._url.removesuffix("/messages") + "/models?limit=1", probe_call(secret))

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = to_messages_request(self.name, request, model, await self.turns.recall_for(request))
        message = await self._http.post_json(self._url, body, call)
        completion = to_chat_completion(self.name, message, int(time.time()))
        if message.get("stop_reason") == "tool_use":
            await self.turns.remember(message["content"])
        return completion

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        recall = await self.turns.recall_for(request)
        body = {**to_messages_request(self.name, request, model, recall), "stream": True}
        translator = StreamTranslator(self.name, int(time.time()))
        async with self._http.stream("POST", self._url, call, json=body) as response:
            async for data in response.sse():
                # After message_stop the body is still read to its end: only then does
                # the connection go back to the pool instead of being dropped.
                if translator.finished:
                    continue
                chunks = translator.feed(parse_object(self.name, data))
                if translator.finished and translator.stop_reason == "tool_use":
                    await self.turns.remember(translator.blocks())  # before the client can answer the calls
                for chunk in chunks:
                    yield chunk
        if not translator.finished:
            raise errors.UpstreamUnavailable(f"{self.name} ended the stream before message_stop", provider=self.name)

    def _status_error(self, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
        return anthropic_error(self.name, status, headers, content)


def anthropic_error(provider: str, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
    """The gateway's error for an Anthropic error answer (its body's `error.type` first)."""
    kind, message = _error_fields(content)
    error_class = _ERROR_KINDS.get(kind or "")
    if error_class is None:  # an unknown or missing type: the status decides
        return upstream_status_error(provider, status, headers, message)
    return error_class(
        f"{provider} answered {status} ({kind}): {message}",
        provider=provider,
        status=status,
        retry_after_seconds=retry_after_seconds(headers),
    )


# ------------------------------------------------------------------------- requests


def to_messages_request(provider: str, request: JSON, model: str, memory: Recall | None = None) -> JSON:
    """The Anthropic Messages request for an OpenAI chat request."""
    _refuse_unsupported(provider, request)
    system, messages = _conversation(provider, request.get("messages") or [], memory)
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens") or default_max_tokens(model)
    body: JSON = {"model": model, "max_tokens": max_tokens, "messages": messages}
    if system:
        plain = len(system) == 1 and set(system[0]) == {"type", "text"}
        body["system"] = system[0]["text"] if plain else system
    for name in ("temperature", "top_p"):
        if request.get(name) is not None:
            body[name] = request[name]
    stop = request.get("stop")
    if stop:
        body["stop_sequences"] = [stop] if isinstance(stop, str) else list(stop)
    if request.get("user"):
        body["metadata"] = {"user_id": request["user"]}
    if request.get("tools"):
        body["tools"] = [_tool(provider, tool) for tool in request["tools"]]
        if (choice := _tool_choice(request)) is not None:
            body["tool_choice"] = choice
    if output_config := _output_config(provider, request, model):
        body["output_config"] = output_config
    return body


def _refuse_unsupported(provider: str, request: JSON) -> None:
    """Raises for what Anthropic cannot do, instead of silently ignoring it."""
    refused = [
        ("n", (request.get("n") or 1) > 1),
        ("presence_penalty", bool(request.get("presence_penalty"))),
        ("frequency_penalty", bool(request.get("frequency_penalty"))),
        ("logit_bias", bool(request.get("logit_bias"))),
        ("seed", request.get("seed") is not None),
        ("logprobs", bool(request.get("logprobs"))),
    ]
    for feature, asked in refused:
        if asked:
            raise _unsupported(provider, feature, f"{provider} (Anthropic) does not support {feature}")
    if (request.get("temperature") or 0) > 1:
        raise errors.InvalidRequest(
            f"{provider} (Anthropic) accepts temperature from 0 to 1, got {request['temperature']:g}",
            field="temperature",
        )


def _unsupported(provider: str, feature: str, message: str) -> errors.UnsupportedFeature:
    return errors.UnsupportedFeature(message, field=feature, metadata={"provider": provider, "feature": feature})


def _conversation(provider: str, messages: list[JSON], memory: Recall | None) -> tuple[list[JSON], list[JSON]]:
    """The system blocks and the user/assistant turns of an OpenAI conversation.

    Consecutive messages that map to the same role share one turn: tool results
    become one user message, with any user text after them.
    """
    system: list[JSON] = []
    turns: list[JSON] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role")
        if role in ("system", "developer"):
            system += _text_blocks(provider, message.get("content"), where)
            continue
        if role == "assistant":
            blocks = _assistant_blocks(provider, message, where)
            blocks = memory.recall(blocks) if memory is not None else blocks
        elif role == "tool":
            blocks = [_tool_result(provider, message, where)]
        else:
            blocks = _user_blocks(provider, message.get("content"), where)
        anthropic_role = "assistant" if role == "assistant" else "user"
        if not blocks:
            continue  # Anthropic refuses empty content; an empty message says nothing
        if turns and turns[-1]["role"] == anthropic_role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": anthropic_role, "content": blocks})
    return system, turns


def _parts(content: Any) -> list[JSON]:
    """Message content as a list of OpenAI content parts."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [part for part in content or [] if isinstance(part, dict)]


def _text_block(part: JSON) -> JSON | None:
    """A text block for a text (or refusal) part; None for empty text, which
    Anthropic refuses. `cache_control` is kept for prompt caching."""
    text = part.get("text") if part.get("type") == "text" else part.get("refusal")
    if not text:
        return None
    block: JSON = {"type": "text", "text": text}
    if "cache_control" in part:
        block["cache_control"] = part["cache_control"]
    return block


def _text_blocks(provider: str, content: Any, where: str) -> list[JSON]:
    blocks = []
    for index, part in enumerate(_parts(content)):
        if part.get("type") not in ("text", "refusal"):
            kind = part.get("type")
            raise _unsupported(provider, f"{where}.content[{index}]", f"{provider} accepts only text here, not {kind}")
        if (block := _text_block(part)) is not None:
            blocks.append(block)
    return blocks


def _user_blocks(provider: str, content: Any, where: str) -> list[JSON]:
    blocks = []
    for index, part in enumerate(_parts(content)):
        part_where = f"{where}.content[{index}]"
        kind = part.get("type")
        block: JSON | None
        if kind in ("text", "refusal"):
            block = _text_block(part)
        elif kind == "image_url":
            block = _image_block(part.get("image_url") or {}, part_where)
        elif kind == "file":
            block = _document_block(provider, part.get("file") or {}, part_where)
        else:
            raise _unsupported(provider, part_where, f"{provider} (Anthropic) does not accept {kind} content")
        if block is not None:
            blocks.append(block)
    return blocks


def _image_block(image: JSON, where: str) -> JSON:
    url = str(image.get("url") or "")
    if url.startswith("data:"):
        match = _DATA_URL.fullmatch(url)
        if match is None:
            raise errors.InvalidRequest(
                f"{where}.image_url.url: a data URL must be data:<media type>;base64,<data>",
                field=f"{where}.image_url.url",
            )
        source = {"type": "base64", "media_type": match["media"], "data": match["data"]}
        return {"type": "image", "source": source}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise errors.InvalidRequest(
        f"{where}.image_url.url must be an http(s) URL or a base64 data URL", field=f"{where}.image_url.url"
    )


def _document_block(provider: str, file: JSON, where: str) -> JSON:
    """A PDF sent inline as OpenAI's `file_data` data URL; file ids mean nothing here."""
    match = _DATA_URL.fullmatch(str(file.get("file_data") or ""))
    if match is None or match["media"] != "application/pdf":
        raise _unsupported(provider, where, f"{provider} (Anthropic) accepts files only as base64 PDF data URLs")
    source = {"type": "base64", "media_type": "application/pdf", "data": match["data"]}
    return {"type": "document", "source": source}


def _assistant_blocks(provider: str, message: JSON, where: str) -> list[JSON]:
    content = message.get("content")
    if content is None and message.get("refusal"):
        content = message["refusal"]
    blocks = _text_blocks(provider, content, where)
    for index, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        arguments = _arguments(function.get("arguments"), f"{where}.tool_calls[{index}].function.arguments")
        blocks.append({"type": "tool_use", "id": call.get("id"), "name": function.get("name"), "input": arguments})
    return blocks


def _arguments(arguments: Any, where: str) -> JSON:
    """OpenAI's JSON-string arguments as Anthropic's input object."""
    try:
        parsed = json.loads(arguments) if arguments else {}
    except ValueError as exc:
        raise errors.InvalidRequest(f"{where} is not valid JSON: {exc}", field=where) from exc
    if not isinstance(parsed, dict):
        raise errors.InvalidRequest(f"{where} must be a JSON object", field=where)
    return parsed


def _tool_result(provider: str, message: JSON, where: str) -> JSON:
    block: JSON = {"type": "tool_result", "tool_use_id": message.get("tool_call_id")}
    content = message.get("content")
    if isinstance(content, str):
        if content:
            block["content"] = content
    elif content_blocks := _user_blocks(provider, content, where):
        block["content"] = content_blocks
    return block


def _tool(provider: str, tool: JSON) -> JSON:
    if tool.get("type", "function") != "function":
        raise _unsupported(provider, "tools", f"{provider} (Anthropic) supports only function tools")
    function = tool.get("function") or {}
    result: JSON = {
        "name": function.get("name"),
        # Anthropic requires a schema; OpenAI's default is a function without parameters.
        "input_schema": function.get("parameters") or {"type": "object", "properties": {}},
    }
    if function.get("description"):
        result["description"] = function["description"]
    if function.get("strict"):
        result["strict"] = True
    return result


def _tool_choice(request: JSON) -> JSON | None:
    choice = request.get("tool_choice")
    result: JSON | None
    if choice is None:
        result = None
    elif isinstance(choice, str):
        result = {"type": {"auto": "auto", "none": "none", "required": "any"}.get(choice, choice)}
    else:
        result = {"type": "tool", "name": (choice.get("function") or {}).get("name")}
    if request.get("parallel_tool_calls") is False and (result or {}).get("type") != "none":
        result = {**(result or {"type": "auto"}), "disable_parallel_tool_use": True}
    return result


def _output_config(provider: str, request: JSON, model: str) -> JSON:
    config: JSON = {}
    response_format = request.get("response_format") or {}
    kind = response_format.get("type", "text")
    if kind == "json_object":
        raise _unsupported(
            provider,
            "response_format",
            f"{provider} (Anthropic) has no schema-less JSON mode: use response_format json_schema",
        )
    if kind == "json_schema":
        if _NO_STRUCTURED_OUTPUTS.match(model):
            raise _unsupported(provider, "response_format", f"{model} does not support structured outputs")
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise errors.InvalidRequest(
                "response_format.json_schema.schema is required", field="response_format.json_schema.schema"
            )
        config["format"] = {"type": "json_schema", "schema": schema}
    if effort := request.get("reasoning_effort"):
        config["effort"] = "low" if effort == "minimal" else effort
    return config


# ------------------------------------------------------------------------ responses


def to_chat_completion(provider: str, message: JSON, created: int) -> JSON:
    """The OpenAI chat.completion for an Anthropic message."""
    blocks = message.get("content")
    if not isinstance(blocks, list) or not isinstance(message.get("id"), str):
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered a message without id or content", provider=provider
        )
    texts = [b.get("text") or "" for b in blocks if b.get("type") == "text"]
    thoughts = [b.get("thinking") or "" for b in blocks if b.get("type") == "thinking"]
    calls = [_tool_call(b) for b in blocks if b.get("type") == "tool_use"]
    reply: JSON = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        reply["tool_calls"] = calls
    if thoughts:
        reply["reasoning_content"] = "".join(thoughts)
    return {
        "id": message["id"],
        "object": "chat.completion",
        "created": created,
        "model": message.get("model") or "",
        "choices": [{"index": 0, "message": reply, "finish_reason": finish_reason(message.get("stop_reason"))}],
        "usage": to_usage(message.get("usage") or {}),
    }


def _tool_call(block: JSON) -> JSON:
    arguments = json.dumps(block.get("input") or {}, ensure_ascii=False)
    return {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": arguments}}


def finish_reason(stop_reason: str | None) -> str:
    return FINISH_REASONS.get(stop_reason or "", "stop")


def to_usage(usage: JSON) -> JSON:
    """OpenAI usage for Anthropic's: input_tokens excludes the cached part, which
    OpenAI's prompt_tokens includes."""
    cache_read = int(usage.get("cache_read_input_tokens") or 0)
    cache_write = int(usage.get("cache_creation_input_tokens") or 0)
    prompt = int(usage.get("input_tokens") or 0) + cache_read + cache_write
    completion = int(usage.get("output_tokens") or 0)
    thinking = int((usage.get("output_tokens_details") or {}).get("thinking_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
        "completion_tokens_details": {"reasoning_tokens": thinking},
    }


class StreamTranslator:
    """Turns Anthropic stream events into OpenAI chunks, one event at a time."""

    def __init__(self, provider: str, created: int) -> None:
        self.provider = provider
        self.created = created
        self.id = ""
        self.model = ""
        self.usage: JSON = {}
        self.stop_reason: str | None = None
        self.finished = False
        self._blocks: dict[int, JSON] = {}  # content block index → the block so far
        self._tool_index: dict[int, int] = {}  # content block index → tool call index
        self._arguments: dict[int, str] = {}  # content block index → input JSON so far

    def feed(self, event: JSON) -> list[JSON]:
        handler = {
            "message_start": self._message_start,
            "content_block_start": self._block_start,
            "content_block_delta": self._block_delta,
            "content_block_stop": self._block_stop,
            "message_delta": self._message_delta,
            "message_stop": self._message_stop,
            "error": self._error,
        }.get(str(event.get("type")))
        # ping, and event types added later, carry nothing for the client.
        return handler(event) if handler else []

    def blocks(self) -> list[JSON]:
        """The message's content blocks as they would be in a complete response."""
        result = []
        for index in sorted(self._blocks):
            block = dict(self._blocks[index])
            if block.get("type") == "tool_use":
                try:
                    block["input"] = json.loads(self._arguments.get(index) or "{}")
                except ValueError:
                    block["input"] = None  # then no client's echo matches it
            result.append(block)
        return result

    def _chunk(self, delta: JSON, finish: str | None = None) -> JSON:
        choice = {"index": 0, "delta": delta, "finish_reason": finish}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _message_start(self, event: JSON) -> list[JSON]:
        message = event.get("message") or {}
        self.id = str(message.get("id") or "")
        self.model = str(message.get("model") or "")
        self.usage = dict(message.get("usage") or {})
        return [self._chunk({"role": "assistant", "content": ""})]

    def _block_start(self, event: JSON) -> list[JSON]:
        index = int(event.get("index", 0))
        block = dict(event.get("content_block") or {})
        self._blocks[index] = block
        kind = block.get("type")
        if kind == "tool_use":
            self._tool_index[index] = len(self._tool_index)
            self._arguments[index] = ""
            head = {"id": block.get("id"), "type": "function", "function": {"name": block.get("name"), "arguments": ""}}
            return [self._tool_chunk(index, head)]
        if kind == "text" and block.get("text"):
            return [self._chunk({"content": block["text"]})]
        if kind == "thinking" and block.get("thinking"):
            return [self._chunk({"reasoning_content": block["thinking"]})]
        return []

    def _block_delta(self, event: JSON) -> list[JSON]:
        index = int(event.get("index", 0))
        delta = event.get("delta") or {}
        block = self._blocks.setdefault(index, {})
        kind = delta.get("type")
        if kind == "text_delta":
            block["text"] = block.get("text", "") + delta.get("text", "")
            return [self._chunk({"content": delta.get("text", "")})]
        if kind == "input_json_delta" and index in self._tool_index:
            fragment = str(delta.get("partial_json") or "")
            self._arguments[index] += fragment
            return [self._tool_chunk(index, {"function": {"arguments": fragment}})] if fragment else []
        if kind == "thinking_delta":
            block["thinking"] = block.get("thinking", "") + delta.get("thinking", "")
            return [self._chunk({"reasoning_content": delta.get("thinking", "")})]
        if kind == "signature_delta":
            block["signature"] = block.get("signature", "") + delta.get("signature", "")
        return []  # citations and delta types added later

    def _block_stop(self, event: JSON) -> list[JSON]:
        index = int(event.get("index", 0))
        if index in self._tool_index and not self._arguments[index]:
            # A call without arguments streams no input JSON; "" would not parse.
            self._arguments[index] = "{}"
            return [self._tool_chunk(index, {"function": {"arguments": "{}"}})]
        return []

    def _tool_chunk(self, index: int, call: JSON) -> JSON:
        return self._chunk({"tool_calls": [{"index": self._tool_index[index], **call}]})

    def _message_delta(self, event: JSON) -> list[JSON]:
        self.stop_reason = (event.get("delta") or {}).get("stop_reason") or self.stop_reason
        # Its usage is cumulative: each count replaces the one before.
        self.usage.update({k: v for k, v in (event.get("usage") or {}).items() if v is not None})
        return []

    def _message_stop(self, _: JSON) -> list[JSON]:
        self.finished = True
        usage_chunk = {**self._chunk({}), "choices": [], "usage": to_usage(self.usage)}
        return [self._chunk({}, finish_reason(self.stop_reason)), usage_chunk]

    def _error(self, event: JSON) -> list[JSON]:
        error = event.get("error") or {}
        kind = str(error.get("type") or "")
        error_class = _ERROR_KINDS.get(kind, errors.UpstreamUnavailable)
        message = f"{self.provider} failed mid-stream ({kind or 'error'}): {error.get('message') or error}"
        raise error_class(message, provider=self.provider)


# ---------------------------------------------------------------------------- plumbing


def _error_fields(content: bytes) -> tuple[str | None, str]:
    """The type and message of Anthropic's error body {"type": "error", "error": {...}}."""
    try:
        error = json.loads(content).get("error")
    except (ValueError, AttributeError):
        error = None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return (str(error.get("type")) if error.get("type") else None), error["message"][:500]
    return None, content.decode("utf-8", "replace").strip()[:500] or "(empty body)"


def build_anthropic_adapter(
    name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport
) -> AnthropicAdapter:
    """The registry's factory: configuration first, then the spec's defaults."""
    return AnthropicAdapter(
        name=name,
        base_url=cfg.base_url or spec.base_url or DEFAULT_BASE_URL,
        api_key=spec.key_from_environment(cfg, os.environ),
        transport=transport,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    if not (environ.get(API_KEY_ENV) or environ.get(BASE_URL_ENV)):
        return None
    return ProviderConfig(api_key_env=API_KEY_ENV, base_url=environ.get(BASE_URL_ENV) or None)


SPEC = ProviderSpec(
    name="anthropic",
    build=build_anthropic_adapter,
    api_key_env=API_KEY_ENV,
    base_url=DEFAULT_BASE_URL,
    capabilities=CLAUDE_CHAT,
    models=CLAUDE_MODELS,
    from_environment=_from_environment,
    adapter="anthropic",
    variables=(API_KEY_ENV, BASE_URL_ENV),
)
