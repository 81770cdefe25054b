"""The upstream JSON reader (server.providers.transport.json_loads) gives exactly what
`json.loads` gives, value and type, or raises as it does: orjson reads what it reads
the same way, and the rest goes to the standard library. The request body writer
(`json_body`) writes what `json.dumps` writes (as JSON: floats' style may differ) or
raises as it does.

Documents generated from a fixed seed: nested objects and arrays, strings with every
kind of escape and non-ASCII text, integers up to and past 64 bits, floats of every
magnitude, and what the standard library accepts beyond JSON (NaN, Infinity, numbers
past a double's range, escaped lone surrogates), as text and as bytes.
"""

from __future__ import annotations

import json
import random
import struct
from typing import Any

import pytest

from server import errors
from server.providers.transport import json_body, json_loads, parse_object

SPECIAL = ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", '"\\ud800"', '"\\udc00x"', "18446744073709551616"]


def _value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth < 4 and roll < 0.15:
        return {_string(rng): _value(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    if depth < 4 and roll < 0.3:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    if roll < 0.45:
        return _string(rng)
    if roll < 0.6:
        return rng.choice([0, -1, 2**31, 2**53 + 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**64, -(2**63) - 1, 10**30])
    if roll < 0.75:
        return rng.randint(-(10 ** rng.randint(1, 25)), 10 ** rng.randint(1, 25))
    if roll < 0.9:
        number = struct.unpack("<d", rng.randbytes(8))[0]
        return number if number == number and abs(number) != float("inf") else 0.5
    return rng.choice([True, False, None, -0.0, 1e-320, 5e-324, 1.7976931348623157e308])


def _string(rng: random.Random) -> str:
    alphabet = 'ab "\\/\b\f\n\r\t\x00\x1f\x7fé世🌍\u2028'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))


def _documents(count: int) -> list[str]:
    rng = random.Random(20261201)
    documents = []
    for _ in range(count):
        text = json.dumps(_value(rng, 0), ensure_ascii=rng.random() < 0.5)
        if rng.random() < 0.2:
            text = f'{{"x": {text}, "y": {rng.choice(SPECIAL)}}}'
        documents.append(text)
    return documents


def _outcome(read: Any, content: str | bytes) -> tuple[str, str]:
    try:
        value = read(content)
    except ValueError as exc:
        return "error", type(exc).__name__
    return "value", _typed(value)


def _typed(value: Any) -> str:
    """repr with each value's type, so that 1 and 1.0 (or True and 1) differ."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{key!r}:{_typed(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list):
        return "[" + ",".join(_typed(item) for item in value) + "]"
    return f"{type(value).__name__}:{value!r}"


@pytest.mark.parametrize("as_bytes", [False, True])
def test_reads_what_json_loads_reads(as_bytes: bool) -> None:
    for text in _documents(4000):
        content: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
        assert _outcome(json_loads, content) == _outcome(json.loads, content), text


@pytest.mark.parametrize("content", ["", "[1,", "{'a': 1}", '"\x01"', "\ufeff{}", b"\xff{}", b'{"a": "\xc3"}', "1 2"])
def test_refuses_what_json_loads_refuses(content: str | bytes) -> None:
    expected = _outcome(json.loads, content)
    assert expected[0] == "error"
    assert _outcome(json_loads, content) == expected


def test_nesting_too_deep_is_a_malformed_answer() -> None:
    """json.loads raises RecursionError (not a ValueError) past about 1,000 levels:
    an upstream's answer that deep was an internal error for the client."""
    with pytest.raises(errors.UpstreamMalformedResponse, match="invalid JSON"):
        parse_object("p", "[" * 100_000 + "]" * 100_000)


def _dumps(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def test_writes_what_json_dumps_writes() -> None:
    rng = random.Random(1201)
    for _ in range(4000):
        value = {"model": "m", "messages": [_value(rng, 1) for _ in range(rng.randint(0, 3))]}
        try:
            expected = _dumps(value)
        except ValueError:
            with pytest.raises(ValueError):
                json_body(value)
            continue
        written = json_body(value)
        assert _typed(json.loads(written)) == _typed(json.loads(expected)), value
        if b"." not in expected and b"e" not in expected.lower():  # no float: the very same text
            assert written == expected


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"temperature": float("nan")}, ValueError),
        ({"x": [1, float("inf")]}, ValueError),
        ({"content": "\ud800"}, UnicodeEncodeError),
    ],
)
def test_refuses_what_json_dumps_refuses(value: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        json_body(value)


def test_what_json_dumps_writes_its_own_way_is_written_by_it() -> None:
    for value in ({1: "a", 2.5: "b"}, {"n": 2**70}, {"n": None}, {"s": "null pointer"}):
        assert json_body(value) == _dumps(value)
