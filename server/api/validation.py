"""Checks of request fields, with messages that say which field is wrong and why.
Each function raises `InvalidRequest` on the first problem.

The contract's own rules are checked for every request by `check_request`, from one
table: the fields marked REQUIRED (`google.api.field_behavior`) must be set, and each
bound a field's comment in `protos/` states ("0 to 2", "up to 64 characters", "at
most 128", "1 or more") is in `LIMITS`, keyed by the field's full name.
tests/test_hostile_grpc.py reads the comments from the descriptor set and fails when a
documented bound is missing here or differs, and probes each one at and past its edge
against the real server. Rules the schema cannot express at all (roles, content part
shapes, tool_choice forms) follow below as code.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from google.api import field_behavior_pb2
from google.protobuf import struct_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.errors import InvalidRequest, RequestTooLarge

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
# "letters, digits, underscores and dashes" (names of participants, functions, schemas).
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-]*")
PACKAGE = "aigne.hub.v1."

Bounded = Literal["value", "length", "items", "item_length", "key_length", "value_length", "values"]


@dataclass(frozen=True, slots=True)
class Limit:
    """A bound of a request field: on its number (`value`), its length in characters,
    its count of items (a repeated field, a map, or a JSON array in a Value), each
    item's length, each map key's or value's length, or each map value (`values`)."""

    low: float | None = None
    high: float | None = None
    of: Bounded = "value"
    low_exclusive: bool = False

    def describe(self) -> str:
        low = f"{self.low:g}" if self.low is not None else ""
        high = f"{self.high:g}" if self.high is not None else ""
        if self.low_exclusive:
            return f"greater than {low} and at most {high}"
        if self.low is not None and self.high is not None:
            return f"between {low} and {high}"
        return f"at least {low}" if self.low is not None else f"at most {high}"

    def allows(self, number: float) -> bool:
        low_ok = self.low is None or (number > self.low if self.low_exclusive else number >= self.low)
        return low_ok and (self.high is None or number <= self.high)


def _p(name: str) -> str:
    return PACKAGE + name


