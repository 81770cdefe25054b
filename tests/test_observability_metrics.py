"""Metrics through a real Prometheus server: a gateway of its own (fresh counters) and
a fake OpenAI upstream; Prometheus scrapes the metrics listener every second and PromQL
must answer the counts of the calls made, and the token sums the ledger's totals."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio
from prometheus_client import generate_latest

from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.accounts.ledger import UsageRecord
from server.accounts.observer import FinishedCall
from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.config import CooldownConfig, GatewayConfig, ProviderConfig, RoutingConfig, Settings
from server.observability.metrics import GatewayMetrics
from tests.conftest import Bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors, chat_request
from tests.prometheus_server import PrometheusServer

CALLS = 5
STREAMS = 3


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key="sk-metrics")
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture(scope="module")
async def observed(upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    settings = Settings(grpc_port=0, metrics_port=0, data_dir=tmp_path_factory.mktemp("metrics-data"))
    config = GatewayConfig(
        routing=RoutingConfig(max_attempts=1, cooldown=CooldownConfig(enabled=False)),
        providers={"openai": ProviderConfig(base_url=upstream.base_url, api_key="sk-metrics")},
        aliases={"fast": "openai/gpt-4o-mini"},
        models={"openai/primary": {"fallbacks": ["openai/backup"]}},  # type: ignore[dict-item]
    )
    gateway = await start_gateway(settings, config)
    yield gateway
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def prometheus(observed: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[PrometheusServer]:
    assert observed.metrics is not None
    server = PrometheusServer(f"127.0.0.1:{observed.metrics.port}", tmp_path_factory.mktemp("prometheus"))
    await server.start()
    yield server
    server.stop()


@pytest_asyncio.fixture(scope="module")
async def chat(observed: Gateway) -> AsyncIterator[chat_grpc.ChatServiceStub]:
    owner = await ensure_owner(observed.accounts.db, "user", f"metrics-{uuid.uuid4().hex[:8]}")
    _, secret = await observed.accounts.keys.create_key(owner.id, "metrics")
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{observed.port}", interceptors=bearer_interceptors(secret)
    ) as channel:
        yield chat_grpc.ChatServiceStub(channel)


async def test_prometheus_counts_calls_tokens_and_attempts(
    observed: Gateway, prometheus: PrometheusServer, chat: chat_grpc.ChatServiceStub, upstream: FakeOpenAI
) -> None:
    assert await prometheus.wait_for('up{job="aigne-hub"}', 1.0) == 1.0, prometheus.log_tail()
    for index in range(CALLS):
        await chat.CreateChatCompletion(chat_request(model="fast", text=f"call number {index} here"))
    for _ in range(STREAMS):
        _ = [c async for c in chat.StreamChatCompletion(chat_request(text="one two three"))]
    with pytest.raises(grpc.aio.AioRpcError):
        await chat.CreateChatCompletion(chat_request(model="nowhere/invented-by-client"))
    upstream.script("primary", 500)  # fails once: the fallback answers
    await chat.CreateChatCompletion(chat_request(model="openai/primary"))

    ok_calls = await prometheus.wait_for('sum(aigne_hub_requests_total{rpc="chat",outcome="ok"})', CALLS + 1)
    assert ok_calls == CALLS + 1
    assert await prometheus.wait_for('sum(aigne_hub_requests_total{rpc="chat_stream",outcome="ok"})', STREAMS) == (
        STREAMS
    )
    refused = 'sum(aigne_hub_requests_total{rpc="chat",outcome="error"}) by (reason)'
    assert [r["metric"]["reason"] for r in await prometheus.query(refused)] != []
    durations = 'sum(gen_ai_server_request_duration_seconds_count{gen_ai_operation_name="chat",error_type=""})'
    assert await prometheus.wait_for(durations, CALLS + 1 + STREAMS) == CALLS + 1 + STREAMS
    # The client-invented model is `other`, never its own label value.
    models = await prometheus.query("count by (gen_ai_request_model) (gen_ai_server_request_duration_seconds_count)")
    assert {m["metric"]["gen_ai_request_model"] for m in models} <= {"fast", "openai/gpt-4o-mini", "openai/primary"}
    assert await prometheus.value('sum(gen_ai_client_token_usage_count{gen_ai_request_model="other"})') in (None, 0)
    assert await prometheus.query('{job="aigne-hub", owner_id!=""}') == []  # no per-owner series by default
    ttft = "sum(gen_ai_server_time_to_first_token_seconds_count)"
    assert await prometheus.wait_for(ttft, STREAMS) == STREAMS
    attempts = 'aigne_hub_upstream_attempts_total{deployment="openai/primary",outcome="UPSTREAM_UNAVAILABLE"}'
    assert await prometheus.wait_for(attempts, 1.0) == 1.0
    assert await prometheus.wait_for('aigne_hub_upstream_attempts_total{deployment="openai/backup"}', 1.0) == 1.0
    assert await prometheus.wait_for('sum(aigne_hub_in_flight{kind="call"})', 0.0) == 0.0
    assert await prometheus.wait_for("sum(aigne_hub_ledger_commit_seconds_count) > 0", 1.0) is not None

    totals = (await observed.accounts.ledger.totals())[0]
    assert totals.input_tokens > 0 and totals.output_tokens > 0
    for kind, expected in (("input", totals.input_tokens), ("output", totals.output_tokens)):
        promql = f'sum(gen_ai_client_token_usage_sum{{gen_ai_token_type="{kind}"}})'
        assert await prometheus.wait_for(promql, float(expected)) == float(expected), kind


async def test_overhead_is_measured_apart_from_upstream_time(
    observed: Gateway, prometheus: PrometheusServer, chat: chat_grpc.ChatServiceStub
) -> None:
    await chat.CreateChatCompletion(chat_request())
    assert observed.metrics is not None
    async with httpx.AsyncClient(trust_env=False) as client:
        text = (await client.get(f"http://127.0.0.1:{observed.metrics.port}/metrics")).text
    count = _sample(text, 'aigne_hub_gateway_overhead_seconds_count{rpc="chat"}')
    total = _sample(text, 'aigne_hub_gateway_overhead_seconds_sum{rpc="chat"}')
    durations = _sample(text, "gen_ai_server_request_duration_seconds_sum", prefix=True)
    assert count >= 1
    assert 0 <= total < durations  # the upstream's share is left out


def _sample(text: str, name: str, prefix: bool = False) -> float:
    """A sample's value from the exposition text (summed over series for a prefix)."""
    values = [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name) if prefix else line.startswith(name + " "))
    ]
    assert values, f"no {name} in the exposition"
    return sum(values)


