"""Shared fixtures: the real gRPC server, the real Envoy bridge and fake upstreams,
started once per test session on random loopback ports.

Only the upstream providers are fakes (speaking their real wire formats); everything
of the gateway's own is the real thing. When a test fails, the Envoy log's tail is
attached to its report.
"""

from __future__ import annotations

import os
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import openai
import pytest
import pytest_asyncio

from server.accounts.owners import ensure_owner
from server.app import Gateway, start_gateway
from server.bridge.envoy_config import LUA_PATH, render_envoy_config
from server.bridge.process import EnvoyProcess
from server.cli import DESCRIPTOR_PATH, wait_for_bridge
from server.config import CooldownConfig, GatewayConfig, ProviderConfig, RoutingConfig, Settings
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors

FAKE_KEY = "sk-fake"
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_envoys: list[EnvoyProcess] = []


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Bridge:
    """A running Envoy in front of a gateway."""

    rest_url: str
    admin_url: str
    envoy: EnvoyProcess


# For the gateways that test how one upstream answer reaches the client (error mapping,
# retry hints): one attempt, no cooldowns, so each call shows that answer as it is and
# one test's failures do not rest a deployment for the next. Routing has its own tests.
SINGLE_ATTEMPT = RoutingConfig(max_attempts=1, cooldown=CooldownConfig(enabled=False))


def gateway_config(fake_base_url: str) -> GatewayConfig:
    return GatewayConfig(
        routing=SINGLE_ATTEMPT,
        providers={
            "openai": ProviderConfig(base_url=fake_base_url, api_key=FAKE_KEY),
            # The same fake behind a second name with a wrong key: upstream auth failures.
            "badkey": ProviderConfig(type="openai", base_url=fake_base_url, api_key="sk-wrong"),
        },
        aliases={"fast": "openai/gpt-4o-mini"},
    )


@pytest_asyncio.fixture(scope="session")
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=FAKE_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture(autouse=True)
def _reset_fake(request: pytest.FixtureRequest) -> None:
    """Each test sees only its own upstream requests."""
    if "fake_openai" in request.fixturenames:
        request.getfixturevalue("fake_openai").reset()


def pytest_configure(config: pytest.Config) -> None:
    """Every gateway a test starts keeps its SQLite ledger in a temporary folder."""
    os.environ.setdefault("AIGNE_HUB_DATA_DIR", tempfile.mkdtemp(prefix="aigne-hub-test-data-"))
    # Every gateway a test starts serves its metrics on a free port, not the default.
    os.environ.setdefault("AIGNE_HUB_METRICS_PORT", "0")
    # `serve` runs one gRPC process unless a test asks for workers (tests/test_workers.py):
    # the single-process tests count serve's children (Envoy alone).
    os.environ.setdefault("AIGNE_HUB_WORKERS", "1")


@pytest_asyncio.fixture(scope="session")
async def gateway(fake_openai: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Gateway]:
    settings = Settings(
        grpc_port=0,
        max_message_bytes=MAX_MESSAGE_BYTES,
        upstream_read_timeout_s=2.0,
        shutdown_grace_s=2.0,
        data_dir=tmp_path_factory.mktemp("gateway-data"),
    )
    gw = await start_gateway(settings, gateway_config(fake_openai.base_url))
    yield gw
    await gw.stop(0.5)


@pytest_asyncio.fixture(scope="session")
async def api_key(gateway: Gateway) -> str:
    """A key of the user `tester`, as `aigne-hub keys create` would make it."""
    owner = await ensure_owner(gateway.accounts.db, "user", "tester")
    _, secret = await gateway.accounts.keys.create_key(owner.id, "tests")
    return secret


@pytest.fixture
def auth_headers(api_key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {api_key}"}


@pytest_asyncio.fixture(scope="session")
async def channel(gateway: Gateway, api_key: str) -> AsyncIterator[grpc.aio.Channel]:
    """A channel that sends the test key with every call."""
    interceptors = bearer_interceptors(api_key)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", interceptors=interceptors) as ch:
        yield ch


@pytest_asyncio.fixture(scope="session")
async def anonymous_channel(gateway: Gateway) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as ch:
        yield ch


async def start_bridge(grpc_port: int, tmp_dir: Path, max_bytes: int = MAX_MESSAGE_BYTES, **timeouts: float) -> Bridge:
    rest_port, admin_port = free_port(), free_port()
    config = render_envoy_config(
        rest_host="127.0.0.1",
        rest_port=rest_port,
        grpc_host="127.0.0.1",
        grpc_port=grpc_port,
        admin_port=admin_port,
        descriptor_path=DESCRIPTOR_PATH,
        lua_path=LUA_PATH,
        max_request_bytes=max_bytes,
        max_response_bytes=max_bytes,
        **timeouts,
    )
    admin_url = f"http://127.0.0.1:{admin_port}"
    envoy = EnvoyProcess(config, admin_url=admin_url, work_dir=tmp_dir)
    _envoys.append(envoy)
    await envoy.start()
    rest_url = f"http://127.0.0.1:{rest_port}"
    await wait_for_bridge(rest_url)
    return Bridge(rest_url=rest_url, admin_url=admin_url, envoy=envoy)


@pytest_asyncio.fixture(scope="session")
async def bridge(gateway: Gateway, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Bridge]:
    running = await start_bridge(gateway.port, tmp_path_factory.mktemp("envoy"))
    yield running
    await running.envoy.stop()


@pytest_asyncio.fixture(scope="session")
async def oai(bridge: Bridge, api_key: str) -> AsyncIterator[openai.AsyncOpenAI]:
    """The official OpenAI SDK pointed at the bridge, as its users would configure it."""
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=api_key, max_retries=0, timeout=20)
    yield client
    await client.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> pytest.TestReport:
    report: pytest.TestReport = yield
    if report.failed and _envoys:
        for index, envoy in enumerate(_envoys):
            report.sections.append((f"envoy log #{index} (tail)", envoy.log_tail()))
    return report
