"""A fast path from an upstream's JSON (as dicts) to a proto message.

`json_format.ParseDict` walks the descriptors in Python, field by field: about 75 µs
for a chat completion and 45 µs for each streamed chunk, the largest share of a
stream's CPU in the gateway. The message constructor of the C (upb) implementation
takes nested dicts and lists and checks each value's type and range itself, so this
module only keeps the members the message has (ignoring the rest, as
`ignore_unknown_fields=True` does) and lets the constructor build the message.

It answers only when the result is certainly what `ParseDict` would give; whenever
`ParseDict` might coerce or decide differently (a camelCase member name, a whole
number written as 3.0, a bytes or well-known-type field other than a null
`google.protobuf.Value`, a map, a value the constructor refuses) it answers None and
the caller parses with `json_format`, which also words the errors.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, TypeVar

from google.protobuf import struct_pb2
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message

M = TypeVar("M", bound=Message)

_VALUE = struct_pb2.Value.DESCRIPTOR.full_name
_NULL = struct_pb2.Value(null_value=struct_pb2.NULL_VALUE)
# Scalar types the constructor takes exactly as JSON gives them (with ParseDict's checks).
# (32-bit floats are left to ParseDict, which refuses values beyond their range.)
_INTEGERS = frozenset({int})
_AS_GIVEN: dict[int, frozenset[type]] = {
    FieldDescriptor.TYPE_STRING: frozenset({str}),
    FieldDescriptor.TYPE_BOOL: frozenset({bool}),
    FieldDescriptor.TYPE_DOUBLE: frozenset({int, float}),
    **dict.fromkeys(
        (
            FieldDescriptor.TYPE_INT32,
            FieldDescriptor.TYPE_UINT32,
            FieldDescriptor.TYPE_SINT32,
            FieldDescriptor.TYPE_FIXED32,
            FieldDescriptor.TYPE_SFIXED32,
            FieldDescriptor.TYPE_INT64,
            FieldDescriptor.TYPE_UINT64,
            FieldDescriptor.TYPE_SINT64,
            FieldDescriptor.TYPE_FIXED64,
            FieldDescriptor.TYPE_SFIXED64,
        ),
        _INTEGERS,
    ),
}


class _Unsure(Exception):
    """ParseDict might treat this input differently: let it decide."""


@dataclass(frozen=True, slots=True)
class Field:
    repeated: bool
    # The message type, for a message field (not a map, not well-known); looked up
    # when used, so that a message type may contain itself.
    message: Descriptor | None = None
    # The Python types a scalar may have (exactly: a bool is not an int here).
    scalars: frozenset[type] = frozenset()
    # A google.protobuf.Value field: only JSON null is taken here.
    value: bool = False


@dataclass(frozen=True, slots=True)
class Fields:
    by_name: dict[str, Field | None]  # None: a field this path leaves to ParseDict
    aliases: frozenset[str]  # camelCase JSON names that differ from the proto names
    # Each member of a real oneof -> the oneof (ParseDict refuses two members given).
    oneof_of: dict[str, str]


def build(message_type: type[M], data: dict[str, Any]) -> M | None:
    """`message_type` filled from `data` as `ParseDict(ignore_unknown_fields=True)`
    would, or None when only ParseDict can tell."""
    try:
        return message_type(**_kwargs(data, fields_of(message_type.DESCRIPTOR)))
    except Exception:  # noqa: BLE001 - whatever the constructor refuses, ParseDict decides (and words it)
        return None


def _kwargs(data: dict[str, Any], fields: Fields) -> dict[str, Any]:
    if fields.oneof_of and len({fields.oneof_of.get(name) for name in data} - {None}) < sum(
        name in fields.oneof_of for name in data
    ):
        raise _Unsure("two members of one oneof")
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        if name not in fields.by_name:
            if name in fields.aliases:
                raise _Unsure(name)
            continue  # not in the contract: ignored
        field = fields.by_name[name]
        if field is None:
            raise _Unsure(name)
        if value is None:  # JSON null: the field stays unset (a Value becomes null)
            if field.value:
                kwargs[name] = _NULL
            continue
        kwargs[name] = _converted(value, field) if not field.repeated else _each(value, field)
    return kwargs


def _each(values: Any, field: Field) -> list[Any]:
    if not isinstance(values, list):
        raise _Unsure("not a list")
    return [_converted(item, field) for item in values]


def _converted(value: Any, field: Field) -> Any:
    if field.message is not None:
        if not isinstance(value, dict):
            raise _Unsure("not an object")
        return _kwargs(value, fields_of(field.message))
    if type(value) not in field.scalars:
        raise _Unsure("not the field's type")
    return value


@functools.cache
def fields_of(descriptor: Descriptor) -> Fields:
    by_name: dict[str, Field | None] = {}
    for field in descriptor.fields:
        by_name[field.name] = _field(field)
    aliases = frozenset(f.json_name for f in descriptor.fields if f.json_name != f.name)
    oneof_of = {
        field.name: oneof.name
        for oneof in descriptor.oneofs
        if len(oneof.fields) > 1  # a proto3 `optional` is a oneof of one
        for field in oneof.fields
    }
    return Fields(by_name, aliases, oneof_of)


def _field(field: FieldDescriptor) -> Field | None:
    repeated = field.is_repeated
    message = field.message_type
    if message is None:
        scalars = _AS_GIVEN.get(field.type)
        return None if scalars is None else Field(repeated, scalars=scalars)
    if message.full_name == _VALUE and not repeated:
        return Field(repeated, value=True)
    if message.GetOptions().map_entry or message.full_name.startswith("google.protobuf."):
        return None
    return Field(repeated, message=message)
