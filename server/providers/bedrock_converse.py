"""Pure translation between OpenAI's chat format and AWS Bedrock's Converse API.

Requests (OpenAI chat → Converse):
  - system and developer messages → `system` text blocks;
  - user text parts → text blocks; an `image_url` part with a base64 data URL → an
    image block (`format` from the MIME type, `source.bytes` base64 as the JSON wire
    carries blobs); http(s) image URLs are refused: Converse takes bytes or S3 only;
  - assistant `tool_calls` → `toolUse` blocks (`arguments` parsed to the `input`
    object); `tool` messages → `toolResult` blocks in a user message. Converse wants
    the roles to alternate, so consecutive messages of one role become one message;
  - `max_completion_tokens` / `max_tokens` → `inferenceConfig.maxTokens`,
    `temperature`, `top_p` → `topP`, `stop` → `stopSequences`;
  - tools → `toolConfig.tools[].toolSpec` (`parameters` → `inputSchema.json`);
    `tool_choice` auto / required / a function → auto / any / tool; `response_format`
    json_schema → `outputConfig.textFormat` (the schema as a JSON string). Converse has
    no tool_choice "none" and no schema-less JSON mode: those are refused, like n > 1,
    penalties, logit_bias, seed and logprobs, rather than dropped.

Answers: text blocks → `content`, `reasoningContent` → `reasoning_content`, `toolUse`
blocks → `tool_calls` (the toolUseId is the call id); `stopReason` → finish_reason
(`FINISH_REASONS`); usage → OpenAI usage, where prompt_tokens counts cache reads and
writes too (Bedrock's inputTokens does not) and `cached_tokens` the reads.

Streams (ConverseStream events, already unframed): messageStart → the role chunk,
contentBlockStart of a toolUse → the call's id and name, contentBlockDelta → text,
reasoning or argument pieces, messageStop → the finish reason, metadata → the usage
chunk (last, no choices). Tool calls are numbered among tool calls, not by block index.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from typing import Any

from server import errors
from server.providers.base import JSON

FINISH_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "guardrail_intervened": "content_filter",
    "content_filtered": "content_filter",
}
_IMAGE_FORMATS = {
    "image/png": "png",
    "image/jpeg": "jpeg",
    "image/jpg": "jpeg",
    "image/gif": "gif",
    "image/webp": "webp",
}
_DATA_URL = re.compile(r"data:(?P<mime>[\w/+.-]+);base64,(?P<data>.*)", re.DOTALL)
# OpenAI fields Converse has no equivalent for: refused, never dropped.
_UNSUPPORTED = (
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "presence_penalty",
    "frequency_penalty",
    "seed",
    "audio",
    "modalities",
    "prediction",
)


def unsupported(provider: str, feature: str, message: str) -> errors.UnsupportedFeature:
    return errors.UnsupportedFeature(
        f"{provider} (Bedrock Converse) {message}",
        field=feature,
        metadata={"provider": provider, "feature": feature},
    )


def to_converse_request(provider: str, request: JSON) -> JSON:
    """The Converse body for an OpenAI chat request (the model goes in the URL)."""
    _refuse_unsupported(provider, request)
    system, messages = _conversation(provider, request.get("messages") or [])
    body: JSON = {"messages": messages}
    if system:
        body["system"] = system
    if inference := _inference_config(request):
        body["inferenceConfig"] = inference
    if tool_config := _tool_config(provider, request):
        body["toolConfig"] = tool_config
    if output_config := _output_config(provider, request.get("response_format")):
        body["outputConfig"] = output_config
    return body


def _output_config(provider: str, response_format: Any) -> JSON | None:
    """json_schema → Converse's structured output; plain text needs nothing."""
    kind = (response_format or {}).get("type", "text")
    if kind == "text":
        return None
    if kind != "json_schema":
        raise unsupported(provider, "response_format", f"has no response_format {kind!r} (json_schema only)")
    spec = response_format.get("json_schema") or {}
    schema: JSON = {
        "schema": json.dumps(spec.get("schema") or {"type": "object"}),
        "name": spec.get("name") or "output",
    }
    if spec.get("description"):
        schema["description"] = spec["description"]
    return {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": schema}}}


def _refuse_unsupported(provider: str, request: JSON) -> None:
    for name in _UNSUPPORTED:
        if request.get(name) not in (None, False):
            raise unsupported(provider, name, f"has no equivalent of {name}")
    if (request.get("n") or 1) > 1:
        raise unsupported(provider, "n", "answers one choice per call (n must be 1)")


def _inference_config(request: JSON) -> JSON:
    config: JSON = {}
    max_tokens = request.get("max_completion_tokens") or request.get("max_tokens")
    if max_tokens:
        config["maxTokens"] = max_tokens
    if request.get("temperature") is not None:
        config["temperature"] = request["temperature"]
    if request.get("top_p") is not None:
        config["topP"] = request["top_p"]
    stop = request.get("stop")
    if stop:
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    return config


def _tool_config(provider: str, request: JSON) -> JSON | None:
    tools = request.get("tools") or []
    if not tools:
        return None
    specs = []
    for tool in tools:
        function = tool.get("function") or {}
        spec: JSON = {
            "name": function.get("name", ""),
            "inputSchema": {"json": function.get("parameters") or {"type": "object"}},
        }
        if function.get("description"):
            spec["description"] = function["description"]
        specs.append({"toolSpec": spec})
    config: JSON = {"tools": specs}
    choice = request.get("tool_choice")
    if choice == "none":
        raise unsupported(provider, "tool_choice", "has no tool_choice 'none' (leave the tools out instead)")
    if choice == "required":
        config["toolChoice"] = {"any": {}}
    elif isinstance(choice, dict) and (name := (choice.get("function") or {}).get("name")):
        config["toolChoice"] = {"tool": {"name": name}}
    elif choice == "auto":
        config["toolChoice"] = {"auto": {}}
    return config


def _conversation(provider: str, messages: list[JSON]) -> tuple[list[JSON], list[JSON]]:
    system: list[JSON] = []
    turns: list[JSON] = []
    for index, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{index}]"
        if role in ("system", "developer"):
            system += [{"text": text} for text in _texts(message.get("content"))]
            continue
        if role == "user":
            blocks, bedrock_role = _user_blocks(provider, message.get("content"), where), "user"
        elif role == "assistant":
            blocks, bedrock_role = _assistant_blocks(message, where), "assistant"
        elif role == "tool":
            blocks, bedrock_role = [_tool_result(message)], "user"
        else:
            raise errors.InvalidRequest(f"{where}.role {role!r} is not a chat role", field=f"{where}.role")
        if turns and turns[-1]["role"] == bedrock_role:
            turns[-1]["content"] += blocks
        else:
            turns.append({"role": bedrock_role, "content": blocks})
    return system, turns


