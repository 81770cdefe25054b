"""Rate limits through the real server (and Envoy for REST), with their counters in the
machine's real Redis, a private redis-server for the outage tests, and the fake OpenAI
upstream. Every test makes its own key, so its counters are its own."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import openai
import pytest
import pytest_asyncio

from aigne.hub.v1 import chat_service_pb2 as chat_pb
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from aigne.hub.v1 import status_service_pb2 as status_pb
from aigne.hub.v1 import status_service_pb2_grpc as status_grpc
from server.accounts.credits import Usage
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, Settings
from server.errors import RateLimited
from server.limits import LimitRule, open_limiter
from tests.conftest import Bridge, free_port, gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import chat_request, error_info, retry_info

REDIS_URL = "redis://127.0.0.1:6379/0"
AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"


def _settings(data: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "grpc_port": 0,
        "data_dir": data,
        "upstream_read_timeout_s": 20,
        "key_cache_ttl_s": 0,
        # Exactness tests must never pass through a fallback: fail closed, generous budget.
        "redis_url": REDIS_URL,
        "limits_on_redis_failure": "closed",
        "limits_redis_budget_ms": 5000,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest_asyncio.fixture(scope="module")
async def limited(fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    gateway = await start_gateway(_settings(tmp_path_factory.mktemp("limits")), gateway_config(fake_openai.base_url))
    yield gateway
    await gateway.stop(0.5)


async def _key(gateway: Gateway, **limits: int) -> tuple[str, str]:
    """A new key of a new owner, with these key limits (rpm=, tpm=, concurrency=)."""
    owner = await ensure_owner(gateway.accounts.db, "user", f"limits-{uuid.uuid4().hex[:8]}")
    record, secret = await gateway.accounts.keys.create_key(owner.id, "limits")
    if limits:
        await _store(gateway).set(LimitRule("key", record.id, **limits))  # type: ignore[arg-type]
    return record.id, secret


def _store(gateway: Gateway):  # type: ignore[no-untyped-def]
    assert gateway.accounts.limiter is not None
    return gateway.accounts.limiter.store


def _auth(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def _burst(port: int, secret: str, calls: int, model: str = "openai/gpt-4o-mini") -> list[object]:
    """`calls` chat calls at once; each result is the reply or the AioRpcError."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        return await asyncio.gather(
            *(stub.CreateChatCompletion(chat_request(model=model), metadata=_auth(secret)) for _ in range(calls)),
            return_exceptions=True,
        )


def _split(results: list[object]) -> tuple[int, list[grpc.aio.AioRpcError]]:
    answered = sum(isinstance(r, chat_pb.CreateChatCompletionResponse) for r in results)
    refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
    assert answered + len(refused) == len(results), [r for r in results if isinstance(r, Exception)][:3]
    return answered, refused


async def test_100_concurrent_calls_on_a_20_rpm_key_answer_exactly_20(
    limited: Gateway, fake_openai: FakeOpenAI
) -> None:
    key_id, secret = await _key(limited, rpm=20)
    answered, refused = _split(await _burst(limited.port, secret, 100))
    assert (answered, len(refused)) == (20, 80)
    assert len(fake_openai.requests) == 20, "a refused call never reaches the provider"
    error = refused[0]
    assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    info = error_info(error)
    assert info.reason == "RATE_LIMITED"
    assert dict(info.metadata) == {
        "scope": "key",
        "limit_kind": "requests",
        "limit": "20",
        "window_seconds": "60",
        "model": "*",
        "openai_type": "rate_limit_error",
    }
    hint = retry_info(error)
    assert hint is not None and 0 < hint.retry_delay.ToTimedelta().total_seconds() <= 3.0 + 1e-3
    trailers = dict(error.trailing_metadata() or ())
    assert trailers["retry-after"] == "3"  # one of 20 per minute frees every 3 s
    assert trailers["x-ratelimit-remaining-requests"] == "0"
    records = await limited.accounts.ledger.records(key_id=key_id)
    reasons = Counter(r.error_reason for r in records)
    assert reasons == {None: 20, "RATE_LIMITED": 80}, "each refusal is recorded once, with its reason"