LIMITS: dict[str, tuple[Limit, ...]] = {
    _p("CreateChatCompletionRequest.messages"): (Limit(1, 10_000, "items"),),
    _p("CreateChatCompletionRequest.temperature"): (Limit(0, 2),),
    _p("CreateChatCompletionRequest.top_p"): (Limit(0, 1, low_exclusive=True),),
    _p("CreateChatCompletionRequest.n"): (Limit(1, 128),),
    _p("CreateChatCompletionRequest.stop"): (Limit(None, 4, "items"),),
    _p("CreateChatCompletionRequest.max_tokens"): (Limit(1),),
    _p("CreateChatCompletionRequest.max_completion_tokens"): (Limit(1),),
    _p("CreateChatCompletionRequest.presence_penalty"): (Limit(-2, 2),),
    _p("CreateChatCompletionRequest.frequency_penalty"): (Limit(-2, 2),),
    _p("CreateChatCompletionRequest.logit_bias"): (Limit(-100, 100, "values"),),
    _p("CreateChatCompletionRequest.tools"): (Limit(None, 128, "items"),),
    _p("CreateChatCompletionRequest.top_logprobs"): (Limit(0, 20),),
    _p("CreateChatCompletionRequest.metadata"): (
        Limit(None, 16, "items"),
        Limit(None, 64, "key_length"),
        Limit(None, 512, "value_length"),
    ),
    # Identifiers a real client keeps short: bounded so that no echo of one can grow a
    # status past Envoy's header limit, and refused before any work.
    _p("CreateChatCompletionRequest.model"): (Limit(None, 256, "length"),),
    _p("ChatMessage.tool_call_id"): (Limit(None, 256, "length"),),
    _p("ToolCall.id"): (Limit(None, 256, "length"),),
    _p("CreateEmbeddingRequest.model"): (Limit(None, 256, "length"),),
    _p("CreateImageRequest.model"): (Limit(None, 256, "length"),),
    _p("CreateSpeechRequest.model"): (Limit(None, 256, "length"),),
    _p("CreateTranscriptionRequest.model"): (Limit(None, 256, "length"),),
    _p("CreateTranscriptionRequest.filename"): (Limit(None, 256, "length"),),
    _p("GetStatusRequest.model"): (Limit(None, 256, "length"),),
    _p("ChatMessage.name"): (Limit(None, 64, "length"),),
    _p("FunctionDefinition.name"): (Limit(None, 64, "length"),),
    _p("JsonSchema.name"): (Limit(None, 64, "length"),),
    _p("CreateSpeechRequest.input"): (Limit(1, 4096, "length"),),
    _p("CreateSpeechRequest.speed"): (Limit(0.25, 4.0),),
    _p("CreateTranscriptionRequest.temperature"): (Limit(0, 1),),
    _p("CreateImageRequest.prompt"): (Limit(None, 32_000, "length"),),
    _p("CreateImageRequest.n"): (Limit(1, 10),),
    _p("CreateEmbeddingRequest.input"): (Limit(None, 2048, "items"),),
    _p("CreateEmbeddingRequest.dimensions"): (Limit(1),),
    _p("CreateApiKeyRequest.owner"): (Limit(None, 200, "length"),),
    _p("CreateApiKeyRequest.name"): (Limit(1, 200, "length"),),
    _p("GetProviderHealthRequest.window_minutes"): (Limit(None, 10_080),),
    _p("CreateApiKeyRequest.allowed_models"): (Limit(None, 100, "items"), Limit(1, 200, "item_length")),
    _p("GrantCreditsRequest.owner"): (Limit(None, 200, "length"),),
    _p("GrantCreditsRequest.note"): (Limit(None, 500, "length"),),
    _p("ModelRate.model"): (Limit(None, 200, "length"),),
    _p("AddProviderCredentialRequest.secret"): (Limit(1, 8192, "length"),),
    _p("RateLimit.model"): (Limit(None, 200, "length"),),
    _p("RateLimit.rpm"): (Limit(1, 10**12),),
    _p("RateLimit.tpm"): (Limit(1, 10**12),),
    _p("RateLimit.concurrency"): (Limit(1, 10**12),),
    _p("AddProviderCredentialRequest.label"): (Limit(None, 200, "length"),),
}
# Fields that name a model: besides their length, no control characters and no "." or
# ".." path segment, since adapters put the upstream model in the provider's URL path
# (Gemini's `models/{model}:generateContent`): a model must not walk to another endpoint.
MODEL_FIELDS = frozenset(
    _p(name)
    for name in (
        "CreateChatCompletionRequest.model",
        "CreateEmbeddingRequest.model",
        "CreateImageRequest.model",
        "CreateSpeechRequest.model",
        "CreateTranscriptionRequest.model",
        "GetStatusRequest.model",
    )
)
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f]")


def check_model_name(model: str, path: str = "model") -> None:
    """Refuses a model name that no provider has and that could change an upstream URL."""
    if CONTROL_CHARACTERS.search(model):
        raise InvalidRequest(f"{path} must not contain control characters", field=path)
    if any(segment in (".", "..") for segment in model.split("/")):
        raise InvalidRequest(f'{path} must not contain "." or ".." path segments', field=path)


# Fields whose value must also be a name of letters, digits, underscores and dashes.
NAME_FIELDS = frozenset({_p("ChatMessage.name"), _p("FunctionDefinition.name"), _p("JsonSchema.name")})


def check_request(message: Message) -> None:
    """Checks `message` and every message it holds against the contract: REQUIRED
    fields set, documented bounds kept."""
    _check_message(message, "")


@dataclass(frozen=True, slots=True)
class _Rule:
    field: FieldDescriptor
    required: bool
    limits: tuple[Limit, ...]
    recurse: bool
    # Read from the descriptor once: each read of its `name` makes a new string.
    name: str
    repeated: bool
    model: bool  # a model name (check_model_name)
    named: bool  # a NAME_FIELDS name


