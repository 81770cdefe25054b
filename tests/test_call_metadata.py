"""The call's metadata is read from grpc once per call (server.api.call_metadata) and
answers what the scans of the whole metadata answered."""

from __future__ import annotations

from typing import Any

from server.api.call_metadata import CallMetadata, call_metadata


class _Context:
    """Stands in for grpc.aio's servicer context: counts the reads of its metadata."""

    def __init__(self, metadata: tuple[tuple[str, Any], ...]) -> None:
        self._metadata = metadata
        self.reads = 0

    def invocation_metadata(self) -> tuple[tuple[str, Any], ...]:
        self.reads += 1
        return self._metadata


REST = (
    ("authorization", "Bearer k"),
    ("x-request-id", "r1"),
    ("x-aigne-bridge", "rest"),
    ("x-aigne-rest", "1"),
    ("x-aigne-hub-fallbacks", "a/b"),
    ("x-aigne-fields", "model,messages"),
    ("user-agent", "u"),
    ("x-request-id", "r2"),
)


async def test_read_once_per_call() -> None:
    first, second = _Context(REST), _Context((("x-aigne-bridge", "sse"),))
    for _ in range(5):
        assert call_metadata(first).from_rest
    assert first.reads == 1
    assert call_metadata(second).from_bridge and second.reads == 1  # another call: read afresh
    assert not call_metadata(second).wants_json_nulls


def test_keeps_the_marked_entries_in_order() -> None:
    parsed = CallMetadata.parse(REST)
    assert [key for key, _ in parsed.marked] == [
        "x-request-id",
        "x-aigne-bridge",
        "x-aigne-rest",
        "x-aigne-hub-fallbacks",
        "x-aigne-fields",
        "x-request-id",
    ]
    assert parsed.values("x-request-id") == ["r1", "r2"]
    assert parsed.first("x-aigne-fields") == "model,messages"
    assert parsed.first("x-aigne-hub-timeout-s") is None
    assert parsed.from_rest and not parsed.from_bridge and parsed.wants_json_nulls


def test_no_metadata() -> None:
    parsed = CallMetadata.parse(None)
    assert not (parsed.from_rest or parsed.from_bridge or parsed.wants_json_nulls)
    assert CallMetadata.parse((("x-aigne-bridge", "other"),)).from_rest is False
