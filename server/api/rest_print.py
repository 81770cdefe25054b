"""OpenAI's JSON for a chat message, printed by the server (for server.api.bridge).

The REST bridge used to print chat answers with Envoy's transcoder (proto field names,
`always_print_primitive_fields`) and then rewrite the text in its Lua filter: the
`convert.JSON_NULL` marker as `null`, and the members proto3 cannot leave out but
OpenAI never prints (`"tool_calls":[]`, `"code":""`, ...) dropped. For streams that Lua
pass over every chunk cost Envoy more CPU than everything else it does for the stream.
This module prints the same JSON in the server, in one walk:

- which members exist is still the contract's decision: every field of the message,
  a field without presence (a plain scalar, a repeated field, a map) always, one with
  presence (a message, a proto3 `optional`) only when set; proto field names; 64-bit
  integers as strings, enums by name, non-finite doubles as "NaN"/"Infinity" strings,
  `google.protobuf.Value`/`Struct`/`ListValue` as the JSON they hold, whole numbers
  among their (double) numbers as integers, as the transcoder prints them;
- then the bridge's rules (`DROPPED_WHEN_EMPTY`, `param`, `JSON_NULL`), the ones
  envoy/openai_bridge.lua applied to the text.

`json_format.MessageToDict` does the first part but walks the descriptors in Python for
every message (about 40 µs per chunk); here each message type's fields are looked up
once (`plan_of`), so a chunk costs a few attribute reads per field. Other well-known
types (none in the chat messages) go through `json_format`.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

from server.api.convert import JSON_NULL

# Members OpenAI never prints empty, which proto3 prints because it has no "unset" for
# a plain string or a repeated field (the bridge's Lua filter trimmed the same ones).
DROPPED_WHEN_EMPTY = frozenset({"tool_calls", "alias_of", "error", "code", "resting"})
# An error's `param` is OpenAI's null when no parameter is at fault.
NULL_WHEN_EMPTY = frozenset({"param"})

_VALUE = "google.protobuf.Value"
_STRUCT = "google.protobuf.Struct"
_LIST_VALUE = "google.protobuf.ListValue"
_INT64_TYPES = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)

Convert = Callable[[Any], Any]
# Compact, and UTF-8 as is (the transcoder printed no \u escapes either); made once
# (json.dumps with options builds an encoder per call).
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def to_json_bytes(message: Message) -> bytes:
    """`message` as OpenAI's JSON text (compact, UTF-8, non-ASCII as is)."""
    return json_text(to_openai_dict(message))


def json_text(printed: dict[str, Any]) -> bytes:
    """A printed message's dict as its JSON text (compact, UTF-8, non-ASCII as is).

    Written by orjson: the same text as the standard library's encoder but for the
    style of some floats (`1.5e-05` is `0.000015`), in about a sixth of the time,
    which counted for every event of a stream. The printing rules leave nothing it
    cannot write (non-finite numbers are strings, 64-bit integers strings); were
    there something, the standard encoder writes it."""
    try:
        return orjson.dumps(printed)
    except orjson.JSONEncodeError:
        return _ENCODE(printed).encode()


def to_openai_dict(message: Message) -> dict[str, Any]:
    """`message` as the dict of OpenAI's JSON for it (see the module docstring).

    The result shares its empty lists with later results: read it, do not change it."""
    plan = plan_of(message.DESCRIPTOR)
    out = plan.defaults.copy()
    converts = plan.converts
    # Only the fields that are set (a field without presence: when not its default);
    # `ListFields` lists them in C, in field-number order.
    for field, value in message.ListFields():
        name, convert = converts[field]
        out[name] = value if convert is None else convert(value)
    for name, dropped in plan.trims:  # an explicitly set empty value (no chat field has one)
        if out.get(name, None) == "":
            if dropped:
                del out[name]
            else:
                out[name] = None
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    # The fields without presence at their default value (as printed, after the
    # bridge's rules), in declaration order: what the message prints when unset.
    defaults: dict[str, Any]
    # Each field's name and how its value is printed (None: as it is), by descriptor
    # (reading a descriptor's name costs more than this lookup).
    converts: dict[FieldDescriptor, tuple[str, Convert | None]]
    # Fields with presence that the bridge's rules trim when empty: (name, dropped).
    trims: tuple[tuple[str, bool], ...]


