"""Stored provider credentials under upstream failures (issue 7, items 4 and 10).

Through the real server, Envoy and a fake OpenAI upstream: a 403 for one model leaves
the credential in rotation; an invalid-key answer (401) takes it out only when a probe
is rejected too; the periodic re-check, the admin API and the CLI put it back; where
calls go is logged once per change. Upstream text is redacted of key fragments, and
seeded secrets appear in no log of a server running at DEBUG.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import re
import secrets
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest
import pytest_asyncio

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from aigne.hub.v1 import admin_service_pb2_grpc as admin_grpc
from aigne.hub.v1 import chat_service_pb2_grpc as chat_grpc
from server.app import Gateway, start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from server.redaction import redact
from tests.conftest import SINGLE_ATTEMPT, Bridge, free_port, start_bridge
from tests.fakes.anthropic_upstream import FakeAnthropic
from tests.fakes.gemini_upstream import FakeGemini
from tests.fakes.mistral_upstream import FakeMistral
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import bearer_interceptors, chat_request

AIGNE_HUB = Path(sys.executable).parent / "aigne-hub"
GOOD_KEY = "sk-" + secrets.token_hex(20)
ADMIN_TOKEN = "adm-" + secrets.token_hex(16)
MASTER_KEY = base64.b64encode(os.urandom(32)).decode()
HELLO = [{"role": "user", "content": "hello"}]
# Providers on the same fake, one per test, so that their credentials do not mix.
PROVIDERS = ("perm", "auth", "recheck", "manual")
CONFIGURED_KEY = "sk-configured-" + secrets.token_hex(8)  # wrong: only stored credentials work


def _bad_key() -> str:
    return "sk-" + secrets.token_hex(20)


@pytest_asyncio.fixture(scope="module")
async def upstream() -> AsyncIterator[FakeOpenAI]:
    fake = FakeOpenAI(api_key=GOOD_KEY)
    await fake.start()
    yield fake
    await fake.stop()


def _settings(data_dir: Path, recheck_s: float) -> Settings:
    return Settings(
        grpc_port=0,
        data_dir=data_dir,
        admin_token=ADMIN_TOKEN,
        master_key=MASTER_KEY,
        credential_recheck_s=recheck_s,
        upstream_read_timeout_s=5.0,
    )


def _config(base_url: str) -> GatewayConfig:
    return GatewayConfig(
        routing=SINGLE_ATTEMPT,
        providers={
            name: ProviderConfig(type="openai", base_url=base_url, api_key=CONFIGURED_KEY) for name in PROVIDERS
        },
    )


@pytest_asyncio.fixture(scope="module")
async def stack(
    upstream: FakeOpenAI, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[tuple[Gateway, Bridge, httpx.AsyncClient, Path]]:
    data_dir = tmp_path_factory.mktemp("credentials-data")
    gateway = await start_gateway(_settings(data_dir, recheck_s=0.3), _config(upstream.base_url))
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("credentials-envoy"))
    headers = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with httpx.AsyncClient(base_url=bridge.rest_url, headers=headers, timeout=20) as admin:
        yield gateway, bridge, admin, data_dir
    await bridge.envoy.stop()
    await gateway.stop(0.5)


@pytest_asyncio.fixture(scope="module")
async def client(stack: tuple[Gateway, Bridge, httpx.AsyncClient, Path]) -> AsyncIterator[openai.AsyncOpenAI]:
    _, bridge, admin, _ = stack
    key = (await admin.post("/admin/keys", json={"owner": "user:creds", "name": "k"})).json()["secret"]
    sdk = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=key, max_retries=0, timeout=20)
    yield sdk
    await sdk.close()


async def _add(admin: httpx.AsyncClient, provider: str, secret: str) -> str:
    answer = await admin.post("/admin/credentials", json={"provider": provider, "secret": secret})
    assert answer.status_code == 200, answer.text
    return str(answer.json()["credential"]["id"])


async def _credentials(admin: httpx.AsyncClient, provider: str) -> dict[str, dict[str, Any]]:
    listed = (await admin.get("/admin/credentials", params={"provider": provider})).json()["credentials"]
    return {c["id"]: c for c in listed}


async def _wait_for_status(admin: httpx.AsyncClient, provider: str, credential_id: str, status: str) -> None:
    async with asyncio.timeout(15):
        # Polling: the re-check runs on its own schedule; there is no event to wait on.
        while (await _credentials(admin, provider))[credential_id]["status"] != status:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def _probes(upstream: FakeOpenAI, secret: str) -> int:
    return sum(
        1
        for r in upstream.requests
        if r.method == "GET" and r.path == "/v1/models" and r.headers.get("authorization") == f"Bearer {secret}"
    )


async def test_a_403_for_one_model_leaves_the_credential_in_rotation(stack, client, upstream):
    _, _, admin, _ = stack
    credential = await _add(admin, "perm", GOOD_KEY)
    for _ in range(3):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            await client.chat.completions.create(model="perm/error-403", messages=HELLO)
        assert refused.value.status_code == 403
        assert "Country, region, or territory not supported" in refused.value.message
    with pytest.raises(openai.PermissionDeniedError):  # streams too
        await client.chat.completions.create(model="perm/error-403", messages=HELLO, stream=True)

    assert (await _credentials(admin, "perm"))[credential]["status"] == "active"
    assert _probes(upstream, GOOD_KEY) == 0, "a 403 is not an invalid key: nothing to confirm"
    answer = await client.chat.completions.create(model="perm/gpt-4o-mini", messages=HELLO)
    assert answer.choices[0].message.content == "echo: hello"
    assert upstream.last_request.headers["authorization"] == f"Bearer {GOOD_KEY}"


async def test_a_401_takes_a_credential_out_only_when_a_probe_confirms(stack, client, upstream, caplog):
    _, _, admin, _ = stack
    bad_key = _bad_key()
    bad = await _add(admin, "auth", bad_key)
    good = await _add(admin, "auth", GOOD_KEY)
    caplog.set_level(logging.WARNING)
    outcomes: list[str] = []
    # Each stored credential is a deployment, picked at random (weighted): call until
    # the bad one was picked, then three more.
    while "rejected" not in outcomes[:-3] and len(outcomes) < 40:
        try:
            await client.chat.completions.create(model="auth/gpt-4o-mini", messages=HELLO)
            outcomes.append("ok")
        except openai.PermissionDeniedError as exc:
            outcomes.append("rejected")
            # The fake echoes the key's first 8 characters, as OpenAI does.
            assert bad_key[:8] not in exc.message and "[redacted]" in exc.message
    assert outcomes.count("rejected") == 1 and outcomes[-3:] == ["ok"] * 3, outcomes
    assert _probes(upstream, bad_key) >= 1, "the rejection was confirmed by a probe"
    listed = await _credentials(admin, "auth")
    assert listed[bad]["status"] == "invalid" and listed[good]["status"] == "active"
    reason = listed[bad]["status_reason"]
    assert "401" in reason and bad_key[:8] not in reason and "[redacted]" in reason
    moved = [r.getMessage() for r in caplog.records if "marked invalid" in r.getMessage()]
    assert len(moved) == 1 and "calls move to the 1 other active stored credential(s)" in moved[0]
    assert all(bad_key[:8] not in r.getMessage() for r in caplog.records)

    # A 401 the probe does not confirm (the model list accepts the key) changes nothing.
    with pytest.raises(openai.PermissionDeniedError) as refused:
        await client.chat.completions.create(model="auth/error-401", messages=HELLO)
    assert refused.value.status_code == 403 and "Incorrect API key provided" in refused.value.message
    assert _probes(upstream, GOOD_KEY) >= 1
    assert (await _credentials(admin, "auth"))[good]["status"] == "active"
    assert any("stays in rotation" in r.getMessage() for r in caplog.records)


async def test_the_periodic_recheck_reactivates_a_credential_the_provider_accepts_again(
    stack, client, upstream, caplog, tmp_path
):
    _, _, admin, data_dir = stack
    caplog.set_level(logging.WARNING)
    restored_key = _bad_key()
    credential = await _add(admin, "recheck", restored_key)
    with pytest.raises(openai.PermissionDeniedError):
        await client.chat.completions.create(model="recheck/gpt-4o-mini", messages=HELLO)
    assert (await _credentials(admin, "recheck"))[credential]["status"] == "invalid"
    assert any("calls move to the key configured for the provider" in r.getMessage() for r in caplog.records)

    # A second server on the same database (a restart, another replica) finds every
    # stored credential invalid: it says so once, not once per call.
    caplog.clear()
    second = await start_gateway(_settings(data_dir, recheck_s=300), _config(upstream.base_url))
    try:
        key = (await admin.post("/admin/keys", json={"owner": "user:creds", "name": "k2"})).json()["secret"]
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{second.port}", interceptors=bearer_interceptors(key)
        ) as channel:
            for _ in range(3):
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await chat_grpc.ChatServiceStub(channel).CreateChatCompletion(chat_request("recheck/gpt-4o-mini"))
                assert failed.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        await second.stop(0.5)
    fallbacks = [r for r in caplog.records if "fall back to the key configured" in r.getMessage()]
    assert len(fallbacks) == 1 and fallbacks[0].levelno == logging.WARNING

    upstream.api_key = restored_key  # the provider accepts the key again
    try:
        await _wait_for_status(admin, "recheck", credential, "active")
        answer = await client.chat.completions.create(model="recheck/gpt-4o-mini", messages=HELLO)
        assert answer.choices[0].message.content == "echo: hello"
        assert upstream.last_request.headers["authorization"] == f"Bearer {restored_key}"
    finally:
        upstream.api_key = GOOD_KEY
    assert any("is active again" in r.getMessage() for r in caplog.records)


async def test_admin_api_and_cli_reactivate_a_credential(stack, client, upstream):
    gateway, _, admin, data_dir = stack
    bad_key = _bad_key()
    credential = await _add(admin, "manual", bad_key)

    async def reject_once() -> None:
        with pytest.raises(openai.PermissionDeniedError):
            await client.chat.completions.create(model="manual/gpt-4o-mini", messages=HELLO)
        assert (await _credentials(admin, "manual"))[credential]["status"] == "invalid"

    await reject_once()
    rest = await admin.post(f"/admin/credentials/{credential}:activate", json={})
    assert rest.status_code == 200 and rest.json()["credential"]["status"] == "active"
    assert not rest.json()["credential"].get("status_reason")
    missing = await admin.post("/admin/credentials/nosuch:activate", json={})
    assert missing.status_code == 404 and "nosuch" in missing.json()["error"]["message"]

    await reject_once()
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(ADMIN_TOKEN)
    ) as channel:
        stub = admin_grpc.AdminServiceStub(channel)
        answer = await stub.ActivateProviderCredential(
            admin_pb.ActivateProviderCredentialRequest(credential_id=credential)
        )
        assert answer.credential.status == "active"
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await stub.ActivateProviderCredential(admin_pb.ActivateProviderCredentialRequest(credential_id="nosuch"))
        assert failed.value.code() == grpc.StatusCode.NOT_FOUND

    await reject_once()
    env = {**os.environ, "AIGNE_HUB_DATA_DIR": str(data_dir), "AIGNE_HUB_MASTER_KEY": MASTER_KEY}
    env.pop("AIGNE_HUB_DATABASE_URL", None)
    listed = json.loads(await _cli(env, "credentials", "list", "--provider", "manual", "--json"))
    assert [(c["id"], c["status"]) for c in listed] == [(credential, "invalid")]
    assert bad_key not in json.dumps(listed) and bad_key[:8] not in listed[0]["invalid_reason"]
    table = (await _cli(env, "credentials", "list")).decode()
    assert credential in table and "invalid" in table and bad_key not in table
    activated = json.loads(await _cli(env, "credentials", "activate", credential, "--json"))
    assert activated["status"] == "active"
    assert (await _credentials(admin, "manual"))[credential]["status"] == "active"
    unknown = await _run_cli(env, "credentials", "activate", "nosuch")
    assert unknown[0] != 0 and b"no provider credential 'nosuch'" in unknown[2]


async def _run_cli(env: dict[str, str], *args: str) -> tuple[int, bytes, bytes]:
    process = await asyncio.create_subprocess_exec(
        str(AIGNE_HUB), *args, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, stdout, stderr


async def _cli(env: dict[str, str], *args: str) -> bytes:
    code, stdout, stderr = await _run_cli(env, *args)
    assert code == 0, stderr.decode()
    return stdout


def test_redaction_of_key_shaped_text():
    echoed = "Incorrect API key provided: sk-abc***xyz. You can find your API key at https://x."
    assert "sk-abc" not in redact(echoed) and "find your API key" in redact(echoed)
    google = "API key not valid: AIzaSyA1b2C3d4E5f6G7h8I9j0KlMnOpQrStUv"
    assert "AIza" not in redact(google)
    assert redact("Authorization: Bearer abc.def-ghi") == "Authorization: Bearer [redacted]"
    assert "0f3a" not in redact("token=0f3a9c1b2d4e5f60718293a4b5c6d7e8")
    long_run = "secret " + secrets.token_urlsafe(32)
    assert redact(long_run) == "secret [redacted]"
    plain = "The model `gpt-4o-mini` does not exist; max_tokens must be at most 4096 (claude-3-5-sonnet-20241022)"
    assert redact(plain) == plain


# ------------------------------------------------------------ secrets in no log at DEBUG


async def test_seeded_secrets_appear_in_no_log_at_debug(tmp_path):
    provider_key, wrong_provider_key = _bad_key(), _bad_key()
    stored_secret, stored_bad = _bad_key(), _bad_key()
    admin_token, master_key = "adm-" + secrets.token_hex(20), base64.b64encode(os.urandom(32)).decode()
    main_fake, vault_fake = FakeOpenAI(api_key=provider_key), FakeOpenAI(api_key=stored_secret)
    await main_fake.start()
    await vault_fake.start()
    config = tmp_path / "hub.yaml"
    config.write_text(
        "providers:\n"
        f"  openai: {{type: openai, base_url: '{main_fake.base_url}', api_key_env: HUB_TEST_PROVIDER_KEY}}\n"
        f"  badkey: {{type: openai, base_url: '{main_fake.base_url}', api_key_env: HUB_TEST_WRONG_KEY}}\n"
        f"  vaulted: {{type: openai, base_url: '{vault_fake.base_url}'}}\n"
    )
    rest_port, grpc_port, admin_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "HUB_TEST_PROVIDER_KEY": provider_key,
        "HUB_TEST_WRONG_KEY": wrong_provider_key,
        "AIGNE_HUB_ADMIN_TOKEN": admin_token,
        "AIGNE_HUB_MASTER_KEY": master_key,
        "AIGNE_HUB_LOG_LEVEL": "DEBUG",
        "AIGNE_HUB_ENVOY_LOG_LEVEL": "info",
        "AIGNE_HUB_DATA_DIR": str(tmp_path / "data"),
        "AIGNE_HUB_CREDENTIAL_RECHECK_S": "0.5",
        "AIGNE_HUB_SHUTDOWN_GRACE_S": "2",
    }
    env.pop("AIGNE_HUB_DATABASE_URL", None)
    server_log = tmp_path / "server.log"
    with server_log.open("wb") as log_file:
        process = await asyncio.create_subprocess_exec(
            str(AIGNE_HUB),
            "serve",
            f"--config={config}",
            f"--rest-port={rest_port}",
            f"--grpc-port={grpc_port}",
            f"--admin-port={admin_port}",
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=log_file,
        )
        try:
            envoy_log = await _wait_until_ready(process)
            rest_url = f"http://127.0.0.1:{rest_port}"
            api_key = await _drive_every_path(rest_url, grpc_port, admin_token, vault_fake, stored_bad)
            # Read before the stop: a stopping gateway removes Envoy's working folder.
            envoy_text = envoy_log.read_text(errors="replace")
            process.send_signal(signal.SIGTERM)
            assert await asyncio.wait_for(process.wait(), 30) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
            await main_fake.stop()
            await vault_fake.stop()

    logs = {"server": server_log.read_text(errors="replace"), "envoy": envoy_text}
    assert " DEBUG " in logs["server"], "the server really logged at DEBUG"
    assert "marked invalid" in logs["server"], "the failing paths were logged"
    assert "[info]" in logs["envoy"]
    seeded = {
        "provider key": provider_key,
        "wrong provider key": wrong_provider_key,
        "stored credential": stored_secret,
        "rejected stored credential": stored_bad,
        "gateway API key": api_key,
        "admin token": admin_token,
        "master key": master_key,
    }
    for where, text in logs.items():
        for name, secret in seeded.items():
            for fragment in _fragments(secret):
                assert fragment not in text, f"a fragment of the {name} ({fragment!r}) is in the {where} log"


def _fragments(secret: str) -> set[str]:
    """The 10-character windows of the secret's private part, and the 8-character
    prefix a provider echoes. A gateway key's `ahk_<prefix>_` is public (its display)."""
    private = secret.split("_", 2)[2] if secret.startswith("ahk_") else secret
    windows = {private[i : i + 10] for i in range(len(private) - 9)}
    return windows | ({secret[:8]} if secret.startswith("sk-") else set())


