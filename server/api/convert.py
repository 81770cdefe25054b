"""Conversions between protos and the internal OpenAI-shaped dicts."""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from server import errors
from server.api.validation import non_finite_number_path
from server.providers.base import JSON

M = TypeVar("M", bound=Message)


def to_json(message: Message) -> JSON:
    """The message as OpenAI JSON: proto field names, unset fields left out.

    Whole numbers come back as ints: `google.protobuf.Struct` (tool parameter schemas)
    stores every number as a double, and `"minItems": 1.0` is not what the caller sent.
    """
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
    """Fills `message` from an upstream's OpenAI-shaped answer, ignoring extra fields."""
    try:
        return json_format.ParseDict(data, message, ignore_unknown_fields=True)
    except json_format.ParseError as exc:
        raise errors.UpstreamMalformedResponse(
            f"{provider} answered with a field of an unexpected type: {exc}", provider=provider
        ) from exc


def whole_numbers_to_int(value: Any) -> Any:
    if isinstance(value, float):
        return int(value) if value.is_integer() and abs(value) < 2**53 else value
    if isinstance(value, dict):
        return {key: whole_numbers_to_int(item) for key, item in value.items()}
    if isinstance(value, list):
        return [whole_numbers_to_int(item) for item in value]
    return value
