"""Ollama through its native API: `POST /api/chat` (NDJSON streaming) and `/api/embed`.

Why the native API rather than Ollama's OpenAI-compatible `/v1`:
  - usage: every native reply, streamed or not, ends with `prompt_eval_count` and
    `eval_count`; `/v1` reports streamed usage only with `stream_options`, which older
    servers ignore, and billing must not depend on the server's version;
  - sampling: the native `options` object carries everything (num_predict, seed, stop,
    penalties), and `think` turns reasoning on and returns it as `thinking`, which
    becomes `reasoning_content`;
  - errors: the native API answers `{"error": "..."}` with a meaningful status (404
    `model "x" not found, try pulling it first`), also in the middle of a stream, where
    it is one more NDJSON line;
  - images and tool calls are plain in the native API (base64 `images` on a message,
    `tool_calls` with arguments as an object, streamed whole in one message), so the
    translation is exact; `/v1` is documented by Ollama as experimental and partial.
The price is a translation both ways, described here:

Request, OpenAI -> Ollama:
  - messages: "developer" -> "system"; text parts are joined; `image_url` parts must be
    base64 `data:` URLs (Ollama takes no URLs, and the gateway does not fetch them) and
    go to `images`; other parts are refused. Assistant `tool_calls` become Ollama's
    (arguments parsed into an object); a tool message gets the `tool_name` of the call
    it answers, found by `tool_call_id` (Ollama's tool calls have no ids).
  - temperature, top_p, seed, presence/frequency_penalty, stop, and
    `max_completion_tokens` (else `max_tokens`) as `num_predict` go into `options`.
  - `response_format` json_object -> `format: "json"`, json_schema -> `format: <schema>`.
  - `reasoning_effort` -> `think` (minimal -> "low"; "none" -> false).
  - tools keep their name, description and parameters (Ollama has no `strict`);
    `tool_choice: "none"` sends no tools; "required" or a named function, `n` > 1,
    `logit_bias` and `parallel_tool_calls: false` cannot be honoured: UnsupportedFeature.
    `user` and `metadata` only label a request and are dropped.
  - `stream` is always sent: Ollama streams unless told `false`.
Response, Ollama -> OpenAI:
  - ids: Ollama has none; a completion id is minted, and each tool call gets a `call_`
    id (Ollama's own `id`, when a newer server sends one, is kept).
  - finish_reason: tool calls present -> tool_calls; done_reason "length" -> length;
    anything else ("stop", "load", ...) -> stop.
  - usage: prompt_tokens = prompt_eval_count, completion_tokens = eval_count.
  - streams: each NDJSON line becomes a chunk; tool calls get one OpenAI index each; the
    `done` line gives the finish chunk and then the usage-only chunk.
Embeddings: `input` (strings only) -> `input`, `dimensions` passes, `truncate: false`
(OpenAI refuses over-long inputs rather than cutting them). A server too old for
`dimensions` answers full-size vectors: that is refused rather than passed on.

The base URL follows the official client's reading of OLLAMA_HOST (`host`, `host:port`,
`:port`, `http[s]://host[:port][/path]`; default http://127.0.0.1:11434). A key (for
ollama.com, or a proxy) is sent as a Bearer token when configured.
"""

from __future__ import annotations

import ipaddress
import json
import os
import secrets
import time
import urllib.parse
from collections.abc import AsyncGenerator, Mapping
from datetime import datetime
from typing import Any

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ProviderConfig
from server.providers.base import JSON, Capability, floats_to_base64
from server.providers.spec import ProviderSpec
from server.providers.transport import Transport, error_message_from_body

DEFAULT_PORT = 11434
API_KEY_ENV = "OLLAMA_API_KEY"
HOST_ENV = "OLLAMA_HOST"
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

_OPTIONS = ("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty")
_HANDLED = (
    *_OPTIONS,
    "messages",
    "stop",
    "max_tokens",
    "max_completion_tokens",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "n",
    "logit_bias",
)
_DROPPED = ("user", "metadata", "stream", "stream_options")
_THINK = {"none": False, "minimal": "low", "low": "low", "medium": "medium", "high": "high"}


