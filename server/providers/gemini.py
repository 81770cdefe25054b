"""Google Gemini through the Gemini Developer API (generativelanguage.googleapis.com).

Calls `POST {base}/v1beta/models/{model}:generateContent` (`:streamGenerateContent?alt=sse`
when streaming), `:embedContent` for one embedding input and `:batchEmbedContents` for
several, with the API key in the `x-goog-api-key` header.

Requests, OpenAI -> Gemini:
  - system and developer messages -> `systemInstruction` (text only, in order: Gemini has
    one system instruction, so a late system message moves to the front); user -> a "user"
    content; assistant -> a "model" content (text, then one `functionCall` part per tool
    call); tool results -> `functionResponse` parts of a "user" content, named after the
    call they answer. Adjacent contents of the same role are merged, as Gemini expects
    user and model turns to alternate.
  - content parts: text; image_url as a data URL -> `inlineData`; as an http(s) URL ->
    `fileData`, with the MIME type guessed from the URL's extension (a Files API URI needs
    none) or UnsupportedFeature when there is no telling; input_audio -> `inlineData`;
    file with `file_data` -> `inlineData` (with `file_id` -> UnsupportedFeature).
  - tools -> `functionDeclarations` with `parametersJsonSchema`: Gemini's JSON Schema field,
    which takes additionalProperties, anyOf, $ref and the like that the older
    OpenAPI-subset `parameters` rejects; only `$schema`, which it refuses, is removed.
    tool_choice auto/none/required/{function} -> `toolConfig.functionCallingConfig` mode
    AUTO/NONE/ANY (+ `allowedFunctionNames`).
  - generationConfig: temperature, top_p -> topP, max_completion_tokens or max_tokens ->
    maxOutputTokens, stop -> stopSequences, n -> candidateCount, seed, presence/frequency
    penalties, response_format json_object/json_schema -> responseMimeType (+
    responseJsonSchema), reasoning_effort -> thinkingConfig (thinkingLevel on Gemini 3 and
    later, a thinkingBudget before).
  - logit_bias and parallel_tool_calls=false have no Gemini equivalent: UnsupportedFeature.
    So is logprobs (Gemini's responseLogprobs differs in shape; not translated yet).
    `user` and `metadata` (abuse-monitoring and storage hints) have no effect on output
    and are not sent.

Tool-call ids, without state: Gemini's `functionCall` has at most an optional `id`, and a
thinking model's first call of a step carries a `thoughtSignature` that must come back
on the same part in the next request. The gateway mints each call's OpenAI id as
`call_<16 hex>` and, when there is something to carry, `_<base64url of {"i": upstream id,
"s": signature}>`. The next request's assistant `tool_calls` are turned back into
`functionCall` parts with those, and each tool message into a `functionResponse` named
after the call with that id. Ids minted elsewhere are accepted and carry nothing. The
signature Gemini may put on a plain text answer is not carried (it is optional there).
A real signature makes such an id too long for clients (and for OpenAI, should the
conversation go there next): `server.providers.gemini_state` hands out a short id instead
and keeps the full one in the shared conversation store.

Responses: text parts -> content, `thought` parts -> reasoning_content, functionCall parts
-> tool_calls (arguments re-encoded as a JSON string). finishReason: STOP -> stop, or
tool_calls when the candidate called functions; MAX_TOKENS -> length; SAFETY, BLOCKLIST,
PROHIBITED_CONTENT, SPII, RECITATION (the text was withheld because it recited training
data), LANGUAGE and the image filters -> content_filter; anything else -> stop. A prompt
blocked by `promptFeedback.blockReason` is answered with content_filter and a refusal
naming the reason. Usage: promptTokenCount (+ toolUsePromptTokenCount) -> prompt_tokens,
candidatesTokenCount + thoughtsTokenCount -> completion_tokens, cachedContentTokenCount ->
cached_tokens, thoughtsTokenCount -> reasoning_tokens. Non-text output parts (inline
images of image models, code execution) are not carried.

Streaming: each SSE event is a whole GenerateContentResponse holding the next text piece,
and function calls whole: they become one tool-call delta each (id, name and all of the
arguments), indexed per choice. A stream that ends before every choice has a
finishReason was cut: UpstreamUnavailable. The last usageMetadata becomes the usage chunk.

Embeddings come back as floats; `encoding_format: base64` is done here (little-endian
float32). Token-array inputs are refused. The Developer API reports no embedding usage,
so the inputs are counted at the same time with `countTokens` (free) of
`TOKEN_COUNT_MODEL`, a generation model whose tokenizer the embedding models share (no
local Gemini tokenizer ships without a download); should that call fail, the embedding
is still answered and billed at 4 characters a token. An upstream `usageMetadata` wins.

Images (OpenAI's images endpoint) come from Gemini's image models ("Nano Banana":
gemini-3.1-flash-image, gemini-3-pro-image) through `:generateContent` with
`generationConfig.responseModalities: ["IMAGE"]`, not from Imagen: Google shut every
Imagen model down on the Gemini API on 2026-08-17 (its `:predict` endpoint went with them),
so `imagen-*` models are refused before any call. The prompt is one user text part.
  - n (1-4) -> n concurrent calls, all or none: the image models refuse candidateCount > 1,
    and 4 bounds the fan-out of billed calls. A call that fails cancels the others.
  - size -> `imageConfig.aspectRatio`: OpenAI's sizes map to the ratio they are, or the
    nearest (1792x1024 is 7:4 -> 16:9); any other WxH must be exactly one of Gemini's ratios.
    A long side above 1792 (more than OpenAI's sizes) also asks `imageSize` 2K, above 3584
    4K; otherwise the model's default, 1K (1024x1024 at 1:1, about 1376x768 at 16:9).
    "auto" or absent sends no imageConfig.
  - response_format: b64_json or absent -> b64_json; url -> UnsupportedFeature (Gemini
    returns the image bytes only and the gateway stores none).
  - quality auto/standard and background auto are the only behaviour Gemini has and are
    accepted; other values, any style, and output_format (the Developer API cannot choose
    the file type: the model answers PNG or JPEG) -> UnsupportedFeature. `user` is not sent.
  - Every final image part (`inlineData` of an image type, not a `thought` draft) becomes
    one `b64_json` item, so a model that draws more than one image per call returns them
    all. A blocked prompt (promptFeedback.blockReason) or a candidate without an image
    (finishReason IMAGE_SAFETY, NO_IMAGE, ... with the model's text, if any) ->
    UpstreamBadRequest naming the reason. usageMetadata, summed over the calls -> usage.

Errors: Google's `{"error": {"code", "message", "status", "details"}}` by HTTP status, with
two Gemini specifics: a rejected API key is a 400 with ErrorInfo reason API_KEY_INVALID
(-> UpstreamAuthFailed), and the 429 retry hint is a RetryInfo `retryDelay` in the body.
A failure in the middle of a stream may arrive as a bare JSON error (no `data:`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import mimetypes
import os
import re
import secrets
import time
from collections.abc import AsyncGenerator, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit

from server import errors
from server.calls import NO_CALL, Call, probe_call
from server.config import ModelEntry, ProviderConfig
from server.providers.base import JSON, Capability, floats_to_base64
from server.providers.conversation_state import ConversationStore
from server.providers.gemini_state import SignatureKeeper
from server.providers.spec import ProviderSpec
from server.providers.transport import Headers, Transport, error_message_from_body, parse_object, upstream_status_error

GEMINI_BASE_URL = "https://generativelanguage.googleapis.com"
_log = logging.getLogger(__name__)
API_VERSION = "v1beta"
# The model whose countTokens measures embedding inputs (see the module docstring).
TOKEN_COUNT_MODEL = "gemini-3.5-flash-lite"
# The variables the official google-genai SDK reads, in its order of precedence.
API_KEY_VARIABLES = ("GOOGLE_API_KEY", "GEMINI_API_KEY")
BASE_URL_ENV = "GOOGLE_GEMINI_BASE_URL"

_C = Capability
GEMINI_CAPABILITIES = frozenset(
    {_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.VISION, _C.JSON_SCHEMA, _C.EMBEDDINGS, _C.IMAGES}
)
_GEMINI_CHAT = [_C.CHAT, _C.CHAT_STREAM, _C.TOOLS, _C.VISION, _C.JSON_SCHEMA]
GEMINI_MODELS = tuple(
    ModelEntry(id=model_id, capabilities=caps)
    for model_id, caps in [
        # Refreshed 2026-11 against Google's deprecations page: gemini-2.5-flash and
        # -pro retire on 2026-12-01, text-embedding-004 shut down on 2026-01-14.
        # tests/test_catalogs.py flags an entry the (fake) model list no longer has.
        ("gemini-3.8-flash", _GEMINI_CHAT),
        ("gemini-3.5-flash", _GEMINI_CHAT),
        ("gemini-3.5-flash-lite", _GEMINI_CHAT),
        ("gemini-3.1-flash-lite", _GEMINI_CHAT),
        ("gemini-3.1-pro-preview", _GEMINI_CHAT),
        ("gemini-2.5-flash-lite", _GEMINI_CHAT),
        ("gemini-embedding-001", [_C.EMBEDDINGS]),
        # Image models answer chat too, but the chat translation drops image parts.
        ("gemini-3.1-flash-image", [_C.IMAGES]),
        ("gemini-3-pro-image", [_C.IMAGES]),
    ]
)

_FINISH_REASONS = {
    "STOP": "stop",
    "MAX_TOKENS": "length",
    "SAFETY": "content_filter",
    "RECITATION": "content_filter",
    "LANGUAGE": "content_filter",
    "BLOCKLIST": "content_filter",
    "PROHIBITED_CONTENT": "content_filter",
    "SPII": "content_filter",
    "IMAGE_SAFETY": "content_filter",
    "IMAGE_PROHIBITED_CONTENT": "content_filter",
    "IMAGE_RECITATION": "content_filter",
    "MODEL_ARMOR": "content_filter",
}
# Budgets for Gemini 2.5's thinkingBudget, as Google's OpenAI-compatible endpoint maps
# low/medium/high; 512 for minimal is the smallest budget every 2.5 model accepts.
_THINKING_BUDGETS = {"minimal": 512, "low": 1024, "medium": 8192, "high": 24576}
_IMAGE_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}
_IMAGE_TYPES |= {".gif": "image/gif", ".heic": "image/heic", ".heif": "image/heif"}
_API_KEY_REJECTED = frozenset({"API_KEY_INVALID", "API_KEY_EXPIRED"})
_CALL_PREFIX = "call_"
_NONCE_HEX = 16


def build_gemini(name: str, cfg: ProviderConfig, spec: ProviderSpec, transport: Transport) -> GeminiAdapter:
    """The registry's factory: the adapter for provider `name` configured by `cfg`."""
    base_url = cfg.base_url or spec.base_url or GEMINI_BASE_URL
    api_key = cfg.resolved_api_key()
    if api_key is None and cfg.api_key_env is None:
        api_key = next((os.environ[v] for v in API_KEY_VARIABLES if os.environ.get(v)), None)
    return GeminiAdapter(
        name=name,
        base_url=base_url,
        api_key=api_key,
        transport=transport,
        extra_headers=cfg.headers,
        capabilities=spec.capabilities,
    )


