"""Checks of request fields that the schema cannot express, with messages that say
which field is wrong and why. Each function raises `InvalidRequest` on the first
problem."""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import struct_pb2

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from server.errors import InvalidRequest

ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
CONTENT_PART_TYPES = frozenset({"text", "image_url", "input_audio", "file", "refusal"})
TOOL_CHOICE_MODES = frozenset({"none", "auto", "required"})
RESPONSE_FORMATS = frozenset({"text", "json_object", "json_schema"})
MAX_MESSAGES = 10_000
MAX_STOP_SEQUENCES = 4
MAX_TOOLS = 128


def check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise InvalidRequest(f"{name} must be between {low:g} and {high:g}, got {value:g}", field=name)


def check_chat_request(request: chat_pb.CreateChatCompletionRequest) -> None:
    """Validates a chat request in the order a reader of the request would."""
    if not request.messages:
        raise InvalidRequest("messages must contain at least one message", field="messages")
    if len(request.messages) > MAX_MESSAGES:
        raise InvalidRequest(f"messages has more than {MAX_MESSAGES} entries", field="messages")
    for index, message in enumerate(request.messages):
        _check_message(index, message)
    _check_sampling(request)
    _check_stop(request.stop)
    _check_tools(request)
    _check_response_format(request)
    if request.HasField("stream_options") and not request.stream:
        raise InvalidRequest("stream_options is only allowed when stream is true", field="stream_options")


def _check_message(index: int, message: chat_pb.ChatMessage) -> None:
    where = f"messages[{index}]"
    if message.role not in ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(sorted(ROLES))}, got {message.role!r}",
            field=f"{where}.role",
        )
    has_content = _check_content(where, message)
    if message.role == "assistant":
        if not has_content and not message.tool_calls and not message.HasField("refusal"):
            raise InvalidRequest(f"{where}: an assistant message needs content or tool_calls", field=f"{where}.content")
        for call_index, call in enumerate(message.tool_calls):
            if not call.id or not call.function.name:
                raise InvalidRequest(
                    f"{where}.tool_calls[{call_index}] needs an id and function.name",
                    field=f"{where}.tool_calls[{call_index}]",
                )
    elif not has_content:
        raise InvalidRequest(f"{where}.content is required for role {message.role!r}", field=f"{where}.content")
    if message.role == "tool" and not message.tool_call_id:
        raise InvalidRequest(f"{where}.tool_call_id is required for role 'tool'", field=f"{where}.tool_call_id")


def _check_content(where: str, message: chat_pb.ChatMessage) -> bool:
    """Whether the message has content; raises if the content has the wrong shape."""
    if not message.HasField("content"):
        return False
    content = message.content
    kind = content.WhichOneof("kind")
    if kind == "null_value":
        return False
    if kind == "string_value":
        return True
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
            f"{where}.type must be one of {', '.join(sorted(CONTENT_PART_TYPES))}, got {part_type!r}",
            field=f"{where}.type",
        )
    if part_type == "text" and fields["text"].WhichOneof("kind") != "string_value":
        raise InvalidRequest(f"{where}.text must be a string", field=f"{where}.text")
    if part_type == "image_url":
        image = fields["image_url"].struct_value.fields if "image_url" in fields else {}
        if "url" not in image or not image["url"].string_value:
            raise InvalidRequest(f"{where}.image_url.url is required", field=f"{where}.image_url.url")


def _check_sampling(request: chat_pb.CreateChatCompletionRequest) -> None:
    if request.HasField("temperature"):
        check_range("temperature", request.temperature, 0.0, 2.0)
    if request.HasField("top_p"):
        check_range("top_p", request.top_p, 0.0, 1.0)
    if request.HasField("n"):
        check_range("n", request.n, 1, 128)
    if request.HasField("presence_penalty"):
        check_range("presence_penalty", request.presence_penalty, -2.0, 2.0)
    if request.HasField("frequency_penalty"):
        check_range("frequency_penalty", request.frequency_penalty, -2.0, 2.0)
    for name in ("max_tokens", "max_completion_tokens"):
        if request.HasField(name) and getattr(request, name) < 1:
            raise InvalidRequest(f"{name} must be at least 1", field=name)
    for token, bias in request.logit_bias.items():
        check_range(f"logit_bias[{token}]", bias, -100.0, 100.0)


def _check_stop(stop: struct_pb2.Value) -> None:
    kind = stop.WhichOneof("kind")
    if kind in (None, "null_value", "string_value"):
        return
    values: Iterable[struct_pb2.Value] = stop.list_value.values if kind == "list_value" else ()
    if kind != "list_value" or any(v.WhichOneof("kind") != "string_value" for v in values):
        raise InvalidRequest("stop must be a string or an array of strings", field="stop")
    if len(stop.list_value.values) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(f"stop takes at most {MAX_STOP_SEQUENCES} sequences", field="stop")


def _check_tools(request: chat_pb.CreateChatCompletionRequest) -> None:
    if len(request.tools) > MAX_TOOLS:
        raise InvalidRequest(f"tools takes at most {MAX_TOOLS} tools", field="tools")
    for index, tool in enumerate(request.tools):
        if tool.type != "function":
            raise InvalidRequest(
                f"tools[{index}].type must be 'function', got {tool.type!r}", field=f"tools[{index}].type"
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
                f"tool_choice must be none, auto, required or a function object, got {choice.string_value!r}",
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
            f"response_format.type must be one of {', '.join(sorted(RESPONSE_FORMATS))}, got {response_format.type!r}",
            field="response_format.type",
        )
    if response_format.type == "json_schema" and not response_format.json_schema.name:
        raise InvalidRequest(
            "response_format.json_schema.name is required for type json_schema", field="response_format.json_schema"
        )
