"""Provider credentials stored through the admin API are deployments of their provider.

Through the real server and Envoy, with the official openai SDK, against the scripted
fake OpenAI: of two stored credentials, the one a call reaches first answers 429; the
call succeeds on the other (a retry goes to another credential), the 429 one rests
(and `/status?model=` shows its cooldown by credential id), later calls avoid it, and
the answers name the credential that served them (its id, never the secret).
"""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import pytest_asyncio

from server.accounts.credentials import CredentialVault
from server.api.credential_deployments import with_credentials
from server.app import Gateway, start_gateway
from server.config import (
    CooldownConfig,
    DeploymentConfig,
    GatewayConfig,
    ModelRouteConfig,
    ProviderConfig,
    RoutingConfig,
    Settings,
)
from server.providers.base import Capability, ChatCompletions
from server.providers.registry import build_provider
from server.providers.transport import Transport
from server.routing.router import Router
from server.storage import Database
from tests.conftest import Bridge, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.storage_fixtures import database_url  # noqa: F401 - SQLite and PostgreSQL

ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
SECRETS = ["sk-first-" + secrets.token_hex(16), "sk-second-" + secrets.token_hex(16)]
CONFIGURED_KEY = "sk-configured-" + secrets.token_hex(8)
MODEL = "keys/gpt-4o-mini"
HELLO = [{"role": "user", "content": "hello"}]


@pytest_asyncio.fixture
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=None)  # takes any key: the test reads which one came
    await fake.start()
    yield fake
    await fake.stop()


@pytest_asyncio.fixture
async def stack(upstream: FakeOpenAI, tmp_path: Path) -> AsyncIterator[tuple[Gateway, Bridge]]:
    settings = Settings(
        grpc_port=0, data_dir=tmp_path / "data", admin_token=ADMIN_TOKEN, master_key=MASTER_KEY, shutdown_grace_s=0.5
    )
    config = GatewayConfig(
        routing=RoutingConfig(max_attempts=3, cooldown=CooldownConfig(rest_s=5)),
        providers={"keys": ProviderConfig(type="openai", base_url=upstream.base_url, api_key=CONFIGURED_KEY)},
    )
    gateway = await start_gateway(settings, config)
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    yield gateway, bridge
    await bridge.envoy.stop()
    await gateway.stop(0.5)


@pytest_asyncio.fixture
async def admin(stack: tuple[Gateway, Bridge]) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=stack[1].rest_url, headers=headers, timeout=20) as client:
        yield client


@pytest_asyncio.fixture
async def sdk(stack: tuple[Gateway, Bridge], admin: httpx.AsyncClient) -> AsyncIterator[openai.AsyncOpenAI]:
    key = (await admin.post("/admin/keys", json={"owner": "user:keys", "name": "k"})).json()["secret"]
    client = openai.AsyncOpenAI(base_url=f"{stack[1].rest_url}/v1", api_key=key, max_retries=0, timeout=20)
    yield client
    await client.close()


async def _store(admin: httpx.AsyncClient) -> dict[str, str]:
    """Stores both secrets; their ids by secret."""
    ids = {}
    for secret in SECRETS:
        answer = await admin.post("/admin/credentials", json={"provider": "keys", "secret": secret, "label": "k"})
        assert answer.status_code == 200, answer.text
        ids[secret] = answer.json()["credential"]["id"]
    return ids


async def _status(admin: httpx.AsyncClient) -> dict[str, Any]:
    """`GET /status?model=` as anyone may ask it (no key)."""
    async with httpx.AsyncClient(base_url=admin.base_url, timeout=20) as anyone:
        answer = await anyone.get("/status", params={"model": MODEL})
    assert answer.status_code == 200, answer.text
    status: dict[str, Any] = answer.json()
    return status


async def _health(admin: httpx.AsyncClient) -> dict[str, Any]:
    """The deployment's row of `GET /admin/health`, once the ledger holds its call."""
    for _ in range(100):
        answer = await admin.get("/admin/health")
        assert answer.status_code == 200, answer.text
        rows = {d["deployment"]: d for d in answer.json().get("deployments", [])}
        if MODEL in rows:
            return rows[MODEL]
        await asyncio.sleep(0.05)
    raise AssertionError(f"{MODEL} never appeared in /admin/health")


