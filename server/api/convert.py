"""Conversions between protos and the internal OpenAI-shaped dicts.

Each decision about how one of OpenAI's fields crosses the gateway is made here, so
that the servicers only call these functions.

Nulls that OpenAI always sends. OpenAI's schemas require some fields to be present
even when empty, as JSON null: `choices[].logprobs`, `choices[].message.content` and
`.refusal` in a chat completion, `choices[].finish_reason` in every chunk before the
last. proto3 has no null for a string, and the REST bridge prints an unset optional
field by leaving it out. So:
- `logprobs` is a `google.protobuf.Value` in the contract, set to null here when the
  upstream gave none: null for gRPC and REST callers alike.
- The string fields get `JSON_NULL` for REST callers only (`json_nulls=True`, from the
  bridge's `x-aigne-rest` marker on OpenAI's chat paths), which BridgeService
  (server.api.rest_print) prints as `null`.
  gRPC callers see them unset, proto3's null (a gRPC client that sends the
  header itself gets the marker). A value that is exactly `JSON_NULL`
  (NUL then "null") from an upstream would also become null; no model writes it.

Parameters the contract does not carry. The REST bridge's transcoder drops a JSON
member that has no field in the contract, so the bridge reports the names of the
top-level members a client gave a value (`x-aigne-fields`; null and false count as
absent) and `check_given_fields` refuses, with 400 naming the parameter, each one the
request message does not have. OpenAI's own parameters get a reason
(`REFUSED_PARAMETERS`, listed in the README); any other name gets OpenAI's own
"Unrecognized request argument supplied". Nested members (inside a message, say) are
not reported.

Log probabilities. `logprobs`/`top_logprobs` are carried: the OpenAI adapter passes
them on and the upstream's `choices[].logprobs` comes back as is; the other adapters
refuse `logprobs: true` with UNSUPPORTED_FEATURE. `logprobs: false` is the default and
is not sent on.

Image model. OpenAI's images endpoint defaults `model` to dall-e-2; the gateway
defaults it to `openai/dall-e-2` (`DEFAULT_IMAGE_MODEL`), so a request without one
goes where it would at OpenAI (or is refused as an unknown model when no `openai`
provider is configured).

Image usage. OpenAI answers token-billed image models (gpt-image-1) with
`ImageGenUsage` names (`input_tokens`, `output_tokens`, details by text and image);
the contract's `Usage` carries those names, and repeats the two counts as
`prompt_tokens`/`completion_tokens` for clients of the chat names.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from typing import Any, TypeVar

from google.protobuf import json_format, struct_pb2
from google.protobuf.descriptor import Descriptor
from google.protobuf.message import Message

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import image_service_pb2 as image_pb
from server import errors
from server.api import message_dicts, proto_dicts
from server.api.validation import non_finite_number_path
from server.providers.base import JSON

M = TypeVar("M", bound=Message)

# Printed as JSON null for OpenAI's REST clients (server.api.rest_print).
JSON_NULL = "\x00null"

DEFAULT_IMAGE_MODEL = "openai/dall-e-2"

_NOT_SUPPORTED = "is not supported by the gateway"
# OpenAI's parameters that the gateway refuses, each with its reason.
REFUSED_PARAMETERS: dict[str, str] = {
    # chat
    "audio": f"audio output {_NOT_SUPPORTED}",
    "modalities": f"choosing output modalities {_NOT_SUPPORTED} (the answer is text)",
    "prediction": f"predicted outputs {_NOT_SUPPORTED}",
    "functions": "is deprecated by OpenAI and not supported by the gateway: give tools instead",
    "function_call": "is deprecated by OpenAI and not supported by the gateway: give tool_choice instead",
    "web_search_options": f"web search {_NOT_SUPPORTED}",
    "store": f"storing completions at the provider {_NOT_SUPPORTED}",
    "service_tier": f"choosing a service tier {_NOT_SUPPORTED}",
    "verbosity": f"{_NOT_SUPPORTED} (say it in the prompt)",
    "prompt_cache_key": _NOT_SUPPORTED,
    "prompt_cache_retention": _NOT_SUPPORTED,
    "safety_identifier": f"{_NOT_SUPPORTED} (give user instead)",
    # images
    "output_compression": _NOT_SUPPORTED,
    "moderation": _NOT_SUPPORTED,
    "partial_images": f"streamed images {_NOT_SUPPORTED}",
    # speech
    "stream_format": f"streamed speech events {_NOT_SUPPORTED} (the audio itself is streamed)",
}
# Reported by the bridge for a member name that is not a plain identifier, and after
# its first 64 members.
UNUSUAL_NAME = "?"
TOO_MANY_NAMES = "+"


def to_json(message: Message) -> JSON:
    """The message as OpenAI JSON: proto field names, unset fields left out.

    Whole numbers come back as ints: `google.protobuf.Struct` (tool parameter schemas)
    stores every number as a double, and `"minItems": 1.0` is not what the caller sent.
    Built in one walk (server.api.message_dicts) when that is certainly the same.
    """
    direct = message_dicts.to_dict(message)
    if direct is not None:
        return direct
    try:
        result = json_format.MessageToDict(message, preserving_proto_field_name=True)
    except (ValueError, json_format.Error) as exc:
        where = non_finite_number_path(message)
        if where is None:
            raise
        raise errors.InvalidRequest(
            f"{where} holds a NaN or infinite number, which JSON cannot carry", field=where
        ) from exc
    normalized = whole_numbers_to_int(result)
    assert isinstance(normalized, dict)
    return normalized


def from_json(data: JSON, message: M, *, provider: str) -> M:
    """Fills `message` from an upstream's OpenAI-shaped answer, ignoring extra fields.

    Built by the constructor when it certainly gives what `json_format` would
    (server.api.proto_dicts), by `json_format` otherwise."""
    built = proto_dicts.build(type(message), data)
    if built is not None:
        message.MergeFrom(built)
        return message
    try:
        return json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered with a field of an unexpected type: {exc}", provider=provider
        ) from exc
    except (SystemError, ArithmeticError, ValueError, TypeError) as exc:
        # What ParseDict lets through unwrapped: a string given for a message field is
        # read as its member names, and upb fails on a lone surrogate among them with
        # SystemError; an integer beyond a double's range in a google.protobuf.Value
        # raises OverflowError. Either is the upstream's answer, not a gateway fault.
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered with a value the contract cannot hold (text that is not valid Unicode "
            f"where an object belongs, or a number out of range): {type(exc).__name__}",
            provider=provider,
        ) from exc


def whole_numbers_to_int(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {key: whole_numbers_to_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers_to_int(item) for item in value]
    return value


def chat_body(request: chat_pb.CreateChatCompletionRequest) -> JSON:
    """The chat request as the OpenAI body an adapter translates (without `model`)."""
    body = to_json(request)
    body.pop("model", None)
    if "seed" in body:  # int64 comes out of the JSON mapping as a string
        body["seed"] = int(body["seed"])
    if body.get("logprobs") is False:  # the default: no adapter needs to hear of it
        del body["logprobs"]
    return body


def chat_completion_from_openai(
    answer: JSON, *, provider: str, json_nulls: bool
) -> chat_pb.CreateChatCompletionResponse:
    """An upstream's `chat.completion`, with the nulls OpenAI's schema requires."""
    response = from_json(answer, chat_pb.CreateChatCompletionResponse(), provider=provider)
    for choice in response.choices:
        _null_logprobs(choice)
        message = choice.message
        message.role = message.role or "assistant"
        if json_nulls:
            for field in ("content", "refusal"):
                if not message.HasField(field):
                    setattr(message, field, JSON_NULL)
    return response


def chat_chunk_from_openai(chunk: JSON, *, provider: str, json_nulls: bool) -> chat_pb.StreamChatCompletionResponse:
    """An upstream's `chat.completion.chunk`, `finish_reason: null` until the last."""
    message = from_json(chunk, chat_pb.StreamChatCompletionResponse(), provider=provider)
    for choice in message.choices:
        _null_logprobs(choice)
        if json_nulls and not choice.HasField("finish_reason"):
            choice.finish_reason = JSON_NULL
    return message


