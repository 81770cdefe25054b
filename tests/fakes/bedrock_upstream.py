"""A fake AWS Bedrock runtime on loopback: Converse, ConverseStream and InvokeModel.

It speaks Bedrock's wire format: rest-json bodies, errors as `x-amzn-ErrorType` plus
`{"message": ...}`, and ConverseStream as `application/vnd.amazon.eventstream` binary
frames (prelude with total and headers length, prelude CRC32, string headers
`:event-type` / `:message-type` / `:content-type`, JSON payload, message CRC32), built
per AWS's documented framing by `event_frame` (botocore has a decoder, no encoder; the
tests decode these frames with botocore's parser and with boto3 itself).

Every request is authenticated like AWS does: a SigV4 signature is recomputed with
botocore's signer from the access key's secret and compared (a wrong secret or a
tampered body gives InvalidSignatureException, an unknown key id
UnrecognizedClientException), or a Bedrock API key is compared as a bearer token.
Request bodies are checked against botocore's bedrock-runtime service model: an
unknown top-level member or content-block type is a ValidationException, as at AWS.

Behaviour is chosen by the model id (see `SCENARIOS`); any other model echoes the last
user text ("echo: ..."), with usage counted in words.
"""

from __future__ import annotations

import asyncio
import json
import struct
import zlib
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import botocore.session
from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from tests.fakes._http import AbortConnection, HttpServer, Request, Response

JSON = dict[str, Any]

SCENARIOS = (
    "tools",  # a toolUse of the first tool with {"city": "Paris"}; a toolResult is echoed as text
    "tools-parallel",  # two toolUse blocks: Paris and London
    "length",  # the reply cut to its first word, stopReason max_tokens
    "guardrail",  # stopReason guardrail_intervened, no text
    "reasoning",  # a reasoningContent block before the text
    "error-<Type>",  # that exception type at its HTTP status (error-ThrottlingException, ...)
    "stream-exception",  # ConverseStream: 2 events, then a throttlingException frame
    "stream-cut",  # ConverseStream: 2 events, then the connection drops
    "stream-slow",  # ConverseStream: waits `chunk_delay` before each frame
    "slow",  # waits `slow_seconds` before answering
)
_STATUSES = {
    "ValidationException": 400,
    "AccessDeniedException": 403,
    "UnrecognizedClientException": 403,
    "InvalidSignatureException": 403,
    "ResourceNotFoundException": 404,
    "ModelTimeoutException": 408,
    "ModelErrorException": 424,
    "ThrottlingException": 429,
    "ModelNotReadyException": 429,
    "InternalServerException": 500,
    "ServiceUnavailableException": 503,
}
_SERVICE_MODEL = botocore.session.Session().get_service_model("bedrock-runtime")
_CONVERSE_MEMBERS = set(_SERVICE_MODEL.operation_model("Converse").input_shape.members) - {"modelId"}
_BLOCK_MEMBERS = set(_SERVICE_MODEL.shape_for("ContentBlock").members)