class OllamaAdapter:
    """Speaks Ollama's native REST API at `base_url` (the server's root)."""

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
        self._base_url = ollama_base_url(base_url)
        self._http = transport.upstream(
            name, credential_header=self.credential_header, api_key=api_key, headers=extra_headers
        )

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the pulled models with `secret` (see `base.CredentialProbe`)."""
        await self._http.send("GET", self._base_url + "/api/tags", probe_call(secret))

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = chat_body(request, model, stream=False)
        answer = await self._http.post_json(self._base_url + "/api/chat", body, call)
        return _Translator(self.name).completion(answer)

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        translator = _Translator(self.name)
        body = chat_body(request, model, stream=True)
        async with self._http.stream("POST", self._base_url + "/api/chat", call, json=body) as response:
            async for event in response.ndjson():
                if "error" in event:
                    message = error_message_from_body(json.dumps(event).encode())
                    raise errors.UpstreamUnavailable(f"{self.name} failed mid-stream: {message}", provider=self.name)
                for chunk in translator.chunks(event):
                    yield chunk
                if event.get("done"):
                    return
        raise errors.UpstreamUnavailable(f"{self.name} ended the stream before its last message", provider=self.name)

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        answer = await self._http.post_json(self._base_url + "/api/embed", embed_body(request, model), call)
        return embeddings_from_ollama(answer, request, self.name)


def build_ollama(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> OllamaAdapter:
    """The registry's factory: OLLAMA_HOST-style base URL; a key only if configured."""
    api_key = cfg.resolved_api_key()
    if api_key is None and cfg.api_key_env is None:
        api_key = os.environ.get(API_KEY_ENV) or None
    return OllamaAdapter(
        name=name,
        base_url=cfg.base_url or spec.base_url or "",
        api_key=api_key,
        transport=transport,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities & CAPABILITIES,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    """Ollama needs no key (OLLAMA_API_KEY only for ollama.com); its host enables it."""
    if not environ.get(HOST_ENV):
        return None
    return ProviderConfig(base_url=environ[HOST_ENV], api_key_env=API_KEY_ENV)


SPEC = ProviderSpec(
    name="ollama",
    build=build_ollama,
    # None: no key enables it (its host does); OLLAMA_API_KEY is read when set.
    api_key_env=None,
    capabilities=CAPABILITIES,
    from_environment=_from_environment,
    enabled_by=HOST_ENV,
    adapter="ollama",
    variables=(HOST_ENV, API_KEY_ENV),
)


def ollama_base_url(host: str | None) -> str:
    """The server URL for an OLLAMA_HOST value, read as the official client reads it."""
    host, port = host or "", DEFAULT_PORT
    scheme, _, hostport = host.partition("://")
    if not hostport:
        scheme, hostport = "http", host
    elif scheme == "http":
        port = 80
    elif scheme == "https":
        port = 443
    split = urllib.parse.urlsplit(f"{scheme}://{hostport}")
    hostname = split.hostname or "127.0.0.1"
    try:
        if isinstance(ipaddress.ip_address(hostname), ipaddress.IPv6Address):
            hostname = f"[{hostname}]"
    except ValueError:
        pass  # a name, not an address
    base = f"{scheme}://{hostname}:{split.port or port}"
    path = split.path.strip("/")
    return f"{base}/{path}" if path else base


# ---------------------------------------------------------------------- chat requests


def chat_body(request: JSON, model: str, *, stream: bool) -> JSON:
    """Ollama's /api/chat request for an OpenAI one (see the module docstring)."""
    _refuse_unsupported(request)
    body: JSON = {"model": model, "messages": _messages(request["messages"]), "stream": stream}
    if options := _options(request):
        body["options"] = options
    tools = request.get("tools")
    if tools and request.get("tool_choice") != "none":
        body["tools"] = [_tool(tool) for tool in tools]
    response_format = (request.get("response_format") or {}).get("type")
    if response_format == "json_object":
        body["format"] = "json"
    elif response_format == "json_schema":
        body["format"] = (request["response_format"].get("json_schema") or {}).get("schema") or {}
    if (effort := request.get("reasoning_effort")) is not None:
        if effort not in _THINK:
            raise _unsupported(f"reasoning_effort {effort!r}", "reasoning_effort")
        body["think"] = _THINK[effort]
    return body


def _tool(tool: JSON) -> JSON:
    """Ollama's tool shape; `strict` has no counterpart (Ollama ignores it) and goes."""
    function = {k: v for k, v in (tool.get("function") or {}).items() if k in ("name", "description", "parameters")}
    return {"type": tool.get("type", "function"), "function": function}


def _refuse_unsupported(request: JSON) -> None:
    for key in request:
        if key not in _HANDLED and key not in _DROPPED:
            raise _unsupported(key, key)
    if (request.get("n") or 1) > 1:
        raise _unsupported("n > 1", "n")
    if request.get("logit_bias"):
        raise _unsupported("logit_bias", "logit_bias")
    if request.get("parallel_tool_calls") is False:
        raise _unsupported("parallel_tool_calls false", "parallel_tool_calls")
    if request.get("tool_choice") not in (None, "auto", "none"):
        raise _unsupported("tool_choice other than auto or none", "tool_choice")


def _unsupported(feature: str, field_name: str) -> errors.UnsupportedFeature:
    return errors.UnsupportedFeature(
        f"provider 'ollama' does not support {feature}",
        field=field_name,
        metadata={"provider": "ollama", "feature": feature},
    )


def _options(request: JSON) -> JSON:
    options: JSON = {key: request[key] for key in _OPTIONS if key in request}
    max_tokens = request.get("max_completion_tokens", request.get("max_tokens"))
    if max_tokens is not None:
        options["num_predict"] = max_tokens
    if (stop := request.get("stop")) is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    return options


def _messages(messages: list[JSON]) -> list[JSON]:
    tool_names: dict[str, str] = {}  # tool_call_id -> function name, for tool messages
    out = []
    for index, message in enumerate(messages):
        role = message.get("role")
        where = f"messages[{index}]"
        text, images = _text_and_images(message.get("content"), f"{where}.content")
        item: JSON = {"role": "system" if role == "developer" else role, "content": text}
        if images:
            item["images"] = images
        if role == "assistant" and message.get("tool_calls"):
            item["tool_calls"] = [
                _tool_call_in(call, tool_names, f"{where}.tool_calls[{i}]")
                for i, call in enumerate(message["tool_calls"])
            ]
        if role == "tool" and (name := tool_names.get(message.get("tool_call_id") or "")):
            item["tool_name"] = name
        out.append(item)
    return out


def _text_and_images(content: Any, where: str) -> tuple[str, list[str]]:
    if content is None or isinstance(content, str):
        return content or "", []
    texts: list[str] = []
    images: list[str] = []
    for i, part in enumerate(content):
        kind = part.get("type")
        if kind == "text":
            texts.append(part.get("text", ""))
        elif kind == "image_url":
            images.append(_image_data(str((part.get("image_url") or {}).get("url", "")), f"{where}[{i}]"))
        else:
            raise _unsupported(f"content parts of type {kind!r}", f"{where}[{i}]")
    return "\n".join(texts), images


def _image_data(url: str, where: str) -> str:
    """The base64 payload of a `data:image/...;base64,` URL."""
    header, sep, data = url.partition(",")
    if not (sep and header.startswith("data:") and header.endswith(";base64")):
        raise _unsupported("image URLs other than base64 data: URLs", where)
    return data


def _tool_call_in(call: JSON, tool_names: dict[str, str], where: str) -> JSON:
    function = call.get("function") or {}
    name = function.get("name", "")
    if call.get("id"):
        tool_names[call["id"]] = name
    try:
        arguments = json.loads(function.get("arguments") or "{}")
    except ValueError:
        arguments = None
    if not isinstance(arguments, dict):
        raise errors.InvalidRequest("tool call arguments must be a JSON object", field=f"{where}.function.arguments")
    return {"function": {"name": name, "arguments": arguments}}


# --------------------------------------------------------------------- chat responses


class _Translator:
    """Ollama's chat messages as OpenAI objects; one per call, streamed or not."""

    def __init__(self, provider: str) -> None:
        self._provider = provider
        self._id = f"chatcmpl-{secrets.token_hex(12)}"
        self._created: int | None = None
        self._tool_calls = 0  # streamed so far: the next call's OpenAI index
        self._started = False

    def completion(self, answer: JSON) -> JSON:
        message = self._message(answer)
        calls = [self._tool_call(call) for call in message.get("tool_calls") or []]
        out: JSON = {"role": "assistant", "content": message.get("content") or (None if calls else "")}
        if message.get("thinking"):
            out["reasoning_content"] = message["thinking"]
        if calls:
            out["tool_calls"] = calls
        choice = {"index": 0, "message": out, "finish_reason": _finish_reason(answer, bool(calls))}
        return {**self._head(answer, "chat.completion"), "choices": [choice], "usage": _usage(answer)}

    def chunks(self, event: JSON) -> list[JSON]:
        """The OpenAI chunks for one NDJSON line of a stream."""
        head = self._head(event, "chat.completion.chunk")
        delta = self._delta(self._message(event))
        out = [{**head, "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}] if delta else []
        if event.get("done"):
            reason = _finish_reason(event, self._tool_calls > 0)
            out.append({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": reason}]})
            out.append({**head, "choices": [], "usage": _usage(event)})
        return out

    def _delta(self, message: JSON) -> JSON:
        delta: JSON = {}
        if not self._started:
            delta["role"] = "assistant"
            self._started = True
        if message.get("content"):
            delta["content"] = message["content"]
        if message.get("thinking"):
            delta["reasoning_content"] = message["thinking"]
        if calls := message.get("tool_calls"):
            delta["tool_calls"] = [self._streamed_tool_call(call) for call in calls]
        return delta

    def _streamed_tool_call(self, call: JSON) -> JSON:
        # Ollama streams each call whole, so every call is a new one with the next index.
        index, self._tool_calls = self._tool_calls, self._tool_calls + 1
        return {"index": index, **self._tool_call(call)}

    def _tool_call(self, call: JSON) -> JSON:
        function = call.get("function") or {}
        arguments = function.get("arguments")
        return {
            "id": call.get("id") or f"call_{secrets.token_hex(12)}",
            "type": "function",
            "function": {
                "name": function.get("name", ""),
                "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments or {}),
            },
        }

    def _message(self, event: JSON) -> JSON:
        message = event.get("message", {})
        if not isinstance(message, dict):
            raise errors.UpstreamMalformedResponse(
                f"{self._provider} answered a message that is not an object", provider=self._provider
            )
        return message

    def _head(self, event: JSON, kind: str) -> JSON:
        if self._created is None:
            self._created = _timestamp(event.get("created_at"))
        return {"id": self._id, "object": kind, "created": self._created, "model": event.get("model", "")}


def _finish_reason(event: JSON, called_tools: bool) -> str:
    if called_tools:
        return "tool_calls"
    return "length" if event.get("done_reason") == "length" else "stop"


def _usage(event: JSON) -> JSON:
    # Ollama leaves out counts that are 0 (Go's omitempty), e.g. a fully cached prompt.
    prompt = int(event.get("prompt_eval_count") or 0)
    completion = int(event.get("eval_count") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _timestamp(created_at: Any) -> int:
    if isinstance(created_at, str):
        try:
            return int(datetime.fromisoformat(created_at).timestamp())
        except ValueError:
            pass  # not ISO 8601: fall back to now
    return int(time.time())


# ------------------------------------------------------------------------- embeddings


def embed_body(request: JSON, model: str) -> JSON:
    """Ollama's /api/embed request for an OpenAI embeddings request."""
    for key in request:
        if key not in ("input", "dimensions", "encoding_format", "user"):
            raise _unsupported(key, key)
    inputs = request.get("input")
    if not (isinstance(inputs, str) or (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs))):
        raise _unsupported("token-array inputs for embeddings", "input")
    body: JSON = {"model": model, "input": inputs, "truncate": False}
    if request.get("dimensions") is not None:
        body["dimensions"] = request["dimensions"]
    return body


def embeddings_from_ollama(answer: JSON, request: JSON, provider: str) -> JSON:
    """OpenAI's embedding `list` for Ollama's answer, encoded as the client asked."""
    vectors = answer.get("embeddings")
    if not isinstance(vectors, list) or not all(isinstance(v, list) for v in vectors):
        raise errors.UpstreamMalformedResponse(f"{provider} answered without a list of embeddings", provider=provider)
    dimensions = request.get("dimensions")
    if dimensions is not None and any(len(v) != dimensions for v in vectors):
        raise _unsupported("dimensions (this server ignores it; Ollama 0.11 or later honours it)", "dimensions")
    base64_wanted = request.get("encoding_format") == "base64"
    data = [
        {"object": "embedding", "index": i, "embedding": floats_to_base64(v) if base64_wanted else v}
        for i, v in enumerate(vectors)
    ]
    tokens = int(answer.get("prompt_eval_count") or 0)
    return {
        "object": "list",
        "data": data,
        "model": answer.get("model", ""),
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
