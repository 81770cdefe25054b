"""Mistral's chat completions and embeddings (`POST {base_url}/v1/chat/completions`,
`/v1/embeddings`, Bearer key, base https://api.mistral.ai).

Mistral's API looks like OpenAI's, but it refuses every field it does not document
(422 `extra_forbidden`), so requests are rebuilt field by field instead of forwarded.

Request, OpenAI -> Mistral:
  - `seed` -> `random_seed`; `max_completion_tokens` (else `max_tokens`) -> `max_tokens`;
    `tool_choice: "required"` -> `"any"` (a named function passes as is).
  - temperature, top_p, n, stop, presence/frequency_penalty, response_format, tools,
    parallel_tool_calls, reasoning_effort and metadata keep their names.
  - `stream_options` is never sent: Mistral always puts the usage on its last chunk.
  - `user` and the `name` of non-tool messages only label a request and Mistral has no
    place for them: they are dropped. `logit_bias`, and any field not listed here,
    would change the answer: they are refused with UnsupportedFeature.
  - Messages: "developer" -> "system"; content parts text, image_url, input_audio and
    file (by file_id) become Mistral's chunks, other parts are refused. `refusal` of
    replayed assistant messages is dropped (Mistral rejects the field).
  - Tool call ids must be 9 letters or digits. Other ids (minted by OpenAI or another
    provider) are replaced by a stable 9-character hash of themselves, so that an
    assistant's `tool_calls[].id` and the answering tool message's `tool_call_id` still
    match.

Response, Mistral -> OpenAI:
  - `content` may be a list of chunks: "text" chunks make `content`, "thinking" chunks
    (Magistral) make `reasoning_content`; citation references have no OpenAI field.
  - Tool call `arguments` may be a JSON object: it becomes a JSON string. A missing id
    (or the SDK's "null" placeholder) is replaced by a minted one.
  - finish_reason `model_length` -> `length`; `error` has no OpenAI value and means the
    generation failed: it raises UpstreamUnavailable (after any content before it).
  - Streams: tool calls arrive whole in one delta (parallel calls may all say index 0);
    they are re-emitted in OpenAI's shape, one index per call, id/type/name on its first
    delta. Fragmented calls (later pieces without a real id) are appended to the call of
    their upstream index. The usage carried by the last chunk moves into a closing
    usage-only chunk, as the adapter seam requires.

Embeddings: string inputs only (token arrays are refused); `dimensions` ->
`output_dimension`. Floats are always asked for and base64-encoded by the adapter when
the client wants base64, because Mistral's embedding objects are float lists only.

Errors: `{"object": "error", "message": ...}`, `{"detail": ...}` and 422 validation
lists are all reduced to one message; statuses are mapped by the transport (`upstream_status_error`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import string
import time
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass, field
from typing import Any

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ModelEntry, ProviderConfig
from server.providers.base import JSON, Capability, floats_to_base64
from server.providers.spec import ProviderSpec
from server.providers.transport import Headers, Transport, error_message_from_body, parse_object, upstream_status_error

DEFAULT_BASE_URL = "https://api.mistral.ai"
API_KEY_ENV = "MISTRAL_API_KEY"
CAPABILITIES = frozenset(
    {
        Capability.CHAT,
        Capability.CHAT_STREAM,
        Capability.TOOLS,
        Capability.VISION,
        Capability.JSON_SCHEMA,
        Capability.EMBEDDINGS,
    }
)

# OpenAI request fields Mistral knows under the same name and meaning.
_SAME_NAME = (
    "temperature",
    "top_p",
    "n",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "response_format",
    "parallel_tool_calls",
    "reasoning_effort",
    "metadata",
)
# Handled one by one in `chat_body`; anything else is refused.
_TRANSLATED = ("messages", "tools", "tool_choice", "seed", "max_tokens", "max_completion_tokens")
# Labels that do not change the answer and that Mistral has no field for.
_DROPPED = ("user", "stream", "stream_options")
_FINISH_REASONS = {"stop": "stop", "length": "length", "model_length": "length", "tool_calls": "tool_calls"}
_MISTRAL_ID = re.compile(r"[A-Za-z0-9]{9}")
_ID_ALPHABET = string.ascii_letters + string.digits
_NO_PARAMETERS: JSON = {"type": "object", "properties": {}}
_MAX_MESSAGE_CHARS = 500


class MistralAdapter:
    """Speaks Mistral's REST API at `base_url` (without the `/v1` part)."""

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
        capabilities: frozenset[Capability] = CAPABILITIES,
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        # People often copy the OpenAI-style base (".../v1"); the paths carry /v1 here.
        self._base_url = base_url.rstrip("/").removesuffix("/v1")
        self._http = transport.upstream(
            name,
            credential_header=self.credential_header,
            api_key=api_key,
            headers=extra_headers,
            error_reader=self._status_error,
        )

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the provider's models with `secret` (see `base.CredentialProbe`)."""
        await self._http.send("GET", self._base_url + "/v1/models", probe_call(secret))

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = chat_body(request, model, stream=False)
        answer = await self._http.post_json(self._base_url + "/v1/chat/completions", body, call)
        return completion_from_mistral(answer, self.name)

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        stream = _StreamTranslator(self.name)
        body = chat_body(request, model, stream=True)
        async with self._http.stream("POST", self._base_url + "/v1/chat/completions", call, json=body) as response:
            async for data in response.sse():
                if data == "[DONE]":
                    if (usage := stream.usage_chunk()) is not None:
                        yield usage
                    return
                if (chunk := stream.translate(parse_object(self.name, data))) is not None:
                    yield chunk
                if stream.failed:
                    raise errors.UpstreamUnavailable(
                        f"{self.name} stopped generating with finish_reason 'error'", provider=self.name
                    )
        raise errors.UpstreamUnavailable(f"{self.name} ended the stream before [DONE]", provider=self.name)

    # -- embeddings -------------------------------------------------------------------

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = embedding_body(request, model)
        answer = await self._http.post_json(self._base_url + "/v1/embeddings", body, call)
        return embeddings_from_mistral(answer, request.get("encoding_format") or "float", self.name)

    def _status_error(self, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
        return upstream_status_error(self.name, status, headers, mistral_error_message(content))


def build_mistral(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> MistralAdapter:
    """The registry's factory: base URL and key from the config, else Mistral's defaults."""
    return MistralAdapter(
        name=name,
        base_url=cfg.base_url or spec.base_url or DEFAULT_BASE_URL,
        api_key=spec.key_from_environment(cfg, os.environ),
        transport=transport,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities & CAPABILITIES,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    return ProviderConfig(api_key_env=API_KEY_ENV) if environ.get(API_KEY_ENV) else None


_CHAT_ONLY = [Capability.CHAT, Capability.CHAT_STREAM, Capability.TOOLS, Capability.JSON_SCHEMA]
SPEC = ProviderSpec(
    name="mistral",
    build=build_mistral,
    api_key_env=API_KEY_ENV,
    base_url=DEFAULT_BASE_URL,
    capabilities=CAPABILITIES,
    models=(
        *(
            ModelEntry(id=m, capabilities=[*_CHAT_ONLY, Capability.VISION])
            for m in ("mistral-medium-latest", "mistral-small-latest")
        ),
        ModelEntry(id="mistral-large-latest", capabilities=list(_CHAT_ONLY)),
        ModelEntry(id="mistral-embed", capabilities=[Capability.EMBEDDINGS]),
    ),
    from_environment=_from_environment,
    adapter="mistral",
    variables=(API_KEY_ENV,),
)


# ---------------------------------------------------------------------- chat requests


def chat_body(request: JSON, model: str, *, stream: bool) -> JSON:
    """Mistral's chat request for an OpenAI one (see the module docstring)."""
    _refuse_unknown(request, (*_SAME_NAME, *_TRANSLATED, *_DROPPED, "logit_bias"))
    if request.get("logit_bias"):
        raise _unsupported("logit_bias", "logit_bias")
    body: JSON = {"model": model, "messages": [_message(m, i) for i, m in enumerate(request["messages"])]}
    body.update({key: request[key] for key in _SAME_NAME if key in request})
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None:
        body["max_tokens"] = max_tokens
    if "seed" in request:
        body["random_seed"] = request["seed"]
    if "tools" in request:
        body["tools"] = [_tool(tool) for tool in request["tools"]]
    if "tool_choice" in request:
        choice = request["tool_choice"]
        body["tool_choice"] = "any" if choice == "required" else choice
    body["stream"] = stream
    return body


def _refuse_unknown(request: JSON, known: tuple[str, ...]) -> None:
    for key in request:
        if key not in known:
            raise _unsupported(key, key)


def _unsupported(feature: str, field_name: str) -> errors.UnsupportedFeature:
    return errors.UnsupportedFeature(
        f"provider 'mistral' does not support {feature}",
        field=field_name,
        metadata={"provider": "mistral", "feature": feature},
    )


def _message(message: JSON, index: int) -> JSON:
    role = message.get("role")
    where = f"messages[{index}]"
    content = _content(message.get("content"), f"{where}.content")
    if role in ("system", "developer"):
        return {"role": "system", "content": content}
    if role == "user":
        return {"role": "user", "content": content}
    if role == "tool":
        call_id = mistral_tool_call_id(message.get("tool_call_id") or "")
        out: JSON = {"role": "tool", "content": content, "tool_call_id": call_id}
        if message.get("name"):
            out["name"] = message["name"]
        return out
    out = {"role": "assistant"}
    if content is not None:
        out["content"] = content
    if calls := message.get("tool_calls"):
        out["tool_calls"] = [_tool_call_in(call) for call in calls]
    return out


def _content(content: Any, where: str) -> Any:
    if not isinstance(content, list):
        return content
    return [_part(part, f"{where}[{i}]") for i, part in enumerate(content)]


def _part(part: JSON, where: str) -> JSON:
    kind = part.get("type")
    if kind == "text":
        return {"type": "text", "text": part.get("text", "")}
    if kind == "image_url":
        image = part.get("image_url") or {}
        image_url: JSON = {"url": image.get("url", "")}
        if image.get("detail"):
            image_url["detail"] = image["detail"]
        return {"type": "image_url", "image_url": image_url}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": (part.get("input_audio") or {}).get("data", "")}
    if kind == "file" and (part.get("file") or {}).get("file_id"):
        return {"type": "file", "file_id": part["file"]["file_id"]}
    raise _unsupported(f"content parts of type {kind!r}", where)


def _tool(tool: JSON) -> JSON:
    function = dict(tool.get("function") or {})
    # Mistral requires `parameters`; OpenAI's default is a function without any.
    function.setdefault("parameters", _NO_PARAMETERS)
    return {"type": tool.get("type", "function"), "function": function}


def _tool_call_in(call: JSON) -> JSON:
    function = call.get("function") or {}
    return {
        "id": mistral_tool_call_id(call.get("id") or ""),
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": function.get("arguments", "")},
    }


def mistral_tool_call_id(call_id: str) -> str:
    """`call_id` if Mistral accepts it, else a stable 9-character id derived from it."""
    if _MISTRAL_ID.fullmatch(call_id):
        return call_id
    number = int.from_bytes(hashlib.sha256(call_id.encode()).digest()[:8], "big")
    digits = []
    for _ in range(9):
        number, digit = divmod(number, len(_ID_ALPHABET))
        digits.append(_ID_ALPHABET[digit])
    return "".join(digits)


def _mint_tool_call_id() -> str:
    return "".join(secrets.choice(_ID_ALPHABET) for _ in range(9))


# --------------------------------------------------------------------- chat responses


def completion_from_mistral(answer: JSON, provider: str) -> JSON:
    """OpenAI's `chat.completion` for Mistral's answer."""
    choices = answer.get("choices")
    if not isinstance(choices, list):
        raise errors.UpstreamMalformedResponse(f"{provider} answered without choices", provider=provider)
    completion: JSON = {
        "id": answer.get("id") or f"chatcmpl-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": _created(answer),
        "model": answer.get("model", ""),
        "choices": [_choice(choice, i, provider) for i, choice in enumerate(choices)],
    }
    if isinstance(answer.get("usage"), dict):
        completion["usage"] = _usage(answer["usage"])
    return completion


def _choice(choice: JSON, position: int, provider: str) -> JSON:
    message = choice.get("message") or {}
    text, reasoning = _split_content(message.get("content"))
    calls = message.get("tool_calls")
    # Mistral says "" where OpenAI says null: a turn that only calls tools has no text.
    out: JSON = {"role": "assistant", "content": None if calls and not text else text}
    if reasoning:
        out["reasoning_content"] = reasoning
    if calls:
        out["tool_calls"] = [_tool_call_out(call) for call in calls]
    reason = choice.get("finish_reason")
    if reason == "error":
        raise errors.UpstreamUnavailable(f"{provider} stopped generating with finish_reason 'error'", provider=provider)
    return {"index": choice.get("index", position), "message": out, "finish_reason": _finish_reason(reason)}


def _finish_reason(reason: Any) -> str | None:
    """OpenAI's finish_reason for Mistral's; unknown values pass unchanged."""
    return _FINISH_REASONS.get(reason, reason) if isinstance(reason, str) and reason else None


def _split_content(content: Any) -> tuple[str | None, str | None]:
    """(text, reasoning) of a content that is a string, null or a list of chunks."""
    if not isinstance(content, list):
        return (content if isinstance(content, str) else None), None
    texts = [chunk.get("text", "") for chunk in content if chunk.get("type") == "text"]
    thoughts = [
        piece.get("text", "")
        for chunk in content
        if chunk.get("type") == "thinking"
        for piece in chunk.get("thinking") or []
        if piece.get("type") == "text"
    ]
    return ("".join(texts) if texts else None), ("".join(thoughts) if thoughts else None)


def _tool_call_out(call: JSON) -> JSON:
    function = call.get("function") or {}
    call_id = call.get("id")
    return {
        "id": call_id if call_id and call_id != "null" else _mint_tool_call_id(),
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": _arguments(function.get("arguments"))},
    }


def _arguments(arguments: Any) -> str:
    if arguments is None:
        return ""
    return arguments if isinstance(arguments, str) else json.dumps(arguments)


def _usage(usage: JSON) -> JSON:
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    out: JSON = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": int(usage.get("total_tokens") or prompt + completion),
    }
    details = usage.get("prompt_tokens_details")
    if isinstance(details, dict) and details.get("cached_tokens") is not None:
        out["prompt_tokens_details"] = {"cached_tokens": int(details["cached_tokens"])}
    return out


def _created(answer: JSON) -> int:
    created = answer.get("created")
    return created if isinstance(created, int) else int(time.time())


# ---------------------------------------------------------------------------- streams


@dataclass
class _CallIndices:
    """One choice's streamed tool calls: OpenAI index by call id and by upstream index."""

    by_id: dict[str, int] = field(default_factory=dict)
    by_upstream_index: dict[int, int] = field(default_factory=dict)
    count: int = 0


class _StreamTranslator:
    """Turns Mistral's chunks into OpenAI's, one at a time."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._head: JSON = {}
        self._usage: JSON | None = None
        self._calls: dict[int, _CallIndices] = {}
        # Set when a choice ended with finish_reason "error": the caller raises after
        # passing on what the chunk carried.
        self.failed = False

    def translate(self, event: JSON) -> JSON | None:
        choices = event.get("choices")
        if not isinstance(choices, list):
            message = _message_of(event) or json.dumps(event)[:_MAX_MESSAGE_CHARS]
            raise errors.UpstreamUnavailable(f"{self._provider} failed mid-stream: {message}", provider=self._provider)
        self._head = {
            "id": event.get("id", ""),
            "object": "chat.completion.chunk",
            "created": _created(event),
            "model": event.get("model", ""),
        }
        if isinstance(event.get("usage"), dict):
            self._usage = _usage(event["usage"])
        if not choices:
            return None
        return {**self._head, "choices": [self._choice(choice) for choice in choices]}

    def usage_chunk(self) -> JSON | None:
        return None if self._usage is None else {**self._head, "choices": [], "usage": self._usage}

    def _choice(self, choice: JSON) -> JSON:
        index = int(choice.get("index") or 0)
        reason = choice.get("finish_reason")
        if reason == "error":
            self.failed = True
            reason = None
        return {
            "index": index,
            "delta": self._delta(index, choice.get("delta") or {}),
            "finish_reason": _finish_reason(reason),
        }

    def _delta(self, index: int, delta: JSON) -> JSON:
        out: JSON = {}
        if delta.get("role"):
            out["role"] = delta["role"]
        text, reasoning = _split_content(delta.get("content"))
        if text is not None:
            out["content"] = text
        if reasoning:
            out["reasoning_content"] = reasoning
        if calls := delta.get("tool_calls"):
            indices = self._calls.setdefault(index, _CallIndices())
            out["tool_calls"] = [_call_delta(indices, call) for call in calls]
        return out


def _call_delta(indices: _CallIndices, call: JSON) -> JSON:
    """OpenAI's delta for one streamed Mistral tool call (whole, or a piece of one)."""
    function = call.get("function") or {}
    arguments = _arguments(function.get("arguments"))
    call_id = call.get("id")
    real_id = call_id if isinstance(call_id, str) and call_id not in ("", "null") else None
    upstream_index = int(call.get("index") or 0)
    if real_id is not None and real_id in indices.by_id:
        return {"index": indices.by_id[real_id], "function": {"arguments": arguments}}
    if real_id is None and upstream_index in indices.by_upstream_index:
        return {"index": indices.by_upstream_index[upstream_index], "function": {"arguments": arguments}}
    index = indices.count
    indices.count += 1
    new_id = real_id or _mint_tool_call_id()
    indices.by_id[new_id] = index
    indices.by_upstream_index[upstream_index] = index
    return {
        "index": index,
        "id": new_id,
        "type": "function",
        "function": {"name": function.get("name", ""), "arguments": arguments},
    }


# ------------------------------------------------------------------------- embeddings


def embedding_body(request: JSON, model: str) -> JSON:
    """Mistral's embeddings request for an OpenAI one."""
    _refuse_unknown(request, ("input", "dimensions", "encoding_format", "user"))
    inputs = request.get("input")
    strings = isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs))
    if not strings:
        raise _unsupported("token-array inputs for embeddings", "input")
    body: JSON = {"model": model, "input": inputs}
    if request.get("dimensions") is not None:
        body["output_dimension"] = request["dimensions"]
    return body