@functools.cache
def plan_of(descriptor: Descriptor) -> Plan:
    defaults: dict[str, Any] = {}
    converts: dict[FieldDescriptor, tuple[str, Convert | None]] = {}
    trims: list[tuple[str, bool]] = []
    for field in descriptor.fields:
        convert = _field_converter(field)
        converts[field] = (field.name, None if convert is _same else convert)
        dropped = True if field.name in DROPPED_WHEN_EMPTY else False if field.name in NULL_WHEN_EMPTY else None
        if field.has_presence:
            if dropped is not None and field.message_type is None:
                trims.append((field.name, dropped))
            continue
        default = _default(field, convert)
        if dropped is None or (default != "" and default != []):
            defaults[field.name] = default
        elif not dropped:
            defaults[field.name] = None
    return Plan(defaults, converts, tuple(trims))


def _default(field: FieldDescriptor, convert: Convert) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return {}
    if field.is_repeated:
        return []
    return convert(field.default_value)


def _field_converter(field: FieldDescriptor) -> Convert:
    one = _converter(field)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return functools.partial(_map, _converter(field.message_type.fields_by_name["value"]))
    if field.is_repeated:
        return functools.partial(_list, one)
    return one


def _list(convert: Convert, values: Any) -> list[Any]:
    return [convert(value) for value in values]


def _map(convert: Convert, values: Any) -> dict[str, Any]:
    return {_key(key): convert(value) for key, value in values.items()}


def _key(key: Any) -> str:
    return ("true" if key else "false") if isinstance(key, bool) else str(key)


def value_printer(field: FieldDescriptor) -> Convert:
    """How one value of `field` is printed (one element, for a repeated field)."""
    return _converter(field)


def _converter(field: FieldDescriptor) -> Convert:
    message = field.message_type
    if message is not None:
        return _message_converter(message)
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _string
    if kind in _INT64_TYPES:
        return str
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return _double
    if kind == FieldDescriptor.TYPE_FLOAT:
        return _float
    if kind == FieldDescriptor.TYPE_BYTES:
        return _bytes
    if kind == FieldDescriptor.TYPE_ENUM and field.enum_type is not None:
        return functools.partial(_enum, dict(field.enum_type.values_by_number))
    return _same  # bool, 32-bit integers


def _message_converter(message: Descriptor) -> Convert:
    name = message.full_name
    if name == _VALUE:
        return _value
    if name == _STRUCT:
        return _struct
    if name == _LIST_VALUE:
        return _list_value
    if name.startswith("google.protobuf."):
        return _well_known
    return to_openai_dict


def _same(value: Any) -> Any:
    return value


def _string(value: str) -> str | None:
    return None if value == JSON_NULL else value


def _double(value: float) -> float | int | str:
    if not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    return _whole(value)


def _whole(value: float) -> float | int:
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _float(value: float) -> float | int | str:
    if not math.isfinite(value):
        return _double(value)
    # The shortest decimal that is the same 32-bit float (as the transcoder prints it).
    packed = struct.pack("<f", value)
    for digits in range(6, 10):
        shortest = float(f"{value:.{digits}g}")
        if struct.pack("<f", shortest) == packed:
            return _whole(shortest)
    return _whole(value)


def _bytes(value: bytes) -> str:
    return base64.b64encode(value).decode("ascii")


def _enum(names: dict[int, Any], value: int) -> str | int:
    known = names.get(value)
    return known.name if known is not None else value


def _value(value: Any) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null_value":
        return None
    if kind == "number_value":
        return _double(value.number_value)
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return _struct(value.struct_value)
    return _list_value(value.list_value)


def _struct(value: Any) -> dict[str, Any]:
    return {key: _value(item) for key, item in value.fields.items()}


def _list_value(value: Any) -> list[Any]:
    return [_value(item) for item in value.values]


def _well_known(value: Message) -> Any:
    return json_format.MessageToDict(value, preserving_proto_field_name=True)