_RULES: dict[str, tuple[_Rule, ...]] = {}
# The same by descriptor object: a descriptor's `full_name` is a new string at each read.
_RULES_BY_DESCRIPTOR: dict[Any, tuple[_Rule, ...]] = {}


def _rules_of(descriptor: Any) -> tuple[_Rule, ...]:
    rules = _RULES_BY_DESCRIPTOR.get(descriptor)
    if rules is None:
        rules = _RULES_BY_DESCRIPTOR[descriptor] = _rules(descriptor)
    return rules


def _rules(descriptor: Any) -> tuple[_Rule, ...]:
    """What to check in messages of this type, worked out once per type."""
    cached = _RULES.get(descriptor.full_name)
    if cached is not None:
        return cached
    _RULES[descriptor.full_name] = ()  # a message type that contains itself
    rules = []
    for field in descriptor.fields:
        behaviors = field.GetOptions().Extensions[field_behavior_pb2.field_behavior]
        required = field_behavior_pb2.REQUIRED in behaviors
        limits = LIMITS.get(field.full_name, ())
        sub = field.message_type
        recurse = (
            sub is not None
            and sub.full_name.startswith(PACKAGE)
            and not sub.GetOptions().map_entry
            and bool(_rules(sub))
        )
        if required or limits or recurse:
            model, named = field.full_name in MODEL_FIELDS, field.full_name in NAME_FIELDS
            rules.append(_Rule(field, required, limits, recurse, field.name, field.is_repeated, model, named))
    _RULES[descriptor.full_name] = result = tuple(rules)
    return result


def _check_message(message: Message, prefix: str) -> None:
    rules = _rules_of(message.DESCRIPTOR)
    if not rules:
        return
    # The fields set, by descriptor, in one C call: a REQUIRED field absent from it is
    # unset (repeated and map fields are listed only when not empty, fields with
    # presence when set, other scalars only when not zero).
    present = dict(message.ListFields())
    for rule in rules:
        field = rule.field
        value = present.get(field, _ABSENT)
        if value is _ABSENT:
            if rule.required:
                path = prefix + rule.name
                raise InvalidRequest(f"{path} is required", field=path)
            continue
        path = prefix + rule.name
        for limit in rule.limits:
            _check_limit(limit, path, field, value)
        if rule.model:
            check_model_name(value, path)
        if rule.named and NAME_PATTERN.fullmatch(value) is None:
            raise InvalidRequest(f"{path} may contain only letters, digits, underscores and dashes", field=path)
        if rule.recurse:
            if rule.repeated:
                for index, item in enumerate(value):
                    _check_message(item, f"{path}[{index}].")
            else:
                _check_message(value, f"{path}.")


_ABSENT = object()


def _check_limit(limit: Limit, path: str, field: FieldDescriptor, value: Any) -> None:
    if limit.of == "value":
        _check_number(limit, path, value)
    elif limit.of == "length":
        _check_size(limit, path, len(value), "characters")
    elif limit.of == "items":
        _check_size(limit, path, _item_count(value), "items")
    elif limit.of == "item_length":
        for index, item in enumerate(value):
            _check_size(limit, f"{path}[{index}]", len(item), "characters")
    elif limit.of == "key_length":
        for key in value:
            _check_size(limit, f"{path} key {key[:64]!r}", len(key), "characters", field=path)
    elif limit.of == "value_length":
        for key, item in value.items():
            _check_size(limit, f"{path}[{key[:64]!r}]", len(item), "characters", field=path)
    else:
        for key, item in value.items():
            _check_number(limit, f"{path}[{key[:64]}]", item)


def _check_number(limit: Limit, path: str, number: float) -> None:
    if not limit.allows(number):
        raise InvalidRequest(f"{path} must be {limit.describe()}, got {number:g}", field=path)