def _from_environment(environ: Mapping[str, str]) -> ProviderConfig | None:
    """google-genai reads GOOGLE_API_KEY first, then GEMINI_API_KEY, and GOOGLE_GEMINI_BASE_URL."""
    key_variable = next((v for v in API_KEY_VARIABLES if environ.get(v)), None)
    if key_variable is None:
        return None
    return ProviderConfig(api_key_env=key_variable, base_url=environ.get(BASE_URL_ENV) or None)


class GeminiAdapter:
    """Speaks the Gemini Developer API at `base_url` (with or without the `/v1beta`)."""

    # Where the key, and a call's credential, go (see server.providers.transport).
    credential_header = ("x-goog-api-key", "")

    def __init__(
        self,
        *,
        name: str,
        base_url: str,
        api_key: str | None,
        transport: Transport,
        extra_headers: Mapping[str, str] | None = None,
        capabilities: frozenset[Capability] = GEMINI_CAPABILITIES,
    ) -> None:
        self.name = name
        self.capabilities = capabilities
        root = base_url.rstrip("/")
        # GOOGLE_GEMINI_BASE_URL, like the SDK's base_url, has no version; accept one anyway.
        self._api_root = root if re.search(r"/v1(alpha|beta)?$", root) else f"{root}/{API_VERSION}"
        self._http = transport.upstream(
            name,
            credential_header=self.credential_header,
            api_key=api_key,
            headers=extra_headers,
            error_reader=self._status_error,
        )
        self.signatures = SignatureKeeper()

    def keep_state_in(self, store: ConversationStore, ttl_s: float) -> None:
        """Long tool call ids (thought signatures) are kept in `store`, shared by every replica."""
        self.signatures = SignatureKeeper(store, ttl_s)

    async def aclose(self) -> None:
        """Nothing of its own to release: the transport is shared."""

    async def probe_credential(self, secret: str) -> None:
        """Lists the provider's models with `secret` (see `base.CredentialProbe`)."""
        await self._http.send("GET", f"{self._api_root}/models?pageSize=1", probe_call(secret))

    # -- chat -------------------------------------------------------------------------

    async def create_chat_completion(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body = generate_content_request(await self.signatures.restore(request), model, self.name)
        answer = await self._post(self._url(model, "generateContent"), body, call)
        completion = completion_from_response(answer, model, int(request.get("n") or 1), self.name)
        return await self.signatures.shorten_completion(completion)

    async def stream_chat_completion(
        self, request: JSON, model: str, call: Call = NO_CALL
    ) -> AsyncGenerator[JSON, None]:
        body = generate_content_request(await self.signatures.restore(request), model, self.name)
        translator = StreamTranslator(model, int(request.get("n") or 1))
        url = self._url(model, "streamGenerateContent") + "?alt=sse"
        async with self._http.stream("POST", url, call, json=body) as response:
            # A failure mid-stream comes as a bare JSON object, outside the SSE fields.
            async for event in response.sse(bare_json=True):
                for chunk in translator.chunks(self._parse_event(event)):
                    yield await self.signatures.shorten_chunk(chunk)
        if not translator.finished:
            raise errors.UpstreamUnavailable(
                f"{self.name} ended the stream before its finishReason", provider=self.name
            )
        if (usage := translator.usage_chunk()) is not None:
            yield usage

    # -- embeddings -------------------------------------------------------------------

    async def create_embedding(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        texts = _embedding_texts(request.get("input"), self.name)
        (vectors, answer), counted = await asyncio.gather(
            self._embed(texts, request.get("dimensions"), model, call), self._count_tokens(texts, call)
        )
        base64_wanted = request.get("encoding_format") == "base64"
        data = [
            {"object": "embedding", "index": i, "embedding": floats_to_base64(v) if base64_wanted else v}
            for i, v in enumerate(vectors)
        ]
        tokens = _int(_object(answer.get("usageMetadata")).get("promptTokenCount")) or counted
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return {"object": "list", "data": data, "model": model, "usage": usage}

    async def _count_tokens(self, texts: list[str], call: Call) -> int:
        """The inputs' tokens by countTokens (free) on a generation model, whose tokenizer
        the embedding models share; embedContent reports none. If the count fails the
        call still succeeds, billed at 4 characters a token."""
        body = {"contents": [{"role": "user", "parts": [{"text": text}]} for text in texts]}
        try:
            answer = await self._post(self._url(TOKEN_COUNT_MODEL, "countTokens"), body, call)
        except errors.UpstreamError as exc:
            _log.warning("%s: countTokens failed, embedding tokens estimated (%s)", self.name, exc)
            return sum(-(-len(text) // 4) for text in texts)
        return _int(answer.get("totalTokens"))

    async def _embed(self, texts: list[str], dimensions: Any, model: str, call: Call) -> tuple[list[list[float]], JSON]:
        """The vectors, in input order, and Gemini's answer: embedContent for one text,
        batchEmbedContents for several."""
        if len(texts) == 1:
            answer = await self._post(self._url(model, "embedContent"), _embed_request(texts[0], dimensions), call)
            vectors = [self._vector(answer.get("embedding"))]
        else:
            batch = [{"model": _model_path(model), **_embed_request(text, dimensions)} for text in texts]
            answer = await self._post(self._url(model, "batchEmbedContents"), {"requests": batch}, call)
            vectors = [self._vector(item) for item in answer.get("embeddings") or []]
        if len(vectors) != len(texts):
            raise errors.UpstreamMalformedResponse(
                f"{self.name} returned {len(vectors)} embeddings for {len(texts)} inputs", provider=self.name
            )
        return vectors, answer

    def _vector(self, embedding: Any) -> list[float]:
        values = embedding.get("values") if isinstance(embedding, dict) else None
        if not isinstance(values, list) or not all(isinstance(v, int | float) for v in values):
            raise errors.UpstreamMalformedResponse(
                f"{self.name} returned an embedding without values", provider=self.name
            )
        return [float(v) for v in values]

    # -- images -----------------------------------------------------------------------

    async def create_image(self, request: JSON, model: str, call: Call = NO_CALL) -> JSON:
        body, count = image_generation_request(request, model, self.name)
        url = self._url(model, "generateContent")
        answers = await _all_or_none([self._image_call(url, body, call) for _ in range(count)])
        result: JSON = {
            "created": int(time.time()),
            "data": [{"b64_json": image} for images, _ in answers for image in images],
        }
        if usage := usage_from_metadata(_summed_usage([answer for _, answer in answers])):
            result["usage"] = usage
        return result

    async def _image_call(self, url: str, body: JSON, call: Call) -> tuple[list[str], JSON]:
        """One call's images (base64) and its answer; a refusal is raised at once, which
        cancels the sibling calls."""
        answer = await self._post(url, body, call)
        return images_from_response(answer, self.name), answer

    # -- HTTP plumbing ----------------------------------------------------------------

    def _url(self, model: str, method: str) -> str:
        return f"{self._api_root}/{quote(_model_path(model), safe='/')}:{method}"

    async def _post(self, url: str, body: JSON, call: Call) -> JSON:
        answer = await self._http.send("POST", url, call, json=body)
        return self._parse_event(answer.content)

    def _parse_event(self, data: str | bytes) -> JSON:
        """A response object; a Google error object (mid-stream, or in a 200) is raised."""
        parsed = parse_object(self.name, data)
        if isinstance(parsed.get("error"), dict):
            error = parsed["error"]
            status = error.get("code") if isinstance(error.get("code"), int) else 500
            raise google_error_from_object(self.name, status, {}, error)
        return parsed

    def _status_error(self, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
        return google_error(self.name, status, headers, content)


# ---------------------------------------------------------------------------- tool-call ids


@dataclass(frozen=True, slots=True)
class CallRef:
    """What a gateway-minted tool-call id carries for the next turn."""

    upstream_id: str | None = None
    signature: str | None = None


def mint_call_id(upstream_id: str | None, signature: str | None) -> str:
    """A unique OpenAI tool-call id (letters, digits, `_`, `-`) carrying Gemini's call id
    and thought signature; the random part keeps two identical calls apart."""
    nonce = secrets.token_hex(_NONCE_HEX // 2)
    carried = {key: value for key, value in (("i", upstream_id), ("s", signature)) if value}
    if not carried:
        return f"{_CALL_PREFIX}{nonce}"
    payload = base64.urlsafe_b64encode(json.dumps(carried, separators=(",", ":")).encode()).rstrip(b"=")
    return f"{_CALL_PREFIX}{nonce}_{payload.decode()}"


def read_call_id(call_id: str) -> CallRef:
    """What `mint_call_id` put into `call_id`; nothing for an id minted elsewhere."""
    head = len(_CALL_PREFIX) + _NONCE_HEX
    if not call_id.startswith(_CALL_PREFIX) or call_id[head : head + 1] != "_":
        return CallRef()
    payload = call_id[head + 1 :]
    try:
        carried = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (ValueError, binascii.Error):
        return CallRef()
    if not isinstance(carried, dict):
        return CallRef()
    upstream_id, signature = carried.get("i"), carried.get("s")
    return CallRef(
        upstream_id if isinstance(upstream_id, str) else None, signature if isinstance(signature, str) else None
    )


# ------------------------------------------------------------------- request translation


def generate_content_request(request: JSON, model: str, provider: str) -> JSON:
    """The GenerateContentRequest body for an OpenAI chat request."""
    _refuse_unsupported(request, provider)
    system, contents = _conversation(request.get("messages") or [], provider)
    body: JSON = {"contents": contents}
    if system:
        body["systemInstruction"] = {"parts": system}
    tools = request.get("tools") or []
    if tools:
        body["tools"] = [{"functionDeclarations": [_function_declaration(tool) for tool in tools]}]
    if tool_config := _tool_config(request.get("tool_choice"), bool(tools)):
        body["toolConfig"] = tool_config
    if generation_config := _generation_config(request, model):
        body["generationConfig"] = generation_config
    return body


def _unsupported(provider: str, feature: str, where: str) -> errors.UnsupportedFeature:
    return errors.UnsupportedFeature(
        f"provider {provider!r} (Gemini) does not support {feature}",
        field=where,
        metadata={"provider": provider, "feature": feature},
    )


def _refuse_unsupported(request: JSON, provider: str) -> None:
    if request.get("logit_bias"):
        raise _unsupported(provider, "logit_bias", "logit_bias")
    if request.get("logprobs"):  # Gemini's responseLogprobs has another shape: not translated
        raise _unsupported(provider, "logprobs", "logprobs")
    if request.get("parallel_tool_calls") is False:
        raise _unsupported(
            provider, "parallel_tool_calls=false (it cannot limit a turn to one call)", "parallel_tool_calls"
        )


def _conversation(messages: list[JSON], provider: str) -> tuple[list[JSON], list[JSON]]:
    """The system instruction's parts and the contents."""
    names = {
        call.get("id"): (call.get("function") or {}).get("name")
        for message in messages
        if message.get("role") == "assistant"
        for call in message.get("tool_calls") or []
    }
    system: list[JSON] = []
    contents: list[JSON] = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        role = message.get("role")
        if role in ("system", "developer"):
            text = _text_of(message.get("content"), where, provider)
            system += [{"text": text}] if text else []
        elif role == "user":
            _append(contents, "user", _parts(message.get("content"), where, provider))
        elif role == "assistant":
            _append(contents, "model", _model_parts(message, where, provider))
        elif role == "tool":
            _append(contents, "user", [_function_response(message, where, names, provider)])
        else:
            raise errors.InvalidRequest(f"{where}.role {role!r} is not a chat role", field=f"{where}.role")
    return system, contents


def _append(contents: list[JSON], role: str, parts: list[JSON]) -> None:
    if not parts:  # Gemini refuses a content without parts
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _content_items(content: Any) -> list[JSON]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list):
        return [item for item in content if isinstance(item, dict)]
    return []


def _text_of(content: Any, where: str, provider: str) -> str:
    """The text of a message that Gemini takes as text only (system, tool)."""
    texts = []
    for index, item in enumerate(_content_items(content)):
        if item.get("type") != "text":
            raise _unsupported(provider, f"{item.get('type')} parts in this message", f"{where}.content[{index}]")
        texts.append(str(item.get("text") or ""))
    return "".join(texts)


def _parts(content: Any, where: str, provider: str) -> list[JSON]:
    parts = [_part(item, f"{where}.content[{i}]", provider) for i, item in enumerate(_content_items(content))]
    return [part for part in parts if part.get("text") != ""]


def _part(item: JSON, where: str, provider: str) -> JSON:
    kind = item.get("type")
    if kind in ("text", "refusal"):
        return {"text": str(item.get(kind) or "")}
    if kind == "image_url":
        return _image_part(item.get("image_url") or {}, where, provider)
    if kind == "input_audio":
        audio = item.get("input_audio") or {}
        return {"inlineData": {"mimeType": f"audio/{audio.get('format') or 'wav'}", "data": audio.get("data") or ""}}
    if kind == "file":
        return _file_part(item.get("file") or {}, where, provider)
    raise _unsupported(provider, f"content parts of type {kind!r}", where)


def _image_part(image: JSON, where: str, provider: str) -> JSON:
    url = str(image.get("url") or "")
    # `detail` has no per-request Gemini equivalent that means the same; it is a hint.
    if url.startswith("data:"):
        return {"inlineData": _data_url(url, f"{where}.image_url.url")}
    parsed = urlsplit(url)
    if parsed.scheme not in ("http", "https"):
        raise _unsupported(provider, f"image URLs of scheme {parsed.scheme!r}", f"{where}.image_url.url")
    if parsed.hostname == "generativelanguage.googleapis.com" and "/files/" in parsed.path:
        return {"fileData": {"fileUri": url}}  # a Files API upload knows its own MIME type
    suffix = os.path.splitext(parsed.path)[1].lower()
    mime_type = _IMAGE_TYPES.get(suffix) or mimetypes.guess_type(parsed.path)[0]
    if mime_type is None:
        raise _unsupported(
            provider,
            "image URLs without a known file extension (Gemini needs the MIME type; send a data URL)",
            f"{where}.image_url.url",
        )
    return {"fileData": {"mimeType": mime_type, "fileUri": url}}


def _file_part(file: JSON, where: str, provider: str) -> JSON:
    data = file.get("file_data")
    if not isinstance(data, str) or not data:
        raise _unsupported(provider, "file parts without file_data (file_id)", f"{where}.file")
    if data.startswith("data:"):
        return {"inlineData": _data_url(data, f"{where}.file.file_data")}
    mime_type = mimetypes.guess_type(str(file.get("filename") or ""))[0]
    if mime_type is None:
        raise _unsupported(provider, "file_data without a data: URL or a filename with a known extension", where)
    return {"inlineData": {"mimeType": mime_type, "data": data}}


def _data_url(url: str, where: str) -> JSON:
    header, comma, data = url.removeprefix("data:").partition(",")
    mime_type, *params = header.split(";")
    if not comma or not mime_type or "base64" not in params:
        raise errors.InvalidRequest(f"{where} must be a base64 data URL (data:<type>;base64,...)", field=where)
    return {"mimeType": mime_type, "data": data}


def _model_parts(message: JSON, where: str, provider: str) -> list[JSON]:
    parts = _parts(message.get("content"), where, provider)
    if not parts and message.get("refusal"):
        parts = [{"text": str(message["refusal"])}]
    for index, call in enumerate(message.get("tool_calls") or []):
        parts.append(_function_call_part(call, f"{where}.tool_calls[{index}]"))
    return parts


def _function_call_part(call: JSON, where: str) -> JSON:
    function = call.get("function") or {}
    ref = read_call_id(str(call.get("id") or ""))
    function_call: JSON = {"name": function.get("name") or "", "args": _arguments(function.get("arguments"), where)}
    if ref.upstream_id:
        function_call["id"] = ref.upstream_id
    part: JSON = {"functionCall": function_call}
    if ref.signature:  # back on the very part it came with, as Gemini requires
        part["thoughtSignature"] = ref.signature
    return part


def _arguments(arguments: Any, where: str) -> JSON:
    if not arguments:
        return {}
    try:
        parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise errors.InvalidRequest(
            f"{where}.function.arguments must be a JSON object: Gemini takes arguments as an object",
            field=f"{where}.function.arguments",
        )
    return parsed


def _function_response(message: JSON, where: str, names: dict[Any, Any], provider: str) -> JSON:
    call_id = str(message.get("tool_call_id") or "")
    name = names.get(call_id)
    if not name:
        raise errors.InvalidRequest(
            f"{where}.tool_call_id {call_id!r} answers no tool call of an earlier assistant message "
            "(Gemini needs the called function's name)",
            field=f"{where}.tool_call_id",
        )
    text = _text_of(message.get("content"), where, provider)
    response: JSON = {"name": name, "response": _response_object(text)}
    if upstream_id := read_call_id(call_id).upstream_id:
        response["id"] = upstream_id
    return {"functionResponse": response}


def _response_object(text: str) -> JSON:
    """Gemini takes a function's result as an object: a JSON object result as is, any
    other result under "output", the key its documentation names for a function's output."""
    try:
        parsed = json.loads(text)
    except ValueError:
        parsed = None
    return parsed if isinstance(parsed, dict) else {"output": text}


def _function_declaration(tool: JSON) -> JSON:
    function = tool.get("function") or {}
    declaration: JSON = {"name": function.get("name") or ""}
    if function.get("description"):
        declaration["description"] = function["description"]
    if parameters := function.get("parameters"):
        declaration["parametersJsonSchema"] = _json_schema(parameters)
    # `strict` has no Gemini switch: Gemini decodes calls against the declared schema.
    return declaration


def _json_schema(schema: JSON) -> JSON:
    """The schema for Gemini's JSON Schema fields, which refuse the `$schema` dialect key."""
    return {key: value for key, value in schema.items() if key != "$schema"}


def _tool_config(choice: Any, has_tools: bool) -> JSON | None:
    if choice is None:
        return None
    names: list[str] = []
    if isinstance(choice, dict):
        mode = "ANY"
        names = [str((choice.get("function") or {}).get("name") or "")]
    else:
        mode = {"auto": "AUTO", "none": "NONE", "required": "ANY"}.get(str(choice), "AUTO")
    if not has_tools:
        if mode == "ANY":
            raise errors.InvalidRequest("tool_choice requires a tool call but no tools are given", field="tool_choice")
        return None
    config: JSON = {"mode": mode}
    if names:
        config["allowedFunctionNames"] = names
    return {"functionCallingConfig": config}


_SAME_MEANING = (
    ("temperature", "temperature"),
    ("top_p", "topP"),
    ("n", "candidateCount"),
    ("seed", "seed"),
    ("presence_penalty", "presencePenalty"),
    ("frequency_penalty", "frequencyPenalty"),
)


def _generation_config(request: JSON, model: str) -> JSON:
    config: JSON = {gemini: request[openai] for openai, gemini in _SAME_MEANING if request.get(openai) is not None}
    if max_tokens := request.get("max_completion_tokens") or request.get("max_tokens"):
        config["maxOutputTokens"] = max_tokens
    if stop := request.get("stop"):
        config["stopSequences"] = [stop] if isinstance(stop, str) else list(stop)
    config |= _response_format(request.get("response_format") or {})
    if effort := request.get("reasoning_effort"):
        config["thinkingConfig"] = _thinking_config(str(effort), model)
    return config


def _response_format(response_format: JSON) -> JSON:
    kind = response_format.get("type")
    if kind == "json_object":
        return {"responseMimeType": "application/json"}
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        config: JSON = {"responseMimeType": "application/json"}
        if schema:
            config["responseJsonSchema"] = _json_schema(schema)
        return config
    return {}


def _thinking_config(effort: str, model: str) -> JSON:
    if effort not in _THINKING_BUDGETS:
        raise errors.InvalidRequest(
            f"reasoning_effort must be minimal, low, medium or high, got {effort!r}", field="reasoning_effort"
        )
    version = re.match(r"(?:models/)?gemini-(\d+)", model)
    if version and int(version.group(1)) >= 3:
        return {"thinkingLevel": effort.upper()}  # Gemini 3 replaced budgets by levels
    return {"thinkingBudget": _THINKING_BUDGETS[effort]}


# ------------------------------------------------------------------ response translation


@dataclass
class _Output:
    """One candidate's parts, sorted by what they become."""

    text: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    tool_calls: list[JSON] = field(default_factory=list)


def _read_parts(candidate: JSON) -> _Output:
    output = _Output()
    for part in _object(candidate.get("content")).get("parts") or []:
        if not isinstance(part, dict):
            continue
        if isinstance(part.get("functionCall"), dict):
            output.tool_calls.append(_tool_call(part["functionCall"], part.get("thoughtSignature")))
        elif isinstance(part.get("text"), str):
            (output.reasoning if part.get("thought") else output.text).append(part["text"])
    return output


def _tool_call(function_call: JSON, signature: Any) -> JSON:
    return {
        "id": mint_call_id(function_call.get("id"), signature if isinstance(signature, str) else None),
        "type": "function",
        "function": {
            "name": function_call.get("name") or "",
            "arguments": json.dumps(function_call.get("args") or {}, ensure_ascii=False),
        },
    }


def _finish_reason(reason: Any, called_tools: bool) -> str:
    finish = _FINISH_REASONS.get(str(reason), "stop")
    return "tool_calls" if finish == "stop" and called_tools else finish


def _block_refusal(answer: JSON) -> str | None:
    """Why Gemini refused the prompt, when it did."""
    feedback = _object(answer.get("promptFeedback"))
    reason = feedback.get("blockReason")
    if not reason:
        return None
    detail = feedback.get("blockReasonMessage")
    return f"the prompt was blocked ({reason})" + (f": {detail}" if detail else "")


def _completion_id(answer: JSON) -> str:
    response_id = answer.get("responseId")
    return (
        f"chatcmpl-{response_id}"
        if isinstance(response_id, str) and response_id
        else f"chatcmpl-{secrets.token_hex(12)}"
    )


def _object(value: Any) -> JSON:
    return value if isinstance(value, dict) else {}


def _candidate_index(candidate: JSON, position: int) -> int:
    index = candidate.get("index")
    return index if isinstance(index, int) else position


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def usage_from_metadata(metadata: Any) -> JSON | None:
    """OpenAI usage from Gemini's usageMetadata; thoughts count as completion tokens."""
    if not isinstance(metadata, dict):
        return None
    prompt = _int(metadata.get("promptTokenCount")) + _int(metadata.get("toolUsePromptTokenCount"))
    thoughts = _int(metadata.get("thoughtsTokenCount"))
    completion = _int(metadata.get("candidatesTokenCount")) + thoughts
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": _int(metadata.get("totalTokenCount")) or prompt + completion,
        "prompt_tokens_details": {"cached_tokens": _int(metadata.get("cachedContentTokenCount"))},
        "completion_tokens_details": {"reasoning_tokens": thoughts},
    }


def completion_from_response(answer: JSON, model: str, n: int, provider: str) -> JSON:
    """The OpenAI chat.completion for a GenerateContentResponse."""
    candidates = [c for c in answer.get("candidates") or [] if isinstance(c, dict)]
    refusal = _block_refusal(answer)
    if candidates:
        choices = [_choice(candidate, position) for position, candidate in enumerate(candidates)]
    elif refusal:
        message = {"role": "assistant", "content": None, "refusal": refusal}
        choices = [{"index": i, "message": message, "finish_reason": "content_filter"} for i in range(n)]
    else:
        raise errors.UpstreamMalformedResponse(f"{provider} answered without candidates", provider=provider)
    completion: JSON = {
        "id": _completion_id(answer),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": answer.get("modelVersion") or model,
        "choices": choices,
    }
    if usage := usage_from_metadata(answer.get("usageMetadata")):
        completion["usage"] = usage
    return completion


def _choice(candidate: JSON, position: int) -> JSON:
    output = _read_parts(candidate)
    message: JSON = {"role": "assistant", "content": "".join(output.text) if output.text else None}
    if output.tool_calls:
        message["tool_calls"] = output.tool_calls
    if output.reasoning:
        message["reasoning_content"] = "".join(output.reasoning)
    return {
        "index": _candidate_index(candidate, position),
        "message": message,
        "finish_reason": _finish_reason(candidate.get("finishReason"), bool(output.tool_calls)),
    }


@dataclass
class _ChoiceState:
    started: bool = False
    tool_calls: int = 0
    finished: bool = False


class StreamTranslator:
    """Turns the GenerateContentResponse events of one stream into OpenAI chunks."""

    def __init__(self, model: str, n: int) -> None:
        self._id: str | None = None
        self._created = int(time.time())
        self._model = model
        self._n = n
        self._choices: dict[int, _ChoiceState] = {}
        self._usage: JSON | None = None

    @property
    def finished(self) -> bool:
        """Whether every choice got its finishReason (a cut stream leaves one open)."""
        return bool(self._choices) and all(state.finished for state in self._choices.values())

    def chunks(self, event: JSON) -> list[JSON]:
        self._id = self._id or _completion_id(event)
        self._model = event.get("modelVersion") or self._model
        # Each event repeats the usage so far; the last one is the whole call's.
        self._usage = usage_from_metadata(event.get("usageMetadata")) or self._usage
        candidates = [c for c in event.get("candidates") or [] if isinstance(c, dict)]
        if not candidates and (refusal := _block_refusal(event)):
            return [self._chunk(self._blocked(index, refusal)) for index in range(self._n)]
        choices = (self._choice_delta(candidate, position) for position, candidate in enumerate(candidates))
        return [self._chunk(choice) for choice in choices if choice is not None]

    def usage_chunk(self) -> JSON | None:
        if self._usage is None:
            return None
        return {**self._chunk(None), "choices": [], "usage": self._usage}

    def _chunk(self, choice: JSON | None) -> JSON:
        return {
            "id": self._id or _completion_id({}),
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
            "choices": [choice] if choice else [],
        }

    def _blocked(self, index: int, refusal: str) -> JSON:
        self._choices[index] = _ChoiceState(started=True, finished=True)
        return {"index": index, "delta": {"role": "assistant", "refusal": refusal}, "finish_reason": "content_filter"}

    def _choice_delta(self, candidate: JSON, position: int) -> JSON | None:
        index = _candidate_index(candidate, position)
        state = self._choices.setdefault(index, _ChoiceState())
        output = _read_parts(candidate)
        delta: JSON = {}
        if not state.started:
            delta["role"] = "assistant"
            state.started = True
        if output.text:
            delta["content"] = "".join(output.text)
        if output.reasoning:
            delta["reasoning_content"] = "".join(output.reasoning)
        if output.tool_calls:
            delta["tool_calls"] = [{"index": state.tool_calls + i, **call} for i, call in enumerate(output.tool_calls)]
            state.tool_calls += len(output.tool_calls)
        choice: JSON = {"index": index, "delta": delta}
        if reason := candidate.get("finishReason"):
            choice["finish_reason"] = _finish_reason(reason, state.tool_calls > 0)
            state.finished = True
        return choice if delta or "finish_reason" in choice else None


# --------------------------------------------------------------------------- embeddings


def _embedding_texts(value: Any, provider: str) -> list[str]:
    items = value if isinstance(value, list) else [value]
    if not all(isinstance(item, str) for item in items):
        raise _unsupported(provider, "token-array embedding inputs (send text)", "input")
    return [str(item) for item in items]


def _embed_request(text: str, dimensions: Any) -> JSON:
    request: JSON = {"content": {"parts": [{"text": text}]}}
    if dimensions:
        request["outputDimensionality"] = dimensions
    return request


def _model_path(model: str) -> str:
    return model if model.startswith(("models/", "tunedModels/")) else f"models/{model}"


# ------------------------------------------------------------------------------- images

MAX_IMAGES = 4
# OpenAI's published sizes and the Gemini aspect ratio each is, or is nearest to.
_OPENAI_SIZES = {
    "256x256": "1:1",
    "512x512": "1:1",
    "1024x1024": "1:1",
    "1536x1024": "3:2",
    "1024x1536": "2:3",
    "1792x1024": "16:9",
    "1024x1792": "9:16",
}
# The ratios Google documents for its image models (a model may refuse some of them).
_ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
# The largest side OpenAI's sizes have: up to it the model's default 1K is enough.
_LONG_SIDE_1K = 1792
_LONG_SIDE_2K = 3584
_DEFAULT_QUALITIES = frozenset({"auto", "standard"})


def image_generation_request(request: JSON, model: str, provider: str) -> tuple[JSON, int]:
    """The GenerateContentRequest body for an OpenAI images request, and how many calls."""
    if re.match(r"(?:models/)?imagen-", model):
        raise _unsupported(
            provider,
            "Imagen models (Google shut them down on the Gemini API on 2026-08-17); "
            "use an image model such as gemini-3.1-flash-image",
            "model",
        )
    count = _image_count(request.get("n"), provider)
    _refuse_image_options(request, provider)
    config: JSON = {"responseModalities": ["IMAGE"]}
    if image_config := _image_config(request.get("size")):
        config["imageConfig"] = image_config
    body = {"contents": [{"role": "user", "parts": [{"text": str(request.get("prompt") or "")}]}]}
    return {**body, "generationConfig": config}, count


def _image_count(n: Any, provider: str) -> int:
    count = 1 if n is None else n
    if not isinstance(count, int) or not 1 <= count <= MAX_IMAGES:
        raise errors.InvalidRequest(
            f"{provider} makes 1 to {MAX_IMAGES} images per request (one call each), got n={n!r}", field="n"
        )
    return count


def _refuse_image_options(request: JSON, provider: str) -> None:
    response_format = request.get("response_format") or "b64_json"
    if response_format != "b64_json":
        raise _unsupported(
            provider,
            f"response_format={response_format!r}: it returns image bytes only, ask for b64_json",
            "response_format",
        )
    quality = request.get("quality")
    if quality and quality not in _DEFAULT_QUALITIES:
        raise _unsupported(
            provider, f"quality={quality!r} (it has one quality; a larger size asks more pixels)", "quality"
        )
    if style := request.get("style"):
        raise _unsupported(provider, f"style={style!r}", "style")
    if output_format := request.get("output_format"):
        raise _unsupported(provider, f"output_format={output_format!r} (the model picks PNG or JPEG)", "output_format")
    background = request.get("background")
    if background and background != "auto":
        raise _unsupported(provider, f"background={background!r}", "background")


def _image_config(size: Any) -> JSON | None:
    """imageConfig for an OpenAI size: its aspect ratio, and imageSize for sizes larger
    than OpenAI's own."""
    if not size or size == "auto":
        return None
    match = re.fullmatch(r"([1-9]\d{0,4})x([1-9]\d{0,4})", str(size))
    if not match:
        raise _bad_size(size)
    width, height = int(match.group(1)), int(match.group(2))
    ratio = _OPENAI_SIZES.get(str(size)) or _exact_ratio(width, height)
    if ratio is None:
        raise _bad_size(size)
    config: JSON = {"aspectRatio": ratio}
    long_side = max(width, height)
    if long_side > _LONG_SIDE_1K:
        config["imageSize"] = "2K" if long_side <= _LONG_SIDE_2K else "4K"
    return config


def _exact_ratio(width: int, height: int) -> str | None:
    for ratio in _ASPECT_RATIOS:
        across, down = (int(side) for side in ratio.split(":"))
        if width * down == height * across:
            return ratio
    return None


def _bad_size(size: Any) -> errors.InvalidRequest:
    return errors.InvalidRequest(
        f"size {size!r} is not available for Gemini image models; choose auto, "
        f"{', '.join(_OPENAI_SIZES)}, or any WIDTHxHEIGHT in one of the ratios {', '.join(_ASPECT_RATIOS)}",
        field="size",
    )


def images_from_response(answer: JSON, provider: str) -> list[str]:
    """The base64 of every final image of every candidate; a refusal is raised."""
    if reason := _block_refusal(answer):
        raise errors.UpstreamBadRequest(f"{provider} refused to draw: {reason}", provider=provider)
    candidates = [c for c in answer.get("candidates") or [] if isinstance(c, dict)]
    if not candidates:
        raise errors.UpstreamMalformedResponse(f"{provider} answered without candidates", provider=provider)
    images: list[str] = []
    for candidate in candidates:
        drawn = _candidate_images(candidate, provider)
        if not drawn:
            raise errors.UpstreamBadRequest(_no_image_message(candidate, provider), provider=provider)
        images += drawn
    return images


def _candidate_images(candidate: JSON, provider: str) -> list[str]:
    images = []
    for part in _object(candidate.get("content")).get("parts") or []:
        blob = _object(part.get("inlineData")) if isinstance(part, dict) and not part.get("thought") else {}
        if not str(blob.get("mimeType", "")).startswith("image/"):
            continue
        data = blob.get("data")
        try:
            base64.b64decode(data if isinstance(data, str) else "", validate=True)
        except (ValueError, binascii.Error) as exc:
            raise errors.UpstreamMalformedResponse(
                f"{provider} answered an image that is not base64", provider=provider
            ) from exc
        if data:
            images.append(str(data))
    return images


def _no_image_message(candidate: JSON, provider: str) -> str:
    """Why a candidate has no image: its finishReason, finishMessage and text."""
    text = " ".join(_read_parts(candidate).text).strip()
    detail = "; ".join(str(d) for d in (candidate.get("finishMessage"), text[:300]) if d)
    reason = candidate.get("finishReason") or "no reason given"
    return f"{provider} answered without an image ({reason})" + (f": {detail}" if detail else "")


def _summed_usage(answers: list[JSON]) -> JSON | None:
    """The usageMetadata of several calls added up, as one call's."""
    total: dict[str, int] = {}
    for answer in answers:
        for key, value in _object(answer.get("usageMetadata")).items():
            if isinstance(value, int):
                total[key] = total.get(key, 0) + value
    return total or None


_T = TypeVar("_T")


async def _all_or_none(calls: list[Coroutine[Any, Any, _T]]) -> list[_T]:
    """The calls' results in order, run concurrently; the first failure cancels the rest
    and is raised as itself (the client sees one error, not an ExceptionGroup)."""
    failure: Exception | None = None
    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(call) for call in calls]
    except ExceptionGroup as failed:
        failure = failed.exceptions[0]
    if failure is not None:
        raise failure  # outside the handler, so it keeps its own cause (the HTTP error)
    return [task.result() for task in tasks]


# ------------------------------------------------------------------------------- errors


def google_error(provider: str, status: int, headers: Headers, content: bytes) -> errors.UpstreamError:
    """The exception for a failed HTTP answer carrying Google's error body."""
    try:
        parsed = json.loads(content)
    except ValueError:
        parsed = None
    if isinstance(parsed, list) and parsed:  # the non-SSE stream wraps it in an array
        parsed = parsed[0]
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if not isinstance(error, dict):
        return upstream_status_error(provider, status, headers, error_message_from_body(content))
    return google_error_from_object(provider, status, headers, error)


def google_error_from_object(provider: str, status: int, headers: Headers, error: JSON) -> errors.UpstreamError:
    details = [detail for detail in error.get("details") or [] if isinstance(detail, dict)]
    if status == 400 and any(detail.get("reason") in _API_KEY_REJECTED for detail in details):
        status = 401  # Google answers a bad API key with 400 INVALID_ARGUMENT
    message = str(error.get("message") or "(no message)")[:500]
    if isinstance(error.get("status"), str):
        message = f"{error['status']}: {message}"
    # RetryInfo in the body counts when the headers give no hint.
    return upstream_status_error(provider, status, headers, message, retry_after=_retry_delay(details))


def _retry_delay(details: list[JSON]) -> float | None:
    """RetryInfo's retryDelay (a protobuf Duration such as "7s" or "1.5s"), in seconds."""
    for detail in details:
        if str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            try:
                return max(float(str(detail.get("retryDelay", "")).removesuffix("s")), 0.0)
            except ValueError:
                return None
    return None


SPEC = ProviderSpec(
    name="gemini",
    build=build_gemini,
    # Named in messages; GOOGLE_API_KEY works too (and wins, as in google-genai).
    api_key_env=API_KEY_VARIABLES[1],
    base_url=GEMINI_BASE_URL,
    capabilities=GEMINI_CAPABILITIES,
    models=GEMINI_MODELS,
    from_environment=_from_environment,
    enabled_by=" or ".join(reversed(API_KEY_VARIABLES)),
    adapter="gemini",
    variables=(*API_KEY_VARIABLES, BASE_URL_ENV),
)
