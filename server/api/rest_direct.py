"""An upstream's OpenAI-shaped dict printed straight as the REST bridge's JSON.

A streamed chunk on its way to a REST client took three conversions: the upstream's
dict to a proto (server.api.proto_dicts), the proto back to a dict
(server.api.rest_print), that dict to JSON text. The proto in the middle decides
what is printed: the contract's members only, each default filled in, each value of
its field's type. `openai_dict` makes the same decisions on the dict itself, in one
walk, so the proto is never built (about a third of the cost per chunk).

It answers only when the result is certainly what the round trip prints, and None
otherwise, exactly where proto_dicts steps aside (a camelCase member name, a value
of another type, a number out of its field's range, a string that is not valid
Unicode, a map, a bytes or well-known-type field but a null `google.protobuf.Value`,
two members of one oneof): the caller then takes the round trip, which also words
the errors. tests/test_rest_direct.py checks the two agree on the chunks of every
adapter and on thousands of generated variants.

The round trip's printing, reproduced:
- a field without presence (plain scalar, repeated) is printed always: its value,
  or its default when the value is the default; one with presence (a message, a
  proto3 `optional`, a `Value`) only when the dict gives it a value other than null
  (a `Value` given null is printed null);
- members come in rest_print's order: the fields without presence in declaration
  order, then the others in field-number order (what `ListFields` gives);
- the values through rest_print's own printers, then its trims.
`when_unset` gives, by message type and field, what is printed for a field the dict
leaves unset: what server.api.convert fills in after parsing (a choice's `logprobs`
as null; for REST clients a chunk's `finish_reason`, a message's `content` and
`refusal` as null; a message's empty `role` as "assistant").

Each message type's walk is worked out once (`_walk_of`): per field, one function
that checks and prints a value, so a member costs a lookup and a call.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from server.api import proto_dicts, rest_print
from server.api.convert import JSON_NULL

# What is printed for a field the dict leaves unset: (message full name, field name,
# printed value), hashable so that each message type's walk is worked out once per set.
WhenUnset = frozenset[tuple[str, str, Any]]
Check = Callable[[Any], Any]  # a value as printed; raises _Unsure where the round trip may differ

_INT_RANGES: dict[int, tuple[int, int]] = {
    **dict.fromkeys(
        (FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SFIXED32), (-(2**31), 2**31 - 1)
    ),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_FIXED32), (0, 2**32 - 1)),
    **dict.fromkeys(
        (FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_SINT64, FieldDescriptor.TYPE_SFIXED64), (-(2**63), 2**63 - 1)
    ),
    **dict.fromkeys((FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_FIXED64), (0, 2**64 - 1)),
}
_ABSENT = object()
_LEFT_OUT = object()  # an unset field with presence: not printed
_REFUSE = object()  # an unset or null field where only the round trip can tell
# A `when_unset` value: the field unset is for the round trip (it fills in more than a value).
UNSURE: Any = _REFUSE


class _Unsure(Exception):
    """The round trip might print this input differently: let it."""


@dataclass(frozen=True, slots=True)
class _Member:
    name: str
    check: Check
    presence: bool
    default: Any  # a field without presence: the value that leaves it unset
    when_absent: object  # printed when the dict has no such member; _LEFT_OUT: nothing
    when_null: object  # printed for a null; _LEFT_OUT: nothing; _REFUSE: unsure


@dataclass(frozen=True, slots=True)
class _Walk:
    members: tuple[_Member, ...]  # in field-number order (the order ListFields prints)
    names: frozenset[str]
    aliases: frozenset[str]  # camelCase names ParseDict would read as fields
    oneof_of: dict[str, str]
    defaults: dict[str, Any]
    trims: tuple[tuple[str, bool], ...]


def openai_dict(data: Any, descriptor: Descriptor, when_unset: WhenUnset = frozenset()) -> dict[str, Any] | None:
    """What `rest_print.to_openai_dict` prints for the message that `data` parses
    to (with the `when_unset` values filled in), or None when only the round trip
    can tell."""
    try:
        return _printed(data, _walk_of(descriptor, when_unset))
    except (_Unsure, UnicodeEncodeError, OverflowError):
        return None


def _printed(data: Any, walk: _Walk) -> dict[str, Any]:
    if type(data) is not dict:
        raise _Unsure("not an object")
    if not walk.names.issuperset(data):
        _check_unknown(data, walk)
    if walk.oneof_of:
        _check_oneofs(data, walk.oneof_of)
    out = walk.defaults.copy()
    for member in walk.members:
        value = data.get(member.name, _ABSENT)
        if value is _ABSENT:
            if member.when_absent is not _LEFT_OUT:
                if member.when_absent is _REFUSE:
                    raise _Unsure(member.name)
                out[member.name] = member.when_absent
        elif value is None:  # JSON null: the field stays unset (a Value is null)
            if member.when_null is _REFUSE:
                raise _Unsure(member.name)
            if member.when_null is not _LEFT_OUT:
                out[member.name] = member.when_null
        else:
            printed = member.check(value)
            if member.presence or value != member.default:
                out[member.name] = printed
    for name, dropped in walk.trims:
        if out.get(name, None) == "":
            if dropped:
                del out[name]
            else:
                out[name] = None
    return out


def _check_unknown(data: dict[str, Any], walk: _Walk) -> None:
    for name in data:
        if name not in walk.names and name in walk.aliases:
            raise _Unsure(name)  # unknown members are ignored, as ParseDict ignores them


def _check_oneofs(data: dict[str, Any], oneof_of: dict[str, str]) -> None:
    given = [oneof_of[name] for name in data if name in oneof_of]
    if len(set(given)) < len(given):
        raise _Unsure("two members of one oneof")


@functools.cache
def _walk_of(descriptor: Descriptor, when_unset: WhenUnset) -> _Walk:
    accepted = proto_dicts.fields_of(descriptor)
    plan = rest_print.plan_of(descriptor)
    fills = {field: value for message, field, value in when_unset if message == descriptor.full_name}
    members = tuple(
        _member(field, accepted.by_name[field.name], fills.get(field.name, _LEFT_OUT), when_unset)
        for field in sorted(descriptor.fields, key=lambda field: field.number)
    )
    names = frozenset(member.name for member in members)
    # A field without presence is unset at its default: a fill replaces the default.
    defaults = {**plan.defaults, **{name: value for name, value in fills.items() if name in plan.defaults}}
    return _Walk(members, names, accepted.aliases, accepted.oneof_of, defaults, plan.trims)


def _member(field: FieldDescriptor, accepted: proto_dicts.Field | None, fill: object, when_unset: WhenUnset) -> _Member:
    presence = field.has_presence
    default = None if presence else [] if field.is_repeated else field.default_value
    if accepted is None:
        check: Check = _refuse
        when_null: object = _REFUSE
    else:
        check = _field_check(field, accepted, when_unset)
        when_null = None if accepted.value else fill
    if not presence:  # unset is its default, which `_Walk.defaults` prints (a fill included)
        fill = _LEFT_OUT
        when_null = _REFUSE if accepted is None else _LEFT_OUT
    return _Member(field.name, check, presence, default, fill, when_null)


def _field_check(field: FieldDescriptor, accepted: proto_dicts.Field, when_unset: WhenUnset) -> Check:
    if accepted.value:
        return _refuse  # a Value other than null
    one = _one_check(field, accepted, when_unset)
    return functools.partial(_each, one) if accepted.repeated else one


def _one_check(field: FieldDescriptor, accepted: proto_dicts.Field, when_unset: WhenUnset) -> Check:
    if accepted.message is not None:
        return functools.partial(_message, accepted.message, when_unset)
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return _string
    if kind == FieldDescriptor.TYPE_BOOL:
        return _bool
    if kind == FieldDescriptor.TYPE_DOUBLE:
        return functools.partial(_double, rest_print.value_printer(field))
    low, high = _INT_RANGES[kind]
    return functools.partial(_integer, low, high, rest_print.value_printer(field))


def _refuse(value: Any) -> Any:
    raise _Unsure("a field only the round trip handles")


def _each(one: Check, values: Any) -> list[Any]:
    if type(values) is not list:
        raise _Unsure("not a list")
    return [one(value) for value in values]


def _message(descriptor: Descriptor, when_unset: WhenUnset, value: Any) -> dict[str, Any]:
    return _printed(value, _walk_of(descriptor, when_unset))


def _string(value: Any) -> str | None:
    if type(value) is not str:
        raise _Unsure("not a string")
    if not value.isascii():
        value.encode()  # a lone surrogate: UnicodeEncodeError, as the message raises it
    return None if value == JSON_NULL else value


def _bool(value: Any) -> bool:
    if type(value) is not bool:
        raise _Unsure("not a bool")
    return value


def _double(printer: Check, value: Any) -> Any:
    if type(value) is not float and type(value) is not int:
        raise _Unsure("not a number")
    return printer(float(value))  # as the message stores it (OverflowError: unsure)


def _integer(low: int, high: int, printer: Check, value: Any) -> Any:
    if type(value) is not int:
        raise _Unsure("not an integer")
    if not low <= value <= high:
        raise _Unsure("out of the field's range")
    return printer(value)
