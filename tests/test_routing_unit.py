"""Routing without the server: retry policy, cooldowns (in memory and in the real
Redis), balancing and the attempt loop, with scripted upstream outcomes."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from server import errors
from server.calls import Call, CallCredential
from server.config import CooldownConfig, GatewayConfig, ProviderConfig, RoutingConfig
from server.providers.base import Capability, ChatCompletions
from server.providers.registry import build_provider
from server.providers.transport import Transport
from server.routing import balance, policy
from server.routing.attempts import Routing, idle_bounded
from server.routing.cooldown import MemoryCooldowns, RedisCooldowns
from server.routing.router import Router, Target

REDIS_URL = "redis://127.0.0.1:6379/0"


def _unavailable(provider: str = "a", status: int = 503, retry_after: float | None = None) -> errors.UpstreamError:
    kind = errors.UpstreamRateLimited if status == 429 else errors.UpstreamUnavailable
    return kind("down", provider=provider, status=status, retry_after_seconds=retry_after)


def test_retry_policy() -> None:
    for status in (408, 409, 429, 500, 502, 503, 504, 529):
        assert policy.is_retryable(errors.UpstreamError("x", provider="p", status=status)), status
    for status in (400, 401, 403, 404, 413, 422):
        assert not policy.is_retryable(errors.UpstreamError("x", provider="p", status=status)), status
    assert policy.is_retryable(errors.UpstreamTimeout("slow", provider="p"))
    assert policy.is_retryable(errors.UpstreamUnavailable("unreachable", provider="p"))
    assert not policy.is_retryable(errors.InvalidRequest("bad"))
    too_long = errors.UpstreamBadRequest(
        "openai answered 400: This model's maximum context length is 8192 tokens", provider="p", status=400
    )
    assert policy.is_context_window_exceeded(too_long) and not policy.is_retryable(too_long)
    for n in range(1, 8):
        assert 0 <= policy.backoff_s(n, base_s=0.25, max_s=2.0) <= min(2.0, 0.25 * 2 ** (n - 1))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_cooldown_trips_rests_and_escalates() -> None:
    clock = Clock()
    store = MemoryCooldowns(CooldownConfig(failures=3, window_s=60, rest_s=5, max_rest_s=300), clock=clock)
    assert await store.failure("a") is None
    assert await store.failure("a") is None
    assert await store.failure("a") == 5  # third failure within the window
    assert (await store.resting(["a", "b"])).keys() == {"a"}
    clock.now += 5.1
    assert await store.resting(["a"]) == {}
    assert await store.failure("a") == 10  # on probation: the next failure trips at once, longer
    clock.now += 10.1
    await store.success("a")  # the trial call succeeds: cleared
    assert await store.failure("a") is None


async def test_memory_cooldown_rate_limit_and_error_rate() -> None:
    clock = Clock()
    store = MemoryCooldowns(CooldownConfig(failures=100, min_calls=10), clock=clock)
    assert await store.failure("a", retry_after_s=7, rate_limited=True) == 7
    for _ in range(5):
        await store.success("b")
    for _ in range(4):
        assert await store.failure("b") is None
    assert await store.failure("b") is None  # 5 of 10: not over half
    assert await store.failure("b") is not None  # 6 of 11


async def test_redis_cooldown_is_shared_between_two_stores() -> None:
    prefix = f"aigne-hub-test:{uuid.uuid4().hex}:"
    config = CooldownConfig(failures=2, window_s=60, rest_s=1, max_rest_s=10)
    one, two = RedisCooldowns(REDIS_URL, config, prefix=prefix), RedisCooldowns(REDIS_URL, config, prefix=prefix)
    try:
        assert await one.failure("openai/gpt") is None
        assert await two.failure("openai/gpt") == 1.0  # the other replica's failure counted
        assert 0 < (await one.resting(["openai/gpt", "x/y"]))["openai/gpt"] <= 1.0
        await asyncio.sleep(1.1)
        assert await two.resting(["openai/gpt"]) == {}
        assert await one.failure("openai/gpt") == 2.0  # probation, shared too
    finally:
        await one.aclose()
        await two.aclose()


async def test_redis_down_falls_back_to_memory() -> None:
    store = RedisCooldowns("redis://127.0.0.1:1/0", CooldownConfig(failures=1, rest_s=3))
    try:
        assert await store.failure("a") == 3
        assert "a" in await store.resting(["a"])
    finally:
        await store.aclose()


def test_weighted_order_follows_weights() -> None:
    rng = random.Random(7)
    firsts = Counter(balance.order(["a", "b"], [3, 1], "weighted", balance.Stats(), rng)[0] for _ in range(4000))
    assert abs(firsts[0] / 4000 - 0.75) < 0.03


def test_least_busy_and_latency_orders() -> None:
    stats = balance.Stats()
    stats.of("a").in_flight = 3
    stats.of("b").in_flight = 1
    assert balance.order(["a", "b"], [1, 1], "least-busy", stats)[0] == 1
    stats.of("a").observe_ttft(0.1)
    stats.of("b").observe_ttft(0.9)
    assert balance.order(["a", "b"], [1, 1], "latency", stats)[0] == 0


def _router(models: dict[str, object], fallbacks: list[str] | None = None) -> Router:
    providers = {
        name: ProviderConfig(type="openai", base_url=f"http://{name}.invalid/v1", api_key="k")
        for name in ("a", "b", "c")
    }
    config = GatewayConfig.model_validate(
        {
            "providers": {n: p.model_dump() for n, p in providers.items()},
            "models": models,
            "routing": {"fallbacks": fallbacks or [], "backoff_base_s": 0.01, "max_backoff_s": 0.02},
        }
    )
    transport = Transport()  # adapters are built, never called: the attempt function stands for the upstream
    built = {name: build_provider(name, cfg, transport) for name, cfg in config.providers.items()}
    return Router(config, built)


Script = dict[str, list[BaseException | str]]


def _attempts(script: Script, seen: list[str]):  # type: ignore[no-untyped-def]
    async def attempt(target: Target[ChatCompletions], call: Call) -> str:
        seen.append(target.name)
        outcome = script[target.name].pop(0) if script.get(target.name) else "ok"
        if isinstance(outcome, BaseException):
            raise outcome
        return f"{outcome} from {target.name}"

    return attempt


def _routing(**overrides: object) -> Routing:
    config = RoutingConfig.model_validate({"backoff_base_s": 0.01, "max_backoff_s": 0.02, **overrides})
    return Routing(config, MemoryCooldowns(config.cooldown))


async def test_retry_goes_to_another_deployment_then_falls_back() -> None:
    router = _router(
        {
            "smart": {
                "deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}],
                "fallbacks": ["c/m"],
            },
        }
    )
    plan = router.plan("smart", Capability.CHAT, ChatCompletions)
    seen: list[str] = []
    script: Script = {"a/m": [_unavailable()] * 5, "b/m": [_unavailable()] * 5}
    served = await _routing().run(plan, _attempts(script, seen))
    assert served.target.name == "c/m" and served.attempts == 4
    assert set(seen[:2]) == {"a/m", "b/m"}  # both deployments before any repeat
    assert seen[-1] == "c/m"


async def test_each_attempt_gets_its_own_copy_of_the_call() -> None:
    router = _router({"smart": {"deployments": [{"provider": "a", "model": "m"}, {"provider": "b", "model": "m"}]}})
    plan = router.plan("smart", Capability.CHAT, ChatCompletions)
    calls: list[Call] = []
    targets: list[str] = []
    outcomes: list[BaseException | str] = [_unavailable(), "ok"]

    async def attempt(target: Target[ChatCompletions], call: Call) -> str:
        calls.append(call)
        targets.append(target.name)
        outcome = outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def before(target: Target[ChatCompletions], public_model: str) -> CallCredential:
        return CallCredential(f"secret-of-{target.name}", id=f"cred-{target.name}")

    call = Call(request_id="r-1", key_id="k-1", owner_id="o-1")
    served = await _routing().run(plan, attempt, call=call, before_attempt=before)
    assert served.attempts == 2
    assert [c.attempt for c in calls] == [1, 2]
    assert set(targets) == {"a/m", "b/m"}  # the retry went to the other deployment...
    assert [c.credential.id if c.credential else None for c in calls] == [
        f"cred-{t}" for t in targets
    ]  # ...with its own
    assert {(c.request_id, c.key_id, c.owner_id) for c in calls} == {("r-1", "k-1", "o-1")}


async def test_no_retry_on_bad_request_and_retry_hint_honoured() -> None:
    router = _router({})
    plan = router.plan("a/m", Capability.CHAT, ChatCompletions)
    seen: list[str] = []
    bad = errors.UpstreamBadRequest("no", provider="a", status=400)
    with pytest.raises(errors.UpstreamBadRequest):
        await _routing().run(plan, _attempts({"a/m": [bad]}, seen))
    assert seen == ["a/m"]
    seen.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    served = await _routing().run(plan, _attempts({"a/m": [_unavailable(status=429, retry_after=0.3)]}, seen))
    assert served.attempts == 2 and loop.time() - started >= 0.3


async def test_resting_model_fails_at_once_with_hint() -> None:
    router = _router({})
    plan = router.plan("a/m", Capability.CHAT, ChatCompletions)
    routing = _routing(cooldown={"failures": 1, "rest_s": 100})  # longer than max_retry_after_s: no wait
    seen: list[str] = []
    with pytest.raises(errors.UpstreamUnavailable):
        await routing.run(plan, _attempts({"a/m": [_unavailable()] * 3}, seen))
    assert seen == ["a/m"]  # tripped at once, resting longer than a retry may wait
    seen.clear()
    with pytest.raises(errors.UpstreamUnavailable) as caught:
        await routing.run(plan, _attempts({}, seen))
    assert seen == []  # the resting deployment received nothing
    assert caught.value.retry_after_seconds is not None and 95 < caught.value.retry_after_seconds <= 100
    assert len(seen) == 0


async def test_context_window_fallback_and_deadline() -> None:
    router = _router({"a/m": {"context_window_fallbacks": ["b/big"]}})
    plan = router.plan("a/m", Capability.CHAT, ChatCompletions)
    too_long = errors.UpstreamBadRequest("maximum context length is 10 tokens", provider="a", status=400)
    seen: list[str] = []
    served = await _routing().run(plan, _attempts({"a/m": [too_long]}, seen))
    assert served.target.name == "b/big"

    async def silent(target: Target[ChatCompletions], call: Call) -> str:
        await asyncio.sleep(10)
        return "late"

    routing = _routing()
    deadline = asyncio.get_running_loop().time() + 0.2
    with pytest.raises(errors.UpstreamTimeout):
        await routing.run(router.plan("b/m", Capability.CHAT, ChatCompletions), silent, call=Call(deadline=deadline))


async def test_idle_bounded_stream() -> None:
    async def chunks() -> AsyncIterator[int]:
        yield 1
        await asyncio.sleep(1)
        yield 2

    got = []
    with pytest.raises(errors.UpstreamTimeout):
        async for chunk in idle_bounded(chunks(), 0.1, "p"):
            got.append(chunk)
    assert got == [1]


def test_config_refuses_unknown_deployment_provider() -> None:
    with pytest.raises(errors.ModelNotFound, match="'zz' is not configured"):
        _router({"smart": {"deployments": [{"provider": "zz", "model": "m"}]}})
