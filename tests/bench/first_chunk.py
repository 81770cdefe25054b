"""How long a streamed completion takes to its first event, at one connection.

wrk measures each answer to its last byte; the issue also asks that a stream's first
chunk come at most 1 ms later through the gateway than from the fake itself. This
sends the SSE request one at a time on one keep-alive connection (httpx, HTTP/1.1),
notes when the first body bytes holding `data: ` arrive, and reads the rest of the
stream before the next request. The same client measures the fake directly, so the
difference between the two is what the gateway adds (the client's own time is in
both).
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import httpx

from tests.bench.measure import DONE, chat_body


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