async def test_the_metrics_listener_answers_apart_from_the_rest_port(gateway: Gateway, bridge: Bridge) -> None:
    assert gateway.metrics is not None
    metrics_url = f"http://127.0.0.1:{gateway.metrics.port}/metrics"
    async with httpx.AsyncClient(trust_env=False) as client:
        direct = await client.get(metrics_url)
        through_rest = await client.get(f"{bridge.rest_url}/metrics")
    assert direct.status_code == 200 and "aigne_hub_requests_total" in direct.text
    assert through_rest.status_code == 404
    assert "aigne_hub_" not in through_rest.text and "gen_ai_" not in through_rest.text


DASHBOARD = Path(__file__).resolve().parent.parent / "observability" / "grafana-dashboard.json"
EXAMPLE_SCRAPE_CONFIG = DASHBOARD.parent / "prometheus.yml"


def _exported_sample_names(metrics: GatewayMetrics) -> set[str]:
    """The sample names the gateway's collectors can export (their families' names with
    the suffixes of their types), whether or not they hold samples yet."""
    suffixes = {"histogram": ("_bucket", "_sum", "_count"), "counter": ("_total",), "gauge": ("",)}
    return {family.name + s for family in metrics.registry.collect() for s in suffixes[family.type]}


def _metric_names(expr: str) -> set[str]:
    """The metric names in a PromQL expression: label lists (`by (...)`) and matchers
    (`{...}`) removed, then every gateway-prefixed identifier."""
    bare = re.sub(r"\{[^}]*\}", "", re.sub(r"\b(?:by|without)\s*\([^)]*\)", "", expr))
    return set(re.findall(r"\b(?:aigne_hub|gen_ai)_[a-z_]+\b", bare))


async def test_every_dashboard_query_names_exported_metrics_and_parses(
    observed: Gateway, prometheus: PrometheusServer
) -> None:
    assert observed.metrics is not None
    exported = _exported_sample_names(observed.metrics.metrics)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len(panels) >= 8
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("requests", "errors", "p99", "first token", "tokens per second", "credits", "in flight", "attempts"):
        assert topic in titles, topic
    for panel in panels:
        for target in panel["targets"]:
            names = _metric_names(target["expr"])
            assert names, f"{panel['title']}: no gateway metric in {target['expr']}"
            assert names <= exported, f"{panel['title']}: {names - exported} is not exported"
            # Valid PromQL for a real Prometheus (Grafana's interval variable filled in).
            await prometheus.query(target["expr"].replace("$__rate_interval", "1m"))


async def test_the_example_scrape_config_reaches_the_gateway_and_envoys_stats_on_loopback(
    gateway: Gateway, bridge: Bridge, tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert gateway.metrics is not None
    async with httpx.AsyncClient(trust_env=False) as client:
        assert (await client.get(f"{bridge.rest_url}/status")).status_code == 200
    admin_port = bridge.admin_url.rsplit(":", 1)[1]
    config = (
        EXAMPLE_SCRAPE_CONFIG.read_text()
        .replace("127.0.0.1:9464", f"127.0.0.1:{gateway.metrics.port}")
        .replace("127.0.0.1:9901", f"127.0.0.1:{admin_port}")
        .replace("scrape_interval: 15s", "scrape_interval: 1s")
    )
    server = PrometheusServer("", tmp_path_factory.mktemp("prometheus-example"), config_text=config)
    await server.start()
    try:
        assert await server.wait_for("count(up == 1)", 2.0) == 2.0, server.log_tail()
        downstream = 'sum(envoy_http_downstream_rq_total{envoy_http_conn_manager_prefix="openai_rest"}) > 0'
        assert await server.wait_for(f"count({downstream})", 1.0) == 1.0
    finally:
        server.stop()


def test_per_owner_series_only_when_turned_on() -> None:
    record = UsageRecord(
        request_id="r:1",
        provider="openai",
        model="openai/gpt-4o-mini",
        operation="chat",
        key_id="key-1",
        owner_id="owner-1",
        input_tokens=7,
        output_tokens=3,
    )
    call = FinishedCall(record, "openai/gpt-4o-mini", 0.05)
    plain, per_owner = GatewayMetrics(), GatewayMetrics(owner_labels=True)
    for metrics in (plain, per_owner):
        metrics.call_started("chat")
        metrics.call_finished(call)
    assert b"owner-1" not in generate_latest(plain.registry) and b"key-1" not in generate_latest(plain.registry)
    text = generate_latest(per_owner.registry).decode()
    assert 'aigne_hub_owner_requests_total{outcome="ok",owner_id="owner-1"} 1.0' in text
    assert 'aigne_hub_owner_tokens_total{gen_ai_token_type="input",owner_id="owner-1"} 7.0' in text
    assert "key-1" not in text
