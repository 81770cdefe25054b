"""A fast path from a request message to the OpenAI-shaped dict an adapter sends on.

`json_format.MessageToDict` walks the descriptors in Python and asks per field and
per value which JSON rule applies (about 9 µs for a small chat request, more with
tools); `server.api.convert.to_json` then walks the result again to turn whole
numbers back into ints. This module does both in one walk over `ListFields()` (the C
implementation's list of the fields that are set, in field-number order, which is
what `MessageToDict` iterates too), with each field's conversion decided once per
field descriptor.

It answers only when the result is certainly what `to_json` gives through
`json_format` (tests/test_proto_dicts.py compares them); for anything where
`json_format` has a rule of its own (enums, bytes, 32-bit floats, non-finite
numbers, maps with non-string keys, well-known types other than `Value`, `Struct`
and `ListValue`, extensions) it answers None and the caller uses `json_format`, which
also words the errors (server.api.proto_dicts is the same idea the other way).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

Convert = Callable[[Any], Any]

_WELL_KNOWN_PREFIX = "google.protobuf."
# 64-bit integers are strings in JSON (json_format's default).
_INT64 = frozenset(
    {
        FieldDescriptor.TYPE_INT64,
        FieldDescriptor.TYPE_UINT64,
        FieldDescriptor.TYPE_SINT64,
        FieldDescriptor.TYPE_FIXED64,
        FieldDescriptor.TYPE_SFIXED64,
    }
)
_AS_IS = frozenset(
    {
        FieldDescriptor.TYPE_STRING,
        FieldDescriptor.TYPE_BOOL,
        FieldDescriptor.TYPE_INT32,
        FieldDescriptor.TYPE_UINT32,
        FieldDescriptor.TYPE_SINT32,
        FieldDescriptor.TYPE_FIXED32,
        FieldDescriptor.TYPE_SFIXED32,
    }
)


class _Unsure(Exception):
    """json_format has a rule of its own for this value: let it decide."""


def to_dict(message: Message) -> dict[str, Any] | None:
    """`convert.to_json(message)` without json_format, or None when unsure."""
    try:
        return _message(message)
    except _Unsure:
        return None


def _message(message: Message) -> dict[str, Any]:
    plan = _plans.get(message.DESCRIPTOR)
    if plan is None:
        plan = _plan(message.DESCRIPTOR)
    out = {}
    for field, value in message.ListFields():
        name, convert = plan.get(field) or (field.name, _converter(field))  # (an extension: no plan)
        out[name] = convert(value)
    return out


def _plan(descriptor: Any) -> dict[Any, tuple[str, Convert]]:
    plan = _plans[descriptor] = {field: (field.name, _converter(field)) for field in descriptor.fields}
    return plan


# Each message type's fields: name and converter, by descriptor (a descriptor's `name`
# is a new string at every read; a 60-message conversation read them 600 times).
_plans: dict[Any, dict[Any, tuple[str, Convert]]] = {}


def _double(value: float) -> float | int:
    if not math.isfinite(value):
        raise _Unsure  # json_format prints "NaN"/"Infinity", or refuses a Value's
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def _value(value: Any) -> Any:
    """A google.protobuf.Value as JSON (unset: null, as json_format has it)."""
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
    return _list(value.list_value)


def _struct(struct: Any) -> dict[str, Any]:
    fields = struct.fields
    return {key: _value(fields[key]) for key in fields}


def _list(values: Any) -> list[Any]:
    return [_value(value) for value in values.values]


def _unsure(value: Any) -> Any:
    raise _Unsure


_WELL_KNOWN: dict[str, Convert] = {
    "google.protobuf.Value": _value,
    "google.protobuf.Struct": _struct,
    "google.protobuf.ListValue": _list,
}


@functools.cache
def _converter(field: FieldDescriptor) -> Convert:
    """How one field's value (the whole repeated or map field) becomes JSON."""
    if field.is_extension:
        return _unsure
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return _map(field.message_type)
    one = _single(field)
    if one is _unsure:
        return _unsure
    if field.is_repeated:
        return lambda values: [one(value) for value in values]
    return one


def _map(entry: Descriptor) -> Convert:
    key_field = entry.fields_by_name["key"]
    convert = _single(entry.fields_by_name["value"])
    if key_field.type != FieldDescriptor.TYPE_STRING or convert is _unsure:
        return _unsure  # json_format words other keys its own way
    return lambda entries: {key: convert(entries[key]) for key in entries}


def _single(field: FieldDescriptor) -> Convert:
    """How one value of the field becomes JSON."""
    message_type = field.message_type
    if message_type is not None:
        name = message_type.full_name
        if name.startswith(_WELL_KNOWN_PREFIX):
            return _WELL_KNOWN.get(name, _unsure)
        return _message
    if field.type in _AS_IS:
        return _as_is
    if field.type in _INT64:
        return str
    if field.type == FieldDescriptor.TYPE_DOUBLE:
        return _double
    return _unsure  # enums, bytes, 32-bit floats


def _as_is(value: Any) -> Any:
    return value
