"""The bridge's edge: bad input gets a quick JSON 4xx, never a 500, a hang or a crash."""

from __future__ import annotations

import asyncio
import itertools

import httpx
import pytest


@pytest.fixture
async def http(bridge, auth_headers):
    async with httpx.AsyncClient(base_url=bridge.rest_url, timeout=10, headers=auth_headers) as client:
        yield client


def assert_json_error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json"), response.headers
    body = response.json()
    assert body["error"]["message"], body
    return body


async def test_malformed_json_is_400(http):
    response = await http.post(
        "/chat/completions",
        content=b'{"model": "openai/x", "messages": [',
        headers={"content-type": "application/json"},
    )
    assert_json_error(response, 400)


async def test_wrong_field_type_is_400(http):
    response = await http.post("/v1/chat/completions", json={"model": "openai/gpt-4o", "messages": "hi"})
    assert_json_error(response, 400)
    response = await http.post(
        "/v1/chat/completions",
        json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x"}], "temperature": "hot"},
    )
    assert_json_error(response, 400)


async def test_empty_messages_is_400_with_reason(http):
    response = await http.post("/chat/completions", json={"model": "openai/gpt-4o", "messages": []})
    body = assert_json_error(response, 400)
    assert body["error"]["code"] == "INVALID_REQUEST"
    assert "messages" in body["error"]["message"]
    assert body["error"]["type"] == "invalid_request_error"


async def test_unknown_model_is_404(http):
    response = await http.post(
        "/chat/completions", json={"model": "nosuch/m", "messages": [{"role": "user", "content": "x"}]}
    )
    body = assert_json_error(response, 404)
    assert body["error"]["code"] == "MODEL_NOT_FOUND"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/nope"),
        ("GET", "/chat/completions"),
        ("POST", "/v2/chat/completions"),
        ("GET", "/stats"),
        ("GET", "/ready"),
        ("GET", "/server_info"),
        ("POST", "/internal/chat/completions:stream"),
    ],
)
async def test_unknown_paths_and_admin_are_404(http, method, path):
    response = await http.request(method, path, json={} if method == "POST" else None)
    assert_json_error(response, 404)


async def test_unknown_method_is_4xx(http):
    response = await http.request("BREW", "/chat/completions")
    assert 400 <= response.status_code < 500


async def test_oversized_body_is_413(http):
    big = "x" * (5 * 1024 * 1024)
    response = await http.post(
        "/chat/completions", json={"model": "openai/gpt-4o", "messages": [{"role": "user", "content": big}]}
    )
    assert_json_error(response, 413)


async def test_malformed_http_is_4xx_not_a_crash(bridge):
    host, port = bridge.rest_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GARBAGE / HTTP/9.9\r\n\r\n")
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 4"), answer


async def test_client_disconnect_cancels_upstream_stream(bridge, fake_openai, auth_headers):
    body = {
        "model": "openai/stream-slow",
        "messages": [{"role": "user", "content": "a b c d e f g h i j"}],
        "stream": True,
    }
    async with (
        httpx.AsyncClient(timeout=10, headers=auth_headers) as client,
        client.stream("POST", f"{bridge.rest_url}/chat/completions", json=body) as response,
    ):
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                break
    for _ in range(150):
        if fake_openai.cancelled_streams:
            break
        await asyncio.sleep(0.02)
    assert fake_openai.cancelled_streams >= 1


async def test_stream_events_arrive_incrementally(bridge, fake_openai, auth_headers):
    body = {"model": "openai/stream-slow", "messages": [{"role": "user", "content": "a b c d"}], "stream": True}
    loop = asyncio.get_running_loop()
    arrivals = []
    async with (
        httpx.AsyncClient(timeout=10, headers=auth_headers) as client,
        client.stream("POST", f"{bridge.rest_url}/chat/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                arrivals.append(loop.time())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    # The fake sleeps chunk_delay between chunks: if the bridge buffered, the events
    # would all arrive together at the end.
    assert max(gaps) >= fake_openai.chunk_delay * 0.5, gaps


@pytest.fixture(scope="module")
async def impatient_bridge(gateway, tmp_path_factory):
    """A bridge with 1 s edge timeouts, so stalls can be tested quickly."""
    from tests.conftest import start_bridge

    running = await start_bridge(
        gateway.port,
        tmp_path_factory.mktemp("impatient-envoy"),
        request_headers_timeout_s=1.0,
        request_receive_timeout_s=1.0,
    )
    yield running
    await running.envoy.stop()


async def _stall(bridge, partial_request: bytes) -> tuple[bytes, float]:
    host, port = bridge.rest_url.removeprefix("http://").split(":")
    loop = asyncio.get_running_loop()
    reader, writer = await asyncio.open_connection(host, int(port))
    started = loop.time()
    writer.write(partial_request)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(), 10)  # until Envoy closes the connection
    writer.close()
    return answer, loop.time() - started


async def test_client_stalling_in_headers_is_closed(impatient_bridge):
    answer, waited = await _stall(impatient_bridge, b"POST /chat/completions HTTP/1.1\r\nHost: x\r\n")
    assert waited < 5
    assert answer == b"" or answer.startswith(b"HTTP/1.1 408"), answer


async def test_client_stalling_in_body_gets_408(impatient_bridge):
    head = (
        b"POST /chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    answer, waited = await _stall(impatient_bridge, head + b'{"model": ')
    assert waited < 5
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"error"' in answer
