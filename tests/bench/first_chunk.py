"""How long a streamed completion takes to its first event, at one connection.

wrk measures each answer to its last byte; the issue also asks that a stream's first
chunk come at most 1 ms later through the gateway than from the fake itself. This
sends the SSE request one at a time on one keep-alive connection (httpx, HTTP/1.1),
notes when the first body bytes holding `data: ` arrive, and reads the rest of the
stream before the next request. The same client measures the fake directly, so the
difference between the two is what the gateway adds (the client's own time is in
both).

The upstream is `PacedFake`, not the Envoy fake: that one sends a whole stream at
once, and a gateway that reads a stream as fast as it arrives then sends its first
event with the others (it batches what is ready together), so its "first event"
would be its last. `PacedFake` sends the first event at once and the rest
`PAUSE_S` later, as a model does.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import httpx

from tests.bench.fake_upstream import stream_body
from tests.bench.measure import DONE, chat_body

PAUSE_S = 0.02  # between the first event and the rest


@dataclass(frozen=True)
class FirstChunk:
    label: str
    p50_ms: float
    p99_ms: float
    streams: int


async def first_chunk(label: str, url: str, model: str, api_key: str = "", requests: int = 200) -> FirstChunk:
    """Median and p99 time to the first event of `requests` streams, one at a time
    (after 20 not counted, which open the connections and warm the caches)."""
    headers = {"content-type": "application/json"}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    body = chat_body(model, stream=True)
    samples: list[float] = []
    async with httpx.AsyncClient(timeout=30) as client:
        for index in range(requests + 20):
            started = time.perf_counter()
            first: float | None = None
            seen = b""
            async with client.stream("POST", url, content=body, headers=headers) as response:
                response.raise_for_status()
                async for chunk in response.aiter_raw():
                    if first is None and b"data: " in chunk:
                        first = time.perf_counter()
                    seen = (seen + chunk)[-64:]
            if first is None or DONE.encode() not in seen:
                raise RuntimeError(f"{label}: a stream without events or without [DONE]")
            if index >= 20:
                samples.append((first - started) * 1e3)
    samples.sort()
    return FirstChunk(label, statistics.median(samples), samples[max(int(len(samples) * 0.99) - 1, 0)], len(samples))


def report(found: list[FirstChunk]) -> str:
    """Lines for the bench's output; each gateway's against the fake's."""
    if not found:
        return ""
    fake = next((item for item in found if item.label == "fake"), None)
    lines = [f"First SSE event at one connection (httpx, one stream at a time, {found[0].streams} streams each):"]
    for item in found:
        added = f"  (+{item.p50_ms - fake.p50_ms:.2f} ms p50 over the fake)" if fake and item is not fake else ""
        lines.append(f"  {item.label:<8} p50 {item.p50_ms:6.2f} ms  p99 {item.p99_ms:6.2f} ms{added}")
    return "\n".join(lines)


class PacedFake:
    """A loopback HTTP/1.1 server answering every request with `stream_body()`'s
    events: the first at once, the rest `PAUSE_S` later (chunked, keep-alive)."""

    def __init__(self) -> None:
        self._server: asyncio.Server | None = None
        self.url = ""

    async def __aenter__(self) -> PacedFake:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        events = stream_body().encode()
        first_end = events.index(b"\n\n") + 2
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    + _chunked(events[:first_end])
                )
                await writer.drain()
                await asyncio.sleep(PAUSE_S)
                writer.write(_chunked(events[first_end:]) + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def _chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"