async def test_the_remaining_requests_header_goes_down_call_by_call(limited: Gateway) -> None:
    _, secret = await _key(limited, rpm=5, tpm=100_000)
    remaining = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        for _ in range(3):
            call = stub.CreateChatCompletion(chat_request(), metadata=_auth(secret))
            await call
            headers = dict(await call.initial_metadata())
            remaining.append(int(headers["x-ratelimit-remaining-requests"]))
            assert headers["x-ratelimit-limit-requests"] == "5"
            assert headers["x-ratelimit-limit-tokens"] == "100000"
            assert headers["x-ratelimit-reset-requests"].endswith("s")
    assert remaining == [4, 3, 2]


async def test_an_owner_limit_holds_across_its_keys_and_a_model_glob_narrows_it(limited: Gateway) -> None:
    owner = await ensure_owner(limited.accounts.db, "project", f"team-{uuid.uuid4().hex[:8]}")
    secrets = [(await limited.accounts.keys.create_key(owner.id, f"k{i}"))[1] for i in range(2)]
    await _store(limited).set(LimitRule("owner", owner.id, "openai/gpt-4o-mini", rpm=6))
    answered, refused = _split([r for s in secrets for r in await _burst(limited.port, s, 5)])
    assert (answered, len(refused)) == (6, 4), "six in all for the owner's two keys"
    assert error_info(refused[0]).metadata["scope"] == "owner"
    other, _ = _split(await _burst(limited.port, secrets[0], 3, model="openai/gpt-4o"))
    assert other == 3, "a model outside the glob is not limited"