class BedrockError(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass
class Recorded:
    path: str
    model: str
    operation: str
    headers: dict[str, str]
    json: Any


def event_frame(headers: dict[str, str], payload: bytes) -> bytes:
    """One AWS event-stream message with string headers (header value type 7)."""
    encoded = b""
    for name, value in headers.items():
        name_bytes, value_bytes = name.encode(), value.encode()
        encoded += struct.pack(">B", len(name_bytes)) + name_bytes + b"\x07" + struct.pack(">H", len(value_bytes))
        encoded += value_bytes
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    message = prelude + struct.pack(">I", zlib.crc32(prelude)) + encoded + payload
    return message + struct.pack(">I", zlib.crc32(message))


def _event(event_type: str, payload: JSON) -> bytes:
    headers = {":event-type": event_type, ":content-type": "application/json", ":message-type": "event"}
    # Bedrock pads payloads with a random-length "p" field; clients must ignore it.
    return event_frame(headers, json.dumps({**payload, "p": "abcdefgh"}).encode())


def _exception(kind: str, message: str) -> bytes:
    headers = {":exception-type": kind, ":content-type": "application/json", ":message-type": "exception"}
    return event_frame(headers, json.dumps({"message": message}).encode())


class FakeBedrock:
    """See the module docstring. `requests` holds what the gateway sent."""

    def __init__(
        self,
        *,
        access_key: str = "AKIDFAKEBEDROCK",
        secret_key: str = "fake-secret",
        api_key: str | None = None,
        slow_seconds: float = 5.0,
        chunk_delay: float = 0.1,
    ) -> None:
        self.access_key = access_key
        self.secret_key = secret_key
        self.api_key = api_key
        self.slow_seconds = slow_seconds
        self.chunk_delay = chunk_delay
        self.requests: list[Recorded] = []
        self._http = HttpServer(self._handle)
        self._ids = 0

    async def start(self) -> None:
        await self._http.start()

    async def stop(self) -> None:
        await self._http.stop()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._http.port}"

    @property
    def cancelled_streams(self) -> int:
        return self._http.cancelled_streams

    def reset(self) -> None:
        self.requests.clear()
        self._http.reset_counters()

    # ----------------------------------------------------------------- routing

    async def _handle(self, request: Request) -> Response:
        self._ids += 1
        request_id = f"fake-{self._ids:08d}-0000-0000-0000-000000000000"
        try:
            response = await self._dispatch(request)
        except BedrockError as exc:
            response = _error_response(exc.kind, exc.message)
        response.headers["x-amzn-requestid"] = request_id
        return response

    async def _dispatch(self, request: Request) -> Response:
        self._authenticate(request)
        parts = request.path.split("/")
        if request.method != "POST" or len(parts) != 4 or parts[1] != "model":
            raise BedrockError("UnknownOperationException", f"no operation at {request.method} {request.path}")
        model, operation = unquote(parts[2]), parts[3]
        body = _json_body(request.body)
        self.requests.append(Recorded(request.path, model, operation, request.headers, body))
        if model.startswith("error-"):
            kind = model.removeprefix("error-")
            raise BedrockError(kind, f"fake {kind} for {model}")
        if model == "slow":
            await asyncio.sleep(self.slow_seconds)
        if operation == "invoke":
            return self._invoke(model, body)
        if operation not in ("converse", "converse-stream"):
            raise BedrockError("UnknownOperationException", f"unknown operation {operation!r}")
        _validate_converse(body)
        answer = _answer(model, body)
        if operation == "converse":
            return Response(200, json.dumps(answer).encode())
        return Response(200, content_type="application/vnd.amazon.eventstream", stream=self._stream(model, answer))

    def _authenticate(self, request: Request) -> None:
        authorization = request.headers.get("authorization", "")
        if authorization.startswith("Bearer "):
            if self.api_key is None or authorization.removeprefix("Bearer ") != self.api_key:
                raise BedrockError("UnrecognizedClientException", "Invalid API Key format or unknown API key.")
            return
        if not authorization.startswith("AWS4-HMAC-SHA256 "):
            raise BedrockError("MissingAuthenticationTokenException", "Missing Authentication Token")
        fields = dict(item.strip().split("=", 1) for item in authorization.removeprefix("AWS4-HMAC-SHA256 ").split(","))
        access_key, _date, region, service, _ = fields["Credential"].split("/")
        if access_key != self.access_key:
            raise BedrockError("UnrecognizedClientException", "The security token included in the request is invalid.")
        if fields["Signature"] != self._signature(request, fields["SignedHeaders"].split(";"), region, service):
            raise BedrockError(
                "InvalidSignatureException",
                "The request signature we calculated does not match the signature you provided.",
            )

    def _signature(self, request: Request, signed: list[str], region: str, service: str) -> str:
        url = f"http://{request.headers['host']}{request.path}" + (f"?{request.query}" if request.query else "")
        aws_request = AWSRequest(
            method=request.method, url=url, data=request.body, headers={n: request.headers.get(n, "") for n in signed}
        )
        aws_request.context["timestamp"] = request.headers["x-amz-date"]
        token = request.headers.get("x-amz-security-token")
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key, token), service, region)
        canonical = signer.canonical_request(aws_request)
        return str(signer.signature(signer.string_to_sign(aws_request, canonical), aws_request))

    # ------------------------------------------------------------------ streams

    async def _stream(self, model: str, answer: JSON) -> AsyncGenerator[bytes, None]:
        frames = list(_stream_events(answer))
        for number, frame in enumerate(frames):
            if model == "stream-slow":
                await asyncio.sleep(self.chunk_delay)
            if number == 2 and model == "stream-exception":
                yield _exception("throttlingException", "Too many requests, please wait before trying again.")
                return
            if number == 2 and model == "stream-cut":
                raise AbortConnection
            yield frame

    # --------------------------------------------------------------- embeddings

    def _invoke(self, model: str, body: JSON) -> Response:
        if "titan-embed" in model:
            text = body.get("inputText")
            if not isinstance(text, str) or set(body) - {"inputText", "dimensions", "normalize"}:
                raise BedrockError("ValidationException", "Malformed input request: expected inputText")
            size = int(body.get("dimensions") or 8)
            answer = {"embedding": _vector(text, size), "inputTextTokenCount": len(text.split())}
            return Response(200, json.dumps(answer).encode())
        if "cohere.embed" in model:
            texts = body.get("texts")
            if not isinstance(texts, list) or "input_type" not in body:
                raise BedrockError("ValidationException", "Malformed input request: texts and input_type required")
            answer = {
                "embeddings": [_vector(t, 8) for t in texts],
                "id": "emb-fake",
                "response_type": "embeddings_floats",
                "texts": texts,
            }
            tokens = str(sum(len(t.split()) for t in texts))
            return Response(200, json.dumps(answer).encode(), headers={"x-amzn-bedrock-input-token-count": tokens})
        raise BedrockError("ValidationException", f"The provided model {model} does not support InvokeModel here.")


