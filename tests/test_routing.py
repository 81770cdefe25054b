"""Routing through the real server and Envoy: retries, fallbacks, cooldowns, balancing
and deadlines, against scripted fake upstreams (two OpenAI fakes, `a` and `b`)."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import openai
import pytest
import pytest_asyncio
import yaml

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, Settings
from tests.conftest import Bridge, free_port, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import chat_request, error_info, retry_info

REDIS_URL = "redis://127.0.0.1:6379/0"
AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"


def _config(a: FakeOpenAI, b: FakeOpenAI) -> dict[str, object]:
    return {
        "providers": {
            "a": {"type": "openai", "base_url": a.base_url, "api_key": "sk-a"},
            "b": {"type": "openai", "base_url": b.base_url, "api_key": "sk-b"},
        },
        "models": {
            "balanced": {
                "deployments": [
                    {"provider": "a", "model": "gpt-4o", "weight": 3},
                    {"provider": "b", "model": "gpt-4o", "weight": 1},
                ]
            },
            "a/primary": {"fallbacks": ["b/backup"]},
            "a/strict": {"fallbacks": ["b/backup"]},
            "a/stream-primary": {"fallbacks": ["b/backup"]},
            "a/guarded": {"fallbacks": ["b/forbidden-fallback", "b/allowed-fallback"]},
            "a/long-prompt": {"context_window_fallbacks": ["b/long-context"]},
        },
        "routing": {
            "max_attempts": 3,
            "backoff_base_s": 0.05,
            "max_backoff_s": 0.2,
            "cooldown": {"failures": 3, "window_s": 60, "rest_s": 1.5, "max_rest_s": 10},
        },
    }


@pytest_asyncio.fixture(scope="module")
async def fakes() -> AsyncIterator[tuple[FakeOpenAI, FakeOpenAI]]:
    a, b = FakeOpenAI(api_key="sk-a", slow_seconds=30), FakeOpenAI(api_key="sk-b")
    await a.start()
    await b.start()
    yield a, b
    await a.stop()
    await b.stop()


@pytest.fixture(autouse=True)
def _fresh_fakes(fakes: tuple[FakeOpenAI, FakeOpenAI]) -> None:
    for fake in fakes:
        fake.reset()


@pytest_asyncio.fixture(scope="module")
async def routed(
    fakes: tuple[FakeOpenAI, FakeOpenAI], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Gateway]:
    settings = Settings(grpc_port=0, data_dir=tmp_path_factory.mktemp("routing-data"), upstream_read_timeout_s=20)
    gateway = await start_gateway(settings, GatewayConfig.model_validate(_config(*fakes)))
    yield gateway
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def routed_bridge(routed: Gateway, tmp_path_factory: pytest.TempPathFactory) -> Bridge:
    return await start_bridge(routed.port, tmp_path_factory.mktemp("routing-envoy"))


async def _key(gateway: Gateway, allowed: list[str] | None = None) -> tuple[str, str]:
    owner = await ensure_owner(gateway.accounts.db, "user", f"router-{uuid.uuid4().hex[:8]}")
    record, secret = await gateway.accounts.keys.create_key(owner.id, "routing", allowed_models=allowed)
    return record.id, secret


def _stub(gateway: Gateway) -> tuple[grpc.aio.Channel, chat_grpc.ChatServiceStub]:
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}")
    return channel, chat_grpc.ChatServiceStub(channel)


async def _chat(gateway: Gateway, secret: str, model: str, extra: tuple[tuple[str, str], ...] = ()):  # type: ignore[no-untyped-def]
    channel, stub = _stub(gateway)
    async with channel:
        call = stub.CreateChatCompletion(
            chat_request(model=model), metadata=(("authorization", f"Bearer {secret}"), *extra)
        )
        reply = await call
        return reply, dict(await call.initial_metadata())


async def test_a_429_is_retried_after_its_hint_with_one_ledger_record(routed: Gateway, fakes) -> None:
    a, _ = fakes
    key_id, secret = await _key(routed)
    a.script("gpt-4o-mini", 429, headers={"retry-after": "1"})
    started = time.monotonic()
    reply, headers = await _chat(routed, secret, "a/gpt-4o-mini")
    took = time.monotonic() - started
    assert reply.choices[0].message.content.startswith("echo:")
    assert took >= 1.0, "the retry waited for the provider's Retry-After"
    assert [r.model for r in a.requests] == ["gpt-4o-mini", "gpt-4o-mini"]
    assert headers["x-aigne-hub-served-by"] == "a/gpt-4o-mini" and headers["x-aigne-hub-attempts"] == "2"
    records = await routed.accounts.ledger.records(key_id=key_id)
    assert [(r.outcome, r.model, r.attempts) for r in records] == [("ok", "a/gpt-4o-mini", 2)]


async def test_a_model_that_keeps_failing_falls_back(routed: Gateway, fakes) -> None:
    a, b = fakes
    key_id, secret = await _key(routed)
    a.script("primary", 503, 503, 503)
    reply, headers = await _chat(routed, secret, "a/primary")
    assert reply.model == "b/backup"
    assert headers["x-aigne-hub-served-by"] == "b/backup" and headers["x-aigne-hub-attempts"] == "4"
    assert len(a.requests) == 3 and [r.model for r in b.requests] == ["backup"]
    records = await routed.accounts.ledger.records(key_id=key_id)
    assert [(r.outcome, r.model, r.attempts) for r in records] == [("ok", "b/backup", 4)]


async def test_a_unary_answers_headers_go_ahead_of_it_unless_the_bridge_takes_them_from_its_trailers(
    routed: Gateway, routed_bridge: Bridge, fakes
) -> None:
    _, secret = await _key(routed)
    auth = ("authorization", f"Bearer {secret}")
    channel, stub = _stub(routed)
    async with channel:
        for marker, ahead in (((), True), ((("x-aigne-answer-headers", "trailers"),), False)):
            call = stub.CreateChatCompletion(chat_request(model="b/backup"), metadata=(auth, *marker))
            await call
            initial, trailing = dict(await call.initial_metadata()), dict(await call.trailing_metadata())
            assert trailing["x-aigne-hub-served-by"] == "b/backup" and trailing["x-aigne-hub-attempts"] == "1"
            assert ("x-aigne-hub-served-by" in initial) is ahead, marker
    # The bridge marks its unary calls so, and copies the trailers into the HTTP headers;
    # a client's own marker is not what the server sees.
    body = {"model": "b/backup", "messages": [{"role": "user", "content": "hello there"}]}
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        for path in ("/v1/chat/completions", "/chat/completions"):
            response = await client.post(
                f"{routed_bridge.rest_url}{path}",
                json=body,
                headers={auth[0]: auth[1], "x-aigne-answer-headers": "nonsense"},
            )
            assert response.status_code == 200, response.text
            assert response.headers["x-aigne-hub-served-by"] == "b/backup"
            assert response.headers["x-aigne-hub-attempts"] == "1"
            assert response.json()["model"] == "b/backup"


async def test_a_bad_request_is_not_retried(routed: Gateway, fakes) -> None:
    a, b = fakes
    key_id, secret = await _key(routed)
    a.script("strict", 400)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _chat(routed, secret, "a/strict")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert error_info(caught.value).reason == "UPSTREAM_BAD_REQUEST"
    assert len(a.requests) == 1 and not b.requests, "no retry and no fallback on 400"
    records = await routed.accounts.ledger.records(key_id=key_id)
    assert [(r.outcome, r.error_reason, r.attempts) for r in records] == [("error", "UPSTREAM_BAD_REQUEST", 1)]


async def test_a_prompt_too_long_goes_to_the_context_window_fallback(routed: Gateway, fakes) -> None:
    a, b = fakes
    _, secret = await _key(routed)
    a.script("long-prompt", 400, message="This model's maximum context length is 16 tokens.")
    reply, headers = await _chat(routed, secret, "a/long-prompt")
    assert reply.model == "b/long-context" and headers["x-aigne-hub-attempts"] == "2"
    assert [r.model for r in b.requests] == ["long-context"]


async def _sse(
    bridge: Bridge, secret: str, model: str, headers: dict[str, str] | None = None
) -> tuple[int, list[str], httpx.Headers]:
    body = {"model": model, "messages": [{"role": "user", "content": "hello there"}], "stream": True}
    async with (
        httpx.AsyncClient(timeout=30, trust_env=False) as client,
        client.stream(
            "POST",
            f"{bridge.rest_url}/v1/chat/completions",
            json=body,
            headers={"authorization": f"Bearer {secret}", **(headers or {})},
        ) as response,
    ):
        lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
        return response.status_code, lines, response.headers


async def test_a_stream_failing_before_its_first_chunk_falls_back(
    routed: Gateway, routed_bridge: Bridge, fakes
) -> None:
    a, b = fakes
    key_id, secret = await _key(routed)
    a.script("stream-primary", 503, 503, 503)
    status, lines, headers = await _sse(routed_bridge, secret, "a/stream-primary")
    assert status == 200 and lines[-1] == "data: [DONE]"
    assert any('"b/backup"' in line for line in lines)
    assert headers["x-aigne-hub-served-by"] == "b/backup"
    assert [r.model for r in b.requests] == ["backup"]
    records = await routed.accounts.ledger.records(key_id=key_id)
    assert [(r.outcome, r.model, r.attempts) for r in records] == [("ok", "b/backup", 4)]


async def test_a_stream_cut_after_its_first_chunk_is_not_retried(routed: Gateway, routed_bridge: Bridge, fakes) -> None:
    a, b = fakes
    _, secret = await _key(routed)
    status, lines, _ = await _sse(routed_bridge, secret, "a/stream-cut")
    assert status == 200
    assert '"error"' in lines[-1] and "[DONE]" not in lines[-1], "the cut ends with an error event, not a clean end"
    assert len(a.requests) == 1 and not b.requests


async def test_a_resting_deployment_gets_no_calls_until_its_cooldown_ends(routed: Gateway, fakes) -> None:
    a, _ = fakes
    _, secret = await _key(routed)
    model = f"resting-{uuid.uuid4().hex[:6]}"
    a.script(model, 500, 500, 500)
    with pytest.raises(grpc.aio.AioRpcError):
        await _chat(routed, secret, f"a/{model}")
    assert len(a.requests) == 3  # three failures trip it (rest 1.5 s)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{routed.port}") as channel:
        status = await status_grpc.StatusServiceStub(channel).GetStatus(status_pb.GetStatusRequest(model=f"a/{model}"))
    assert not status.available and status.code == "UPSTREAM_UNAVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _chat(routed, secret, f"a/{model}")
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
    hint = retry_info(caught.value)
    assert hint is not None and 0 < hint.retry_delay.ToTimedelta().total_seconds() <= 1.5
    assert len(a.requests) == 3, "the resting deployment received nothing"
    await asyncio.sleep(1.6)
    reply, _ = await _chat(routed, secret, f"a/{model}")  # the trial call after the rest
    assert reply.choices and len(a.requests) == 4


async def test_fallbacks_stay_inside_the_keys_allow_list(routed: Gateway, fakes) -> None:
    a, b = fakes
    _, secret = await _key(routed, allowed=["a/*", "b/allowed-*"])
    a.script("guarded", 503, 503, 503)
    reply, _ = await _chat(routed, secret, "a/guarded")
    assert reply.model == "b/allowed-fallback"
    assert [r.model for r in b.requests] == ["allowed-fallback"], "the forbidden fallback was never tried"
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _chat(routed, secret, "a/gpt-4o-mini", (("x-aigne-hub-fallbacks", "b/gpt-4o"),))
    assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert error_info(caught.value).reason == "MODEL_NOT_ALLOWED"


async def test_a_callers_own_fallbacks_are_used(routed: Gateway, fakes) -> None:
    a, _ = fakes
    _, secret = await _key(routed)
    a.script("own", 503, 503, 503)
    reply, headers = await _chat(routed, secret, "a/own", (("x-aigne-hub-fallbacks", "b/theirs"),))
    assert reply.model == "b/theirs" and headers["x-aigne-hub-served-by"] == "b/theirs"


async def test_a_grpc_deadline_cancels_the_upstream_call(routed: Gateway, fakes) -> None:
    a, _ = fakes
    _, secret = await _key(routed)
    channel, stub = _stub(routed)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.CreateChatCompletion(
                chat_request(model="a/slow"), metadata=(("authorization", f"Bearer {secret}"),), timeout=1.0
            )
    assert caught.value.code() in (grpc.StatusCode.DEADLINE_EXCEEDED,)
    await a.wait_until(lambda: a.cancelled_requests >= 1, seconds=5)


async def test_a_caller_timeout_header_bounds_the_call(routed: Gateway, routed_bridge: Bridge) -> None:
    _, secret = await _key(routed)
    started = time.monotonic()
    async with httpx.AsyncClient(timeout=30, trust_env=False) as client:
        reply = await client.post(
            f"{routed_bridge.rest_url}/v1/chat/completions",
            json={"model": "a/slow", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {secret}", "x-aigne-hub-timeout-s": "1"},
        )
        bad = await client.post(
            f"{routed_bridge.rest_url}/v1/chat/completions",
            json={"model": "a/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {secret}", "x-aigne-hub-timeout-s": "soon"},
        )
    assert reply.status_code == 504 and reply.json()["error"]["code"] == "UPSTREAM_TIMEOUT"
    assert time.monotonic() - started < 10
    assert bad.status_code == 400 and "x-aigne-hub-timeout-s" in bad.json()["error"]["message"]


async def test_weighted_balancing_follows_the_weights(routed: Gateway, fakes) -> None:
    a, b = fakes
    _, secret = await _key(routed)
    channel, stub = _stub(routed)
    metadata = (("authorization", f"Bearer {secret}"),)
    served: Counter[str] = Counter()
    async with channel:
        for _ in range(10):
            replies = await asyncio.gather(
                *(stub.CreateChatCompletion(chat_request(model="balanced"), metadata=metadata) for _ in range(100))
            )
            served.update(reply.model for reply in replies)
    assert sum(served.values()) == 1000
    share = served["a/gpt-4o"] / 1000
    assert abs(share - 0.75) <= 0.075, served  # within 10 % of the 3:1 weights
    assert len(a.requests) + len(b.requests) == 1000


async def test_the_openai_sdk_sees_a_normal_answer_after_a_retry(routed: Gateway, routed_bridge: Bridge, fakes) -> None:
    a, _ = fakes
    _, secret = await _key(routed)
    a.script("gpt-4o-mini", 502)
    client = openai.AsyncOpenAI(base_url=f"{routed_bridge.rest_url}/v1", api_key=secret, max_retries=0)
    raw = await client.chat.completions.with_raw_response.create(
        model="a/gpt-4o-mini", messages=[{"role": "user", "content": "hi"}]
    )
    completion = raw.parse()
    assert completion.choices[0].message.content and completion.model == "a/gpt-4o-mini"
    assert raw.headers["x-aigne-hub-attempts"] == "2" and raw.headers["x-aigne-hub-served-by"] == "a/gpt-4o-mini"
    await client.close()


async def _wait_for_grpc(port: int, process: asyncio.subprocess.Process) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert process.returncode is None, "the second gateway exited"
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await status_grpc.StatusServiceStub(channel).GetStatus(status_pb.GetStatusRequest(), timeout=1)
                return
        except grpc.aio.AioRpcError:
            await asyncio.sleep(0.2)
    raise TimeoutError("the second gateway did not start")


async def test_cooldowns_are_shared_by_two_gateway_processes_through_redis(fakes, tmp_path: Path) -> None:
    a, b = fakes
    config = _config(a, b)
    config["routing"] = {"max_attempts": 1, "cooldown": {"failures": 2, "rest_s": 20, "max_rest_s": 20}}
    config_path = tmp_path / "hub.yaml"
    config_path.write_text(yaml.safe_dump(config))
    data = tmp_path / "data"
    settings = Settings(grpc_port=0, data_dir=data, redis_url=REDIS_URL, auth_required=False)
    first = await start_gateway(settings, GatewayConfig.model_validate(config))
    port = free_port()
    env = {
        **os.environ,
        "AIGNE_HUB_REDIS_URL": REDIS_URL,
        "AIGNE_HUB_DATA_DIR": str(data),
        "AIGNE_HUB_AUTH_REQUIRED": "false",
    }
    env.pop("AIGNE_HUB_DATABASE_URL", None)
    second = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB),
        "grpc",
        f"--config={config_path}",
        f"--grpc-port={port}",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    model = f"shared-{uuid.uuid4().hex[:8]}"
    try:
        await _wait_for_grpc(port, second)
        a.script(model, 500, 500)
        for _ in range(2):  # two failures on the first process trip the deployment
            with pytest.raises(grpc.aio.AioRpcError):
                await _chat(first, "unused", f"a/{model}")
        assert len(a.requests) == 2
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(chat_request(model=f"a/{model}"))
        assert error_info(caught.value).reason == "UPSTREAM_UNAVAILABLE"
        assert "resting" in caught.value.details()
        assert len(a.requests) == 2, "the other process knew the deployment rests"
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 30)
        await first.stop(0.5)