def _parts(content: Any) -> list[JSON]:
    if content is None:
        return []
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return [part for part in content if isinstance(part, dict)]


def _texts(content: Any) -> list[str]:
    return [str(part.get("text") or "") for part in _parts(content) if part.get("type") == "text"]


def _user_blocks(provider: str, content: Any, where: str) -> list[JSON]:
    blocks: list[JSON] = []
    for number, part in enumerate(_parts(content)):
        kind = part.get("type")
        if kind == "text":
            blocks.append({"text": part.get("text") or ""})
        elif kind == "image_url":
            blocks.append(_image_block(provider, part.get("image_url") or {}, f"{where}.content[{number}]"))
        else:
            raise unsupported(provider, str(kind), f"takes no {kind!r} content parts")
    return blocks


def _image_block(provider: str, image: JSON, where: str) -> JSON:
    url = str(image.get("url") or "")
    match = _DATA_URL.fullmatch(url)
    if match is None:
        raise unsupported(provider, "image_url", "takes images as base64 data URLs only, not links")
    image_format = _IMAGE_FORMATS.get(match["mime"].lower())
    if image_format is None:
        raise errors.InvalidRequest(
            f"{where}: image type {match['mime']!r} is not one of png, jpeg, gif, webp", field=f"{where}.image_url"
        )
    try:
        base64.b64decode(match["data"], validate=True)
    except binascii.Error as exc:
        raise errors.InvalidRequest(f"{where}: the image data URL is not valid base64", field=where) from exc
    return {"image": {"format": image_format, "source": {"bytes": match["data"]}}}


def _assistant_blocks(message: JSON, where: str) -> list[JSON]:
    blocks: list[JSON] = [{"text": text} for text in _texts(message.get("content")) if text]
    for number, call in enumerate(message.get("tool_calls") or []):
        function = call.get("function") or {}
        arguments = function.get("arguments") or "{}"
        try:
            parsed = json.loads(arguments)
        except ValueError as exc:
            field = f"{where}.tool_calls[{number}].function.arguments"
            raise errors.InvalidRequest(f"{field} is not valid JSON", field=field) from exc
        blocks.append({"toolUse": {"toolUseId": call.get("id", ""), "name": function.get("name", ""), "input": parsed}})
    return blocks