async def _wait_until_ready(process: asyncio.subprocess.Process) -> Path:
    assert process.stdout is not None
    async with asyncio.timeout(60):
        while True:
            line = (await process.stdout.readline()).decode()
            assert line, "the server exited before it was ready"
            if "ready" in line:
                match = re.search(r"Envoy log (\S+)", line)
                assert match is not None, line
                return Path(match.group(1))


async def _drive_every_path(
    rest: str, grpc_port: int, admin_token: str, vault_fake: FakeOpenAI, stored_bad: str
) -> str:
    """Successful, failing and admin calls, over REST and gRPC. The gateway API key used."""
    async with httpx.AsyncClient(
        base_url=rest, headers={"authorization": f"Bearer {admin_token}"}, timeout=20
    ) as admin:
        created = (await admin.post("/admin/keys", json={"owner": "user:logs", "name": "k"})).json()
        api_key = created["secret"]
        for secret in (stored_bad, vault_fake.api_key):
            assert (
                await admin.post("/admin/credentials", json={"provider": "vaulted", "secret": secret})
            ).status_code == 200
        await admin.get("/admin/keys")
        await admin.post("/admin/credits:grant", json={"owner": "user:logs", "amount": "5"})
        await admin.get("/admin/usage", params={"group_by": "model"})
        # An API key where the admin token belongs, and the admin token as an API key.
        assert (await admin.get("/admin/keys", headers={"authorization": f"Bearer {api_key}"})).status_code == 401
        sdk = openai.AsyncOpenAI(base_url=f"{rest}/v1", api_key=api_key, max_retries=0, timeout=20)
        as_admin = openai.AsyncOpenAI(base_url=f"{rest}/v1", api_key=admin_token, max_retries=0, timeout=20)
        try:
            await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
            async for _ in await sdk.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO, stream=True):
                pass
            await sdk.embeddings.create(model="openai/text-embedding-3-small", input="hello")
            for _ in range(40):  # stored credentials are picked at random: until the bad one was
                await _ignore_api_errors(sdk.chat.completions.create(model="vaulted/gpt-4o-mini", messages=HELLO))
                listed = (await admin.get("/admin/credentials")).json()["credentials"]
                if any(c["status"] == "invalid" for c in listed):
                    break
            for model in ("badkey/gpt-4o-mini", "openai/error-401", "openai/error-403", "openai/error-500"):
                await _ignore_api_errors(sdk.chat.completions.create(model=model, messages=HELLO))
            await _ignore_api_errors(
                sdk.chat.completions.create(model="badkey/gpt-4o-mini", messages=HELLO, stream=True)
            )
            await _ignore_api_errors(as_admin.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO))
        finally:
            await sdk.close()
            await as_admin.close()
        listed = (await admin.get("/admin/credentials")).json()["credentials"]
        invalid = [c["id"] for c in listed if c["status"] == "invalid"]
        assert len(invalid) == 1, listed
        # The confirming probe, then at least one periodic re-check (every 0.5 s).
        await vault_fake.wait_until(lambda: _probes(vault_fake, stored_bad) >= 2, seconds=15)
        await admin.post(f"/admin/credentials/{invalid[0]}:activate", json={})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{grpc_port}", interceptors=bearer_interceptors(api_key)) as ch:
        await chat_grpc.ChatServiceStub(ch).CreateChatCompletion(chat_request("openai/gpt-4o-mini"))
        with pytest.raises(grpc.aio.AioRpcError):
            await chat_grpc.ChatServiceStub(ch).CreateChatCompletion(chat_request("badkey/gpt-4o-mini"))
    return api_key