def embeddings_from_mistral(answer: JSON, encoding_format: str, provider: str) -> JSON:
    """OpenAI's embedding `list` for Mistral's answer, encoded as the client asked."""
    data = answer.get("data")
    if not isinstance(data, list):
        raise errors.UpstreamMalformedResponse(f"{provider} answered without data", provider=provider)
    items = []
    for position, item in enumerate(data):
        vector = item.get("embedding") if isinstance(item, dict) else None
        if not isinstance(vector, list):
            raise errors.UpstreamMalformedResponse(f"{provider} answered a non-list embedding", provider=provider)
        embedding: Any = floats_to_base64(vector) if encoding_format == "base64" else vector
        items.append({"object": "embedding", "index": item.get("index", position), "embedding": embedding})
    usage = answer.get("usage") or {}
    prompt = int(usage.get("prompt_tokens") or 0)
    return {
        "object": "list",
        "data": items,
        "model": answer.get("model", ""),
        "usage": {"prompt_tokens": prompt, "total_tokens": int(usage.get("total_tokens") or prompt)},
    }


# ---------------------------------------------------------------------------- helpers


def mistral_error_message(body: bytes) -> str:
    """The message of any of Mistral's error bodies, validation lists included."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return error_message_from_body(body)
    return _message_of(parsed) or error_message_from_body(body)


def _message_of(parsed: Any) -> str | None:
    if isinstance(parsed, dict):
        for key in ("message", "detail"):
            if text := _describe(parsed.get(key)):
                return text[:_MAX_MESSAGE_CHARS]
    return None


def _describe(value: Any) -> str | None:
    if isinstance(value, str):
        return value or None
    if isinstance(value, dict):
        return _describe(value.get("detail")) or _describe(value.get("message"))
    if isinstance(value, list):
        return "; ".join(filter(None, (_validation_item(item) for item in value))) or None
    return None


def _validation_item(item: Any) -> str | None:
    """`body.messages.0.user.name: Extra inputs are not permitted` for a pydantic error."""
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("msg"), str):
        location = ".".join(str(part) for part in item.get("loc") or [])
        return f"{location}: {item['msg']}" if location else str(item["msg"])
    return None