def _check_size(limit: Limit, path: str, size: int, unit: str, *, field: str | None = None) -> None:
    if limit.allows(size):
        return
    error = RequestTooLarge if limit.high is not None and size > limit.high else InvalidRequest
    raise error(f"{path} must have {limit.describe()} {unit}, got {size}", field=field or path)


def _item_count(value: Any) -> int:
    """Items of a repeated field or map; of a JSON array in a Value (a lone string is one)."""
    if isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        return len(value.list_value.values) if kind == "list_value" else int(kind not in (None, "null_value"))
    return len(value)


def non_finite_number_path(value: Any, path: str = "") -> str | None:
    """Where in `value` (a message, or a Struct, Value or ListValue inside one) a JSON
    number is NaN or infinite: JSON has no such numbers, so such a request cannot be
    passed on."""
    if isinstance(value, struct_pb2.Value):
        kind = value.WhichOneof("kind")
        if kind == "number_value":
            return None if math.isfinite(value.number_value) else path
        return non_finite_number_path(getattr(value, kind), path) if kind in ("struct_value", "list_value") else None
    if isinstance(value, struct_pb2.Struct):
        return _first(non_finite_number_path(item, f"{path}.{key}") for key, item in value.fields.items())
    if isinstance(value, struct_pb2.ListValue):
        return _first(non_finite_number_path(item, f"{path}[{i}]") for i, item in enumerate(value.values))
    if not isinstance(value, Message):
        return None
    found: list[str | None] = []
    for field, item in value.ListFields():
        where = f"{path}.{field.name}" if path else field.name
        if field.message_type is None:
            continue
        if field.message_type.GetOptions().map_entry:
            found.append(_first(non_finite_number_path(v, f"{where}[{k}]") for k, v in item.items()))
        elif field.is_repeated:
            found.append(_first(non_finite_number_path(v, f"{where}[{i}]") for i, v in enumerate(item)))
        else:
            found.append(non_finite_number_path(item, where))
        if found[-1]:
            return found[-1]
    return None


def _first(paths: Iterable[str | None]) -> str | None:
    return next((path for path in paths if path), None)


def check_chat_request(request: chat_pb.CreateChatCompletionRequest) -> None:
    """Validates what `check_request` cannot: roles, content shapes, tool choices."""
    for index, message in enumerate(request.messages):
        _check_chat_message(index, message)
    _check_stop(request.stop)
    _check_tools(request)
    _check_response_format(request)
    if request.HasField("stream_options") and not request.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", field="stream_options")
    if request.HasField("top_logprobs") and not request.logprobs:
        raise InvalidRequest("top_logprobs is only allowed when logprobs is true", field="top_logprobs")


def _check_chat_message(index: int, message: chat_pb.ChatMessage) -> None:
    role = message.role  # (each read of a string field makes a new str: read once)
    if role == "function":  # still in OpenAI's API, refused with a way out
        raise InvalidRequest(
            f"messages[{index}].role 'function' is deprecated by OpenAI and not supported by the gateway: "
            "answer a tool call with role 'tool' and its tool_call_id",
            field=f"messages[{index}].role",
        )
    if role not in ROLES:
        raise InvalidRequest(
            f"messages[{index}].role must be one of {', '.join(sorted(ROLES))}, got {role[:64]!r}",
            field=f"messages[{index}].role",
        )
    has_content = _check_content(index, message)
    if role == "assistant":
        tool_calls = message.tool_calls
        if not has_content and not tool_calls and not message.HasField("refusal"):
            where = f"messages[{index}]"
            raise InvalidRequest(f"{where}: an assistant message needs content or tool_calls", field=f"{where}.content")
        for call_index, call in enumerate(tool_calls):
            if not call.id or not call.function.name:
                raise InvalidRequest(
                    f"messages[{index}].tool_calls[{call_index}] needs an id and function.name",
                    field=f"messages[{index}].tool_calls[{call_index}]",
                )
    elif not has_content:
        where = f"messages[{index}]"
        raise InvalidRequest(f"{where}.content is required for role {role[:64]!r}", field=f"{where}.content")
    if role == "tool" and not message.tool_call_id:
        where = f"messages[{index}]"
        raise InvalidRequest(f"{where}.tool_call_id is required for role 'tool'", field=f"{where}.tool_call_id")