def _null_logprobs(choice: chat_pb.ChatChoice | chat_pb.ChunkChoice) -> None:
    if not choice.HasField("logprobs"):
        choice.logprobs.null_value = struct_pb2.NULL_VALUE


def image_model(request: image_pb.CreateImageRequest) -> str:
    """The model an image request goes to: its own, or OpenAI's default."""
    return request.model or DEFAULT_IMAGE_MODEL


def image_answer_from_openai(answer: JSON, *, provider: str) -> tuple[image_pb.CreateImageResponse, JSON | None]:
    """An upstream's images answer, and its usage in both OpenAI naming schemes (for
    the client and the ledger alike)."""
    usage = answer.get("usage")
    if isinstance(usage, dict):
        usage = with_both_usage_names(usage)
        answer = {**answer, "usage": usage}
    return from_json(answer, image_pb.CreateImageResponse(), provider=provider), usage


def with_both_usage_names(usage: JSON) -> JSON:
    """`usage` with `input_tokens`/`output_tokens` (ImageGenUsage, and OpenAI's newer
    APIs) and `prompt_tokens`/`completion_tokens` (chat) each filled from the other."""
    both = dict(usage)
    for new, old in (("input_tokens", "prompt_tokens"), ("output_tokens", "completion_tokens")):
        if new in both and old not in both:
            both[old] = both[new]
        elif old in both and new not in both:
            both[new] = both[old]
    return both


def check_given_fields(given: Iterable[str], request: type[Message]) -> None:
    """Refuses the first parameter the client gave that `request` does not carry."""
    known = _parameter_names(request.DESCRIPTOR)
    for name in given:
        if not name or name in known:
            continue
        if name == UNUSUAL_NAME:
            raise errors.InvalidRequest(
                "Unrecognized request argument supplied: a top-level member whose name is not a parameter"
            )
        if name == TOO_MANY_NAMES:
            raise errors.InvalidRequest("the request has more than 64 top-level members; no operation has that many")
        if name == "stream":  # images: only "stream": true reaches here
            raise errors.InvalidRequest(f"stream: streaming this operation {_NOT_SUPPORTED}", field=name)
        reason = REFUSED_PARAMETERS.get(name)
        message = f"{name}: {reason}" if reason else f"Unrecognized request argument supplied: {name}"
        raise errors.InvalidRequest(message, field=name)


@functools.cache
def _parameter_names(message: Descriptor) -> frozenset[str]:
    """The message's field names, proto and JSON (computed once per message type)."""
    fields = message.fields
    return frozenset({field.name for field in fields} | {field.json_name for field in fields})