def _error_response(kind: str, message: str) -> Response:
    status = _STATUSES.get(kind, 400)
    headers = {"x-amzn-errortype": f"{kind}:http://internal.amazon.com/coral/com.amazon.bedrock/"}
    if kind == "ThrottlingException":
        headers["retry-after"] = "3"
    return Response(status, json.dumps({"message": message}).encode(), headers=headers)


def _json_body(raw: bytes) -> JSON:
    try:
        body = json.loads(raw or b"{}")
    except ValueError as exc:
        raise BedrockError("SerializationException", "Could not parse the request body as JSON") from exc
    if not isinstance(body, dict):
        raise BedrockError("SerializationException", "The request body must be a JSON object")
    return body


def _validate_converse(body: JSON) -> None:
    if unknown := set(body) - _CONVERSE_MEMBERS:
        raise BedrockError("ValidationException", f"Unknown parameters in the request: {sorted(unknown)}")
    messages = body.get("messages")
    if not messages:
        raise BedrockError("ValidationException", "A conversation must start with a user message.")
    for number, message in enumerate(messages):
        if number and message["role"] == messages[number - 1]["role"]:
            raise BedrockError("ValidationException", "A conversation must alternate between user and assistant roles.")
        for block in message["content"]:
            if len(block) != 1 or not set(block) <= _BLOCK_MEMBERS:
                raise BedrockError("ValidationException", f"Invalid content block {sorted(block)}")


def _last_user_text(body: JSON) -> tuple[str, str | None]:
    """The last user message's text, and the text of a tool result in it, if any."""
    content = body["messages"][-1]["content"]
    texts = [b["text"] for b in content if "text" in b]
    results = [c["text"] for b in content if "toolResult" in b for c in b["toolResult"]["content"] if "text" in c]
    return " ".join(texts), (" ".join(results) if results else None)


def _answer(model: str, body: JSON) -> JSON:
    text, tool_result = _last_user_text(body)
    reply = f"echo: {text}"
    blocks: list[JSON] = []
    stop = "end_turn"
    tools = ((body.get("toolConfig") or {}).get("tools")) or []
    if model.startswith("tools") and tool_result is None and tools:
        name = tools[0]["toolSpec"]["name"]
        cities = ["Paris", "London"] if model == "tools-parallel" else ["Paris"]
        for number, city in enumerate(cities):
            blocks.append({"toolUse": {"toolUseId": f"tooluse_fake{number}", "name": name, "input": {"city": city}}})
        stop = "tool_use"
    elif tool_result is not None:
        blocks.append({"text": f"tool result: {tool_result}"})
    elif model == "guardrail":
        stop = "guardrail_intervened"
    elif model == "length":
        blocks.append({"text": reply.split()[0]})
        stop = "max_tokens"
    else:
        if model == "reasoning":
            blocks.append({"reasoningContent": {"reasoningText": {"text": "the user said hi", "signature": "sig"}}})
        blocks.append({"text": reply})
    output = sum(len(b["text"].split()) for b in blocks if "text" in b) + 1
    usage = {"inputTokens": len(text.split()) + 1, "outputTokens": output}
    usage["totalTokens"] = usage["inputTokens"] + output
    return {
        "output": {"message": {"role": "assistant", "content": blocks}},
        "stopReason": stop,
        "usage": usage,
        "metrics": {"latencyMs": 12},
    }


def _stream_events(answer: JSON) -> list[bytes]:
    """The ConverseStream frames of a whole answer: text in word-sized deltas, tool
    input in two pieces."""
    frames = [_event("messageStart", {"role": "assistant"})]
    for index, block in enumerate(answer["output"]["message"]["content"]):
        frames += _block_events(index, block)
    frames.append(_event("messageStop", {"stopReason": answer["stopReason"]}))
    frames.append(_event("metadata", {"usage": answer["usage"], "metrics": answer["metrics"]}))
    return frames


def _block_events(index: int, block: JSON) -> list[bytes]:
    frames = []
    if "toolUse" in block:
        use = block["toolUse"]
        start = {"toolUse": {"toolUseId": use["toolUseId"], "name": use["name"]}}
        frames.append(_event("contentBlockStart", {"start": start, "contentBlockIndex": index}))
        arguments = json.dumps(use["input"])
        for piece in (arguments[:5], arguments[5:]):
            frames.append(
                _event("contentBlockDelta", {"delta": {"toolUse": {"input": piece}}, "contentBlockIndex": index})
            )
    elif "reasoningContent" in block:
        text = block["reasoningContent"]["reasoningText"]["text"]
        delta = {"reasoningContent": {"text": text}}
        frames.append(_event("contentBlockDelta", {"delta": delta, "contentBlockIndex": index}))
    else:
        words = block["text"].split(" ")
        for number, word in enumerate(words):
            piece = word if number == 0 else " " + word
            frames.append(_event("contentBlockDelta", {"delta": {"text": piece}, "contentBlockIndex": index}))
    frames.append(_event("contentBlockStop", {"contentBlockIndex": index}))
    return frames


def _vector(text: str, size: int) -> list[float]:
    seed = zlib.crc32(text.encode())
    return [((seed >> (i % 24)) % 1000) / 1000.0 for i in range(size)]