def _keys_used(upstream: FakeOpenAI) -> list[str]:
    return [r.headers["authorization"].removeprefix("Bearer ") for r in upstream.requests if r.method == "POST"]


async def _call(sdk: openai.AsyncOpenAI, **fields: Any) -> tuple[httpx.Headers, Any]:
    raw = await sdk.chat.completions.with_raw_response.create(model=MODEL, messages=HELLO, **fields)  # type: ignore[call-overload]
    return raw.headers, raw.parse()


async def test_a_429_on_one_credential_rests_that_credential_and_the_call_succeeds_on_the_other(
    upstream: FakeOpenAI, admin: httpx.AsyncClient, sdk: openai.AsyncOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="aigne_hub.calls")
    ids = await _store(admin)
    upstream.script("gpt-4o-mini", 429, headers={"retry-after": "30"})

    headers, answer = await _call(sdk)
    assert answer.choices[0].message.content == "echo: hello"
    limited, served = _keys_used(upstream)
    assert {limited, served} == set(SECRETS), "one attempt on each stored credential, none on the configured key"
    assert headers["x-aigne-hub-served-by"] == MODEL and headers["x-aigne-hub-attempts"] == "2"
    assert headers["x-aigne-hub-credential"] == ids[served]
    assert not any(secret in value for value in headers.values() for secret in SECRETS)
    [line] = [r.call for r in caplog.records if r.name == "aigne_hub.calls"]  # type: ignore[attr-defined]
    assert line["deployment"] == MODEL and line["credential_id"] == ids[served] and line["attempts"] == 2
    assert not any(secret in r.getMessage() for r in caplog.records for secret in SECRETS)

    status = await _status(admin)
    assert status.get("available") is True, status
    [resting] = status["resting"]
    assert resting["deployment"] == MODEL and resting["credential_id"] == ids[limited]
    assert 25 < resting["seconds_left"] <= 30, "rests for the provider's Retry-After"
    # The admin's health view (the dashboard's) shows the same per-credential rest.
    health = await _health(admin)
    assert health["resting"] is False, "the other credential still serves"
    [credential] = health["resting_credentials"]
    assert credential["credential_id"] == ids[limited] and 25 < credential["seconds_left"] <= 30

    upstream.requests.clear()
    for _ in range(6):  # streams too
        headers, _ = await _call(sdk)
        assert headers["x-aigne-hub-credential"] == ids[served] and headers["x-aigne-hub-attempts"] == "1"
    async for _ in await sdk.chat.completions.create(model=MODEL, messages=HELLO, stream=True):  # type: ignore[call-overload]
        pass
    assert set(_keys_used(upstream)) == {served}, "the resting credential gets no calls"


async def test_every_credential_resting_is_a_503_with_a_retry_hint(
    upstream: FakeOpenAI, admin: httpx.AsyncClient, sdk: openai.AsyncOpenAI
) -> None:
    await _store(admin)
    upstream.script("gpt-4o-mini", 429, 429, headers={"retry-after": "60"})
    with pytest.raises(openai.RateLimitError):
        await _call(sdk)  # both answer 429, hinting longer than a retry waits (30 s): no wait
    assert sorted(_keys_used(upstream)) == sorted(SECRETS)

    with pytest.raises(openai.InternalServerError) as refused:
        await _call(sdk)
    assert refused.value.status_code == 503 and refused.value.response.headers.get("retry-after")
    status = await _status(admin)
    assert status["available"] is False and status["code"] == "UPSTREAM_UNAVAILABLE"
    assert len(status["resting"]) == 2
    health = await _health(admin)
    assert health["resting"] is True and 0 < health["rest_seconds_left"] <= 60, "every credential rests"
    assert len(health["resting_credentials"]) == 2


async def test_without_stored_credentials_the_configured_key_serves(
    upstream: FakeOpenAI, sdk: openai.AsyncOpenAI, admin: httpx.AsyncClient
) -> None:
    headers, _ = await _call(sdk)
    assert _keys_used(upstream) == [CONFIGURED_KEY]
    assert "x-aigne-hub-credential" not in headers
    assert "resting" not in await _status(admin)


async def test_calls_spread_over_the_stored_credentials(upstream: FakeOpenAI, admin: httpx.AsyncClient, sdk) -> None:
    ids = await _store(admin)
    served = [(await _call(sdk))[0]["x-aigne-hub-credential"] for _ in range(40)]
    # Weighted random with equal weights: both serve (1 in 2^39 that one never does).
    assert set(served) == set(ids.values())
    assert sorted(_keys_used(upstream)) == sorted(s for s in SECRETS for i in served if i == ids[s])