async def _ignore_api_errors(call: Any) -> None:
    try:
        result = await call
        if hasattr(result, "__aiter__"):
            async for _ in result:
                pass
    except openai.APIError:
        pass


# ------------------------------------------------ each adapter's invalid-key answer and probe

ADAPTERS: dict[str, tuple[Any, str]] = {
    # adapter: (its fake, a model the fake answers)
    "anthropic": (FakeAnthropic, "claude-haiku-4-5"),
    "gemini": (FakeGemini, "gemini-2.5-flash"),
    "mistral": (FakeMistral, "mistral-small-latest"),
}


@pytest.mark.parametrize("adapter", sorted(ADAPTERS))
async def test_each_adapter_confirms_an_invalid_key_with_its_own_probe(adapter, tmp_path):
    """Anthropic's authentication_error, Gemini's 400 API_KEY_INVALID and Mistral's 401
    take a stored credential out after a probe of the provider's model list; a 401 or
    403 for one model leaves it in."""
    fake_class, model = ADAPTERS[adapter]
    good_key, bad_key = "k-" + secrets.token_hex(12), "k-" + secrets.token_hex(12)
    fake = fake_class(api_key=good_key)
    await fake.start()
    try:
        config = GatewayConfig(
            routing=SINGLE_ATTEMPT,
            providers={adapter: ProviderConfig(base_url=fake.base_url, api_key=CONFIGURED_KEY)},
        )
        settings = _settings(tmp_path, recheck_s=300).model_copy(update={"auth_required": False})
        gateway = await start_gateway(settings, config)
        try:
            vault = gateway.accounts.vault
            assert vault is not None
            bad = (await vault.add(adapter, bad_key)).id
            good = (await vault.add(adapter, good_key)).id
            async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
                stub = chat_grpc.ChatServiceStub(channel)
                codes: list[grpc.StatusCode] = []
                # Stored credentials are deployments picked at random: until the bad
                # one was picked, then two more calls.
                while grpc.StatusCode.PERMISSION_DENIED not in codes[:-2] and len(codes) < 40:
                    try:
                        await stub.CreateChatCompletion(chat_request(f"{adapter}/{model}"))
                        codes.append(grpc.StatusCode.OK)
                    except grpc.aio.AioRpcError as exc:
                        codes.append(exc.code())
                        assert bad_key not in (exc.details() or "")
                assert codes.count(grpc.StatusCode.PERMISSION_DENIED) == 1, codes
                assert codes[-2:] == [grpc.StatusCode.OK, grpc.StatusCode.OK], codes
                assert (await vault.info(bad)).status == "invalid"
                for status in ("401", "403"):
                    with pytest.raises(grpc.aio.AioRpcError) as refused:
                        await stub.CreateChatCompletion(chat_request(f"{adapter}/error-{status}"))
                    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert (await vault.info(good)).status == "active"
            probes = [r for r in fake.requests if r.method == "GET"]
            assert len(probes) == 2, "one probe confirmed the bad key, one cleared the good one after the 401"
        finally:
            await gateway.stop(0.5)
    finally:
        await fake.stop()


async def test_concurrent_rejections_of_one_credential_share_one_probe(upstream, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    settings = _settings(tmp_path, recheck_s=300).model_copy(update={"auth_required": False})
    gateway = await start_gateway(settings, _config(upstream.base_url))
    try:
        assert gateway.accounts.vault is not None
        bad_key = _bad_key()
        await gateway.accounts.vault.add("auth", bad_key)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
            stub = chat_grpc.ChatServiceStub(channel)
            calls = [stub.CreateChatCompletion(chat_request("auth/gpt-4o-mini")) for _ in range(20)]
            results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(
            isinstance(r, grpc.aio.AioRpcError) and r.code() == grpc.StatusCode.PERMISSION_DENIED for r in results
        )
        assert _probes(upstream, bad_key) == 1
        assert len([r for r in caplog.records if "marked invalid" in r.getMessage()]) == 1
    finally:
        await gateway.stop(0.5)