async def test_concurrent_calls_never_exceed_the_tpm_limit_by_more_than_the_reservations(
    limited: Gateway, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await _key(limited, tpm=1000)
    monkeypatch.setattr(fake_openai, "slow_seconds", 1.0)  # all the calls are in flight together
    request = chat_request(model="openai/slow", maxTokens=100)  # each reserves its prompt (~2 tokens) plus 100
    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        results = await asyncio.gather(
            *(stub.CreateChatCompletion(request, metadata=_auth(secret)) for _ in range(30)), return_exceptions=True
        )
        answered, refused = _split(results)
        assert 1 <= answered <= 1000 // 100, "the reservations alone stop the burst"
        assert error_info(refused[0]).metadata["limit_kind"] == "tokens"
        used = sum(r.usage.total_tokens for r in results if isinstance(r, chat_pb.CreateChatCompletionResponse))
        assert used <= 1000
        # Each call used far fewer tokens than it reserved: settling gave the rest back.
        again, _ = _split(
            await asyncio.gather(
                *(stub.CreateChatCompletion(request, metadata=_auth(secret)) for _ in range(5)),
                return_exceptions=True,
            )
        )
        assert again >= 1, "corrected reservations free the window for more calls"


async def test_a_concurrency_limit_of_2_holds_10_slow_streams_to_2_at_the_upstream(
    limited: Gateway, fake_openai: FakeOpenAI, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, secret = await _key(limited, concurrency=2)
    monkeypatch.setattr(fake_openai, "chunk_delay", 0.05)
    request = chat_request(model="openai/stream-slow", stream=True)

    async def stream(stub: chat_grpc.ChatServiceStub) -> int | grpc.aio.AioRpcError:
        try:
            return len([chunk async for chunk in stub.StreamChatCompletion(request, metadata=_auth(secret))])
        except grpc.aio.AioRpcError as error:
            return error

    async with grpc.aio.insecure_channel(f"127.0.0.1:{limited.port}") as channel:
        stub = chat_grpc.ChatServiceStub(channel)
        results = await asyncio.gather(*(stream(stub) for _ in range(10)))
        refused = [r for r in results if isinstance(r, grpc.aio.AioRpcError)]
        assert len(refused) == 8 and fake_openai.max_open_streams == 2
        assert error_info(refused[0]).metadata["limit_kind"] == "concurrency"
        assert dict(refused[0].trailing_metadata() or ())["retry-after"] == "1"
        # A stream the client abandons frees its slot too.
        fake_openai.chunk_delay = 0.5
        abandoned = stub.StreamChatCompletion(request, metadata=_auth(secret))
        await anext(abandoned.__aiter__())
        abandoned.cancel()
        fake_openai.chunk_delay = 0.01
        await fake_openai.wait_until(lambda: fake_openai.open_streams == 0, 10)
        after = await asyncio.gather(*(stream(stub) for _ in range(2)))
        assert all(isinstance(r, int) for r in after), after


async def test_a_calls_worst_case_is_worked_out_only_when_a_token_limit_applies(limited: Gateway) -> None:
    # Working it out walks the whole request (a long conversation: every message); with
    # billing off and no token limit nothing reads it, so no call may pay for it.
    worked_out: list[str] = []

    def worst() -> Usage:
        worked_out.append("worst case")
        return Usage(input_tokens=10, output_tokens=20)

    def prompt() -> int:
        worked_out.append("prompt")
        return 10

    for limits in ({}, {"rpm": 1000}, {"tpm": 100_000}):
        worked_out.clear()
        key_id, _ = await _key(limited, **limits)
        record = await limited.accounts.keys.get_key(key_id)
        assert record is not None
        async with limited.accounts.meter(record, "openai", "gpt-4o-mini", "chat", worst, prompt_tokens=prompt):
            pass
        if "tpm" in limits:
            assert "worst case" in worked_out or "prompt" in worked_out, "a token limit reserves the call's tokens"
        else:
            assert worked_out == [], f"worked out without a token limit ({limits}): {worked_out}"


async def test_limit_changes_apply_and_removal_lifts_them(limited: Gateway) -> None:
    key_id, secret = await _key(limited, rpm=1)
    answered, _ = _split(await _burst(limited.port, secret, 3))
    assert answered == 1
    await _store(limited).remove("key", key_id)
    answered, _ = _split(await _burst(limited.port, secret, 3))
    assert answered == 3


async def test_the_openai_sdk_raises_rate_limit_error_then_succeeds_with_its_retries(
    limited: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> None:
    bridge: Bridge = await start_bridge(limited.port, tmp_path_factory.mktemp("limits-envoy"))
    try:
        _, secret = await _key(limited, rpm=30)  # one call frees every 2 s
        answered, _ = _split(await _burst(limited.port, secret, 30))
        assert answered == 30
        client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0)
        messages = [{"role": "user", "content": "hi"}]
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(model="openai/gpt-4o-mini", messages=messages)  # type: ignore[arg-type]
        headers = caught.value.response.headers
        assert 1 <= int(headers["retry-after"]) <= 2
        assert headers["x-ratelimit-remaining-requests"] == "0"
        assert caught.value.body["code"] == "RATE_LIMITED"  # type: ignore[index]
        patient = client.with_options(max_retries=3)
        started = time.monotonic()
        reply = await patient.chat.completions.with_raw_response.create(
            model="openai/gpt-4o-mini",
            messages=messages,  # type: ignore[arg-type]
        )
        assert reply.parse().choices[0].message.content
        assert time.monotonic() - started >= 0.5, "it waited for the window"
        assert reply.headers["x-ratelimit-limit-requests"] == "30"
        await client.close()
    finally:
        await bridge.envoy.stop()


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


async def test_two_gateway_processes_sharing_redis_answer_exactly_20_in_all(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    config = gateway_config(fake_openai.base_url)
    config_path = tmp_path / "hub.yaml"
    config_path.write_text(config.model_dump_json())  # JSON is YAML
    data = tmp_path / "data"
    first = await start_gateway(_settings(data), config)
    port = free_port()
    env = {
        **os.environ,
        "AIGNE_HUB_REDIS_URL": REDIS_URL,
        "AIGNE_HUB_DATA_DIR": str(data),
        "AIGNE_HUB_LIMITS_ON_REDIS_FAILURE": "closed",
        "AIGNE_HUB_LIMITS_REDIS_BUDGET_MS": "5000",
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
    try:
        _, secret = await _key(first, rpm=20)
        await _wait_for_grpc(port, second)
        results = await asyncio.gather(_burst(first.port, secret, 50), _burst(port, secret, 50))
        answered = [_split(r)[0] for r in results]
        assert sum(answered) == 20, answered
        assert all(error_info(e).reason == "RATE_LIMITED" for r in results for e in _split(r)[1])
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.wait_for(second.wait(), 30)
        await first.stop(0.5)


class PrivateRedis:
    """A redis-server of this test's own, on a free port, that it may stop and start."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            cwd=self.folder,
            stdout=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while subprocess.run(["redis-cli", "-p", str(self.port), "ping"], capture_output=True).stdout != b"PONG\n":
            assert time.monotonic() < deadline, "the private redis-server did not start"
            time.sleep(0.05)

    def reset_stats(self) -> None:
        subprocess.run(["redis-cli", "-p", str(self.port), "config", "resetstat"], check=True, capture_output=True)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(10)
            self.process = None


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    redis = PrivateRedis(tmp_path)
    redis.start()
    yield redis
    redis.stop()


async def test_redis_stopped_mid_run_fail_open_serves_fail_closed_refuses_both_recover(
    fake_openai: FakeOpenAI, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    config = gateway_config(fake_openai.base_url)
    data = tmp_path / "data"
    common = {"redis_url": private_redis.url, "limits_redis_budget_ms": 2000}
    opened = await start_gateway(_settings(data, limits_on_redis_failure="open", **common), config)
    closed = await start_gateway(_settings(data, limits_on_redis_failure="closed", **common), config)
    try:
        _, secret = await _key(opened, rpm=1000)
        for gateway in (opened, closed):
            assert _split(await _burst(gateway.port, secret, 2))[0] == 2
        private_redis.stop()
        assert _split(await _burst(opened.port, secret, 3))[0] == 3, "fail open serves"
        assert opened.accounts.limiter is not None and opened.accounts.limiter.redis_failures >= 3
        _, refused = _split(await _burst(closed.port, secret, 2))
        assert len(refused) == 2 and refused[0].code() == grpc.StatusCode.UNAVAILABLE
        assert error_info(refused[0]).reason == "RATE_LIMITS_UNAVAILABLE"
        private_redis.start()
        for gateway in (opened, closed):
            assert _split(await _burst(gateway.port, secret, 2))[0] == 2, "both recover"
        assert closed.accounts.limiter is not None
        failures = closed.accounts.limiter.redis_failures
        assert _split(await _burst(closed.port, secret, 2))[0] == 2
        assert closed.accounts.limiter.redis_failures == failures, "back on Redis: no more faults"
    finally:
        await opened.stop(0.5)
        await closed.stop(0.5)


async def test_without_redis_one_process_enforces_the_limit_itself(fake_openai: FakeOpenAI, tmp_path: Path) -> None:
    gateway = await start_gateway(_settings(tmp_path, redis_url=None), gateway_config(fake_openai.base_url))
    try:
        _, secret = await _key(gateway, rpm=7)
        answered, refused = _split(await _burst(gateway.port, secret, 30))
        assert (answered, len(refused)) == (7, 23)
    finally:
        await gateway.stop(0.5)


async def test_configured_defaults_apply_to_every_key_without_its_own_rule(
    fake_openai: FakeOpenAI, tmp_path: Path
) -> None:
    config = gateway_config(fake_openai.base_url).model_copy(
        update={"limits": GatewayConfig.model_validate({"limits": {"default_key": {"rpm": 4}}}).limits}
    )
    gateway = await start_gateway(_settings(tmp_path), config)
    try:
        _, plain = await _key(gateway)
        assert _split(await _burst(gateway.port, plain, 10))[0] == 4
        _, own = await _key(gateway, rpm=6)
        assert _split(await _burst(gateway.port, own, 10))[0] == 6, "the key's own rule replaces the default"
    finally:
        await gateway.stop(0.5)


# What the scripts run inside Redis, and what a new pooled connection sends: INFO
# commandstats counts both, so a round trip is a command outside these.
SCRIPT_COMMANDS = {"time", "get", "set", "del", "pexpire", "zadd", "zrem", "zcard", "zremrangebyscore"}
CONNECTION_COMMANDS = {"hello", "client|setinfo", "ping", "select"}


def _round_trips(redis: PrivateRedis) -> dict[str, int]:
    """The commands clients sent since the stats were reset, by name."""
    counts = _commands(redis)
    return {name: n for name, n in counts.items() if name not in SCRIPT_COMMANDS | CONNECTION_COMMANDS}


def _commands(redis: PrivateRedis) -> dict[str, int]:
    """Commands Redis has run since its stats were reset, by name (INFO commandstats)."""
    info = subprocess.run(["redis-cli", "-p", str(redis.port), "info", "commandstats"], capture_output=True, text=True)
    counts = {}
    for line in info.stdout.splitlines():
        if line.startswith("cmdstat_"):
            name, _, stats = line.removeprefix("cmdstat_").partition(":")
            counts[name] = int(stats.split(",")[0].removeprefix("calls="))
    counts.pop("info", None)
    counts.pop("config|resetstat", None)
    return counts


async def test_one_redis_round_trip_admits_a_call_through_all_its_limits(
    fake_openai: FakeOpenAI, tmp_path: Path, private_redis: PrivateRedis
) -> None:
    gateway = await start_gateway(
        _settings(tmp_path, redis_url=private_redis.url), gateway_config(fake_openai.base_url)
    )
    try:
        key_id, secret = await _key(gateway, rpm=1000, tpm=1_000_000, concurrency=10)
        owner = next(k.owner_id for k in await gateway.accounts.keys.list_keys() if k.id == key_id)
        await _store(gateway).set(LimitRule("owner", owner, "openai/*", rpm=1000, tpm=1_000_000, concurrency=10))
        await _burst(gateway.port, secret, 1)  # loads the scripts
        private_redis.reset_stats()
        assert _split(await _burst(gateway.port, secret, 10))[0] == 10
        # Six counters per call: one script to admit, one to settle (tokens, slots).
        assert _round_trips(private_redis) == {"evalsha": 20}
        _, rpm_only = await _key(gateway, rpm=1000)
        private_redis.reset_stats()
        assert _split(await _burst(gateway.port, rpm_only, 10))[0] == 10
        assert _round_trips(private_redis) == {"evalsha": 10}, "requests alone need nothing settled"
    finally:
        await gateway.stop(0.5)


async def test_a_crashed_replicas_slots_expire_and_a_live_ones_are_renewed(limited: Gateway) -> None:
    key_id, _ = await _key(limited, concurrency=1)
    owner = next(k.owner_id for k in await limited.accounts.keys.list_keys() if k.id == key_id)
    store = _store(limited)
    crashed = open_limiter(store, REDIS_URL, on_redis_failure="closed", budget_s=5.0, lease_s=1.0)
    live = open_limiter(store, REDIS_URL, on_redis_failure="closed", budget_s=5.0, lease_s=1.0)
    try:
        held = await crashed.admit(key_id, owner, "openai/gpt-4o-mini", None, 10)
        assert held is not None
        crashed._held.clear()  # as if its process died: nobody renews or releases the slot
        with pytest.raises(RateLimited):
            await live.admit(key_id, owner, "openai/gpt-4o-mini", None, 10)
        await asyncio.sleep(1.2)  # past the lease: the slot is free again
        running = await live.admit(key_id, owner, "openai/gpt-4o-mini", None, 10)
        assert running is not None
        await asyncio.sleep(2.0)  # two leases: renewed every third of one, it still holds
        with pytest.raises(RateLimited):
            await crashed.admit(key_id, owner, "openai/gpt-4o-mini", None, 10)
        await running.finish(0)
        again = await crashed.admit(key_id, owner, "openai/gpt-4o-mini", None, 10)
        assert again is not None, "finishing frees the slot at once"
        await again.finish(0)
    finally:
        await crashed.aclose()
        await live.aclose()


def test_a_keys_own_rule_replaces_only_the_default_kinds_it_sets() -> None:
    from server.limits.limiter import DefaultLimits, with_defaults

    key_defaults = DefaultLimits(rpm=600, daily_credits_micros=5_000_000)
    owner_defaults = DefaultLimits(tpm=1000)
    own = [LimitRule("key", "k1", "*", rpm=60), LimitRule("key", "k1", "openai/*", tpm=10)]
    added = with_defaults(own, "k1", "o1", key_defaults, owner_defaults)
    by_scope = {rule.scope: rule.limits() for rule in added}
    assert by_scope == {"key": {"daily_credits_micros": 5_000_000}, "owner": {"tpm": 1000}}
    both = [LimitRule("key", "k1", "*", rpm=60, daily_credits_micros=1), LimitRule("owner", "o1", "*", tpm=5)]
    assert with_defaults(both, "k1", "o1", key_defaults, owner_defaults) == []