def _tool_result(message: JSON) -> JSON:
    text = "".join(_texts(message.get("content")))
    return {"toolResult": {"toolUseId": message.get("tool_call_id", ""), "content": [{"text": text}]}}


# -- answers ---------------------------------------------------------------------------


def to_chat_completion(answer: JSON, *, completion_id: str, model: str, created: int) -> JSON:
    """The OpenAI `chat.completion` for a Converse answer."""
    content = ((answer.get("output") or {}).get("message") or {}).get("content") or []
    texts, reasoning, calls = [], [], []
    for block in content:
        if "text" in block:
            texts.append(block["text"])
        elif "reasoningContent" in block:
            reasoning.append(((block["reasoningContent"].get("reasoningText") or {}).get("text")) or "")
        elif "toolUse" in block:
            calls.append(_tool_call(block["toolUse"]))
    message: JSON = {"role": "assistant", "content": "".join(texts) or None}
    if reasoning:
        message["reasoning_content"] = "".join(reasoning)
    if calls:
        message["tool_calls"] = calls
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason(answer.get("stopReason"))}],
        "usage": to_usage(answer.get("usage") or {}),
    }


def _tool_call(tool_use: JSON) -> JSON:
    arguments = json.dumps(tool_use.get("input") or {})
    return {
        "id": tool_use.get("toolUseId", ""),
        "type": "function",
        "function": {"name": tool_use.get("name", ""), "arguments": arguments},
    }


def finish_reason(stop_reason: Any) -> str:
    return FINISH_REASONS.get(str(stop_reason), "stop")


def to_usage(usage: JSON) -> JSON:
    cache_read = int(usage.get("cacheReadInputTokens") or 0)
    prompt = int(usage.get("inputTokens") or 0) + cache_read + int(usage.get("cacheWriteInputTokens") or 0)
    completion = int(usage.get("outputTokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


class StreamTranslator:
    """Turns ConverseStream events (`(event type, payload)`) into OpenAI chunks."""

    def __init__(self, *, completion_id: str, model: str, created: int) -> None:
        self._base: JSON = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        # contentBlockIndex -> the OpenAI tool-call index of a toolUse block.
        self._tool_index: dict[int, int] = {}
        self.stopped = False
        self.usage_seen = False

    def feed(self, event_type: str, payload: JSON) -> list[JSON]:
        handler = {
            "messageStart": self._message_start,
            "contentBlockStart": self._block_start,
            "contentBlockDelta": self._block_delta,
            "messageStop": self._message_stop,
            "metadata": self._metadata,
        }.get(event_type)
        return handler(payload) if handler else []  # contentBlockStop and new event types carry nothing

    def _chunk(self, delta: JSON, finish: str | None = None) -> JSON:
        return {**self._base, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    def _message_start(self, payload: JSON) -> list[JSON]:
        return [self._chunk({"role": payload.get("role", "assistant"), "content": ""})]

    def _block_start(self, payload: JSON) -> list[JSON]:
        tool_use = (payload.get("start") or {}).get("toolUse")
        if not tool_use:
            return []
        index = self._tool_index.setdefault(int(payload.get("contentBlockIndex", 0)), len(self._tool_index))
        call = {
            "id": tool_use.get("toolUseId", ""),
            "type": "function",
            "function": {"name": tool_use.get("name", ""), "arguments": ""},
        }
        return [self._chunk({"tool_calls": [{"index": index, **call}]})]

    def _block_delta(self, payload: JSON) -> list[JSON]:
        delta = payload.get("delta") or {}
        if "text" in delta:
            return [self._chunk({"content": delta["text"]})]
        if "reasoningContent" in delta and delta["reasoningContent"].get("text"):
            return [self._chunk({"reasoning_content": delta["reasoningContent"]["text"]})]
        if "toolUse" in delta:
            index = self._tool_index.get(int(payload.get("contentBlockIndex", 0)), 0)
            piece = {"index": index, "function": {"arguments": delta["toolUse"].get("input", "")}}
            return [self._chunk({"tool_calls": [piece]})]
        return []

    def _message_stop(self, payload: JSON) -> list[JSON]:
        self.stopped = True
        return [self._chunk({}, finish_reason(payload.get("stopReason")))]

    def _metadata(self, payload: JSON) -> list[JSON]:
        if "usage" not in payload:
            return []
        self.usage_seen = True
        return [{**self._base, "choices": [], "usage": to_usage(payload["usage"])}]