async def test_the_ledger_names_the_stored_credential_that_served_each_call(
    upstream: FakeOpenAI,
    database_url: str,  # noqa: F811 - SQLite and PostgreSQL
    tmp_path: Path,
) -> None:
    await (await Database.open(database_url, migrate=True)).close()  # PostgreSQL is migrated explicitly
    settings = Settings(
        grpc_port=0, database_url=database_url, admin_token=ADMIN_TOKEN, master_key=MASTER_KEY, shutdown_grace_s=0.5
    )
    config = GatewayConfig(
        providers={"keys": ProviderConfig(type="openai", base_url=upstream.base_url, api_key=CONFIGURED_KEY)}
    )
    gateway = await start_gateway(settings, config)
    bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    try:
        async with httpx.AsyncClient(base_url=bridge.rest_url, headers=headers, timeout=20) as admin:
            key = (await admin.post("/admin/keys", json={"owner": "user:ledger", "name": "k"})).json()
            sdk = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=key["secret"], max_retries=0)
            ids = await _store(admin)
            served = [(await _call(sdk))[0]["x-aigne-hub-credential"] for _ in range(16)]
            await sdk.close()
            assert set(served) == set(ids.values()), "both credentials served (1 in 2^15 that one never does)"
            calls: list[dict[str, Any]] = []
            for _ in range(100):  # the group commit writes within its batch interval
                calls = (await admin.get("/admin/calls", params={"key_id": key["key"]["id"]})).json().get("calls", [])
                if len(calls) == len(served):
                    break
                await asyncio.sleep(0.05)
            # Newest first in the listing; the headers in call order.
            assert [c["credential_id"] for c in reversed(calls)] == served
            assert not any(secret in str(calls) for secret in SECRETS), "the id only, never the secret"
        records = await gateway.accounts.ledger.records(key_id=key["key"]["id"])
        assert sorted(r.credential_id or "" for r in records) == sorted(served)
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


# ------------------------------------------------------------- the plan, without Envoy


async def test_each_active_credential_becomes_a_target_sharing_the_weight(tmp_path: Path) -> None:
    db = await Database.open(f"sqlite:///{tmp_path / 'vault.db'}", migrate=True)
    try:
        vault = CredentialVault(db, os.urandom(32))
        first, second = [await vault.add("keys", secret) for secret in SECRETS]
        third = await vault.add("keys", "sk-third-" + secrets.token_hex(16))
        await vault.mark_invalid(third.id, "rejected")
        config = GatewayConfig(
            providers={
                "keys": ProviderConfig(type="openai", base_url="http://127.0.0.1:9/v1", api_key=CONFIGURED_KEY),
                "other": ProviderConfig(type="openai", base_url="http://127.0.0.1:9/v1", api_key=CONFIGURED_KEY),
            },
            models={
                "smart": ModelRouteConfig(
                    deployments=[
                        DeploymentConfig(provider="keys", model="gpt-4o", weight=3),
                        DeploymentConfig(provider="other", model="gpt-4o", weight=1),
                    ],
                    fallbacks=[MODEL],
                )
            },
        )
        async with Transport() as transport:
            providers = {name: build_provider(name, cfg, transport) for name, cfg in config.providers.items()}
            plan = Router(config, providers).plan("smart", Capability.CHAT, ChatCompletions)
            expanded, credentials = await with_credentials(plan, vault)
            unchanged, none = await with_credentials(plan, None)
    finally:
        await db.close()
    assert [(t.name, t.weight) for t in expanded.primary.targets] == [
        (f"keys/gpt-4o@{first.id}", 1.5),
        (f"keys/gpt-4o@{second.id}", 1.5),
        ("other/gpt-4o", 1.0),  # no stored credential: its configured key
    ]
    assert [t.name for t in expanded.fallbacks[0].targets] == [f"{MODEL}@{first.id}", f"{MODEL}@{second.id}"]
    assert set(credentials) == {first.id, second.id}, "the invalid credential is no deployment"
    assert all(t.deployment == t.route.public_model for t in expanded.primary.targets)
    assert unchanged is plan and none == {}
