"""Which top-level field of a request holds the bytes that no decoder accepts.

Envoy's transcoder, given a JSON object where a map's value must be a scalar
(`{"metadata": {"a": {}}}` or `{"logit_bias": {"a": {}}}` on chat), writes a map entry
whose value is not of the value's type. The decoder then refuses the whole message
without saying where. Here the message's top-level fields are decoded one at a time, so
that the refusal names the field (`param`) and says what its values must be, as
OpenAI's own 400 does. Decoding again costs only on a request that failed anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

# Wire types whose payload has a fixed size.
_FIXED_SIZES = {1: 8, 5: 4}
_JSON_KINDS = {
    FieldDescriptor.CPPTYPE_STRING: "a string",
    FieldDescriptor.CPPTYPE_BOOL: "a boolean",
    FieldDescriptor.CPPTYPE_MESSAGE: "an object",
    FieldDescriptor.CPPTYPE_ENUM: "a string",
}


def undecodable_field(raw: bytes, message_type: type[Message]) -> tuple[str, str] | None:
    """The name of the first top-level field of `raw` that does not decode alone, and
    what is wrong with it in the JSON terms the client used; None if none is found."""
    for number, start, end in _top_level_fields(raw):
        try:
            message_type.FromString(raw[start:end])
        except Exception:  # noqa: BLE001 - whatever the decoder raises, these bytes are bad
            field = message_type.DESCRIPTOR.fields_by_number.get(number)
            return None if field is None else (field.name, _problem(field, message_type.DESCRIPTOR.full_name))
    return None


def _problem(field: Any, message_name: str) -> str:
    """What is wrong with `field` (a FieldDescriptor) when its bytes do not decode."""
    entry = field.message_type
    if entry is not None and entry.GetOptions().map_entry:
        value = entry.fields_by_name["value"]
        kind = _JSON_KINDS.get(value.cpp_type, "a number")
        return f"{field.name}: every value of this map must be {kind}"
    return (
        f"{field.name}: its bytes are not a valid value of this field of {message_name} "
        "(a string that is not UTF-8, or values nested more than 100 levels deep)"
    )


def _top_level_fields(raw: bytes) -> Iterator[tuple[int, int, int]]:
    """(field number, start, end) of each top-level field, tag included; stops where
    the framing itself is broken."""
    position = 0
    while position < len(raw):
        start = position
        tag, position = _varint(raw, position)
        if tag is None:
            return
        number, wire_type = tag >> 3, tag & 7
        if wire_type == 0:
            _, position = _varint(raw, position)
        elif wire_type == 2:
            size, position = _varint(raw, position)
            if size is None:
                return
            position += size
        elif wire_type in _FIXED_SIZES:
            position += _FIXED_SIZES[wire_type]
        else:  # groups: never written by the gateway's contract
            return
        if position > len(raw):
            return
        yield number, start, position


def _varint(raw: bytes, position: int) -> tuple[int | None, int]:
    value, shift = 0, 0
    while position < len(raw) and shift < 64:
        byte = raw[position]
        position += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, position
        shift += 7
    return None, len(raw)