def _check_content(index: int, message: chat_pb.ChatMessage) -> bool:
    """Whether the message has content; raises if the content has the wrong shape."""
    if not message.HasField("content"):
        return False
    content = message.content
    kind = content.WhichOneof("kind")
    if kind == "null_value":
        return False
    if kind == "string_value":
        return True
    where = f"messages[{index}]"
    if kind != "list_value":
        raise InvalidRequest(f"{where}.content must be a string or an array of content parts", field=f"{where}.content")
    for part_index, part in enumerate(content.list_value.values):
        _check_content_part(f"{where}.content[{part_index}]", part)
    return len(content.list_value.values) > 0


def _check_content_part(where: str, part: struct_pb2.Value) -> None:
    if part.WhichOneof("kind") != "struct_value":
        raise InvalidRequest(f"{where} must be an object with a type", field=where)
    fields = part.struct_value.fields
    part_type = fields["type"].string_value if "type" in fields else ""
    if part_type not in CONTENT_PART_TYPES:
        raise InvalidRequest(
            f"{where}.type must be one of {', '.join(sorted(CONTENT_PART_TYPES))}, got {part_type[:64]!r}",
            field=f"{where}.type",
        )
    if part_type == "text" and fields["text"].WhichOneof("kind") != "string_value":
        raise InvalidRequest(f"{where}.text must be a string", field=f"{where}.text")
    if part_type == "image_url":
        image = fields["image_url"].struct_value.fields if "image_url" in fields else {}
        if "url" not in image or not image["url"].string_value:
            raise InvalidRequest(f"{where}.image_url.url is required", field=f"{where}.image_url.url")


def _check_stop(stop: struct_pb2.Value) -> None:
    kind = stop.WhichOneof("kind")
    if kind in (None, "null_value", "string_value"):
        return
    values: Iterable[struct_pb2.Value] = stop.list_value.values if kind == "list_value" else ()
    if kind != "list_value" or any(v.WhichOneof("kind") != "string_value" for v in values):
        raise InvalidRequest("stop must be a string or an array of strings", field="stop")


def _check_tools(request: chat_pb.CreateChatCompletionRequest) -> None:
    for index, tool in enumerate(request.tools):
        if tool.type != "function":
            raise InvalidRequest(
                f"tools[{index}].type must be 'function', got {tool.type[:64]!r}", field=f"tools[{index}].type"
            )
        if not tool.function.name:
            raise InvalidRequest(f"tools[{index}].function.name is required", field=f"tools[{index}].function.name")
    choice = request.tool_choice
    kind = choice.WhichOneof("kind")
    if kind in (None, "null_value"):
        return
    if kind == "string_value":
        if choice.string_value not in TOOL_CHOICE_MODES:
            raise InvalidRequest(
                f"tool_choice must be none, auto, required or a function object, got {choice.string_value[:64]!r}",
                field="tool_choice",
            )
        return
    function = choice.struct_value.fields.get("function") if kind == "struct_value" else None
    if function is None or not function.struct_value.fields.get("name", struct_pb2.Value()).string_value:
        raise InvalidRequest(
            'tool_choice as an object must be {"type": "function", "function": {"name": ...}}', field="tool_choice"
        )


def _check_response_format(request: chat_pb.CreateChatCompletionRequest) -> None:
    if not request.HasField("response_format"):
        return
    response_format = request.response_format
    if response_format.type not in RESPONSE_FORMATS:
        raise InvalidRequest(
            f"response_format.type must be one of {', '.join(sorted(RESPONSE_FORMATS))}, "
            f"got {response_format.type[:64]!r}",
            field="response_format.type",
        )
    if response_format.type == "json_schema" and not response_format.json_schema.name:
        raise InvalidRequest(
            "response_format.json_schema.name is required for type json_schema", field="response_format.json_schema"
        )
