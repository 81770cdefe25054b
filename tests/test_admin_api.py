"""AdminService over REST (/admin/...) and gRPC: the admin credential, keys, credits,
rates, encrypted provider credentials in rotation, and usage reports."""

from __future__ import annotations

import base64
import os

import grpc
import httpx
import openai
import pytest

from aigne.hub.v1 import admin_service_pb2 as admin_pb
from aigne.hub.v1 import admin_service_pb2_grpc as admin_grpc
from server.app import start_gateway
from server.config import GatewayConfig, ProviderConfig, Settings
from tests.conftest import FAKE_KEY, SINGLE_ATTEMPT, gateway_config, start_bridge
from tests.helpers import bearer_interceptors

ADMIN_TOKEN = "admin-" + "t" * 32
HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
async def admin_stack(fake_openai, tmp_path_factory):
    config = gateway_config(fake_openai.base_url)
    # A provider whose configured key is wrong: only a vault credential makes it work.
    config = GatewayConfig(
        routing=SINGLE_ATTEMPT,
        providers={
            **config.providers,
            "vaulted": ProviderConfig(type="openai", base_url=fake_openai.base_url, api_key="sk-wrong"),
        },
        aliases=config.aliases,
    )
    settings = Settings(
        grpc_port=0,
        data_dir=tmp_path_factory.mktemp("admin-data"),
        admin_token=ADMIN_TOKEN,
        master_key=base64.b64encode(os.urandom(32)).decode(),
        credential_cache_ttl_s=0,
    )
    gateway = await start_gateway(settings, config)
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("admin-envoy"))
    async with httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        yield gateway, bridge, admin
    await bridge.envoy.stop()
    await gateway.stop(0.5)


async def test_admin_api_needs_the_admin_token(admin_stack, bridge):
    _gateway, admin_bridge, admin = admin_stack
    async with httpx.AsyncClient(base_url=admin_bridge.rest_url) as anonymous:
        missing = await anonymous.get("/admin/keys")
        wrong = await anonymous.get("/admin/keys", headers={"authorization": "Bearer nope"})
    assert missing.status_code == 401 and wrong.status_code == 401
    # An API key is not an admin credential.
    created = (await admin.post("/admin/keys", json={"owner": "user:x", "name": "k"})).json()
    as_key = await admin.get("/admin/keys", headers={"authorization": f"Bearer {created['secret']}"})
    assert as_key.status_code == 401
    # The session's main gateway has no admin token: its admin API is closed.
    async with httpx.AsyncClient(base_url=bridge.rest_url) as closed:
        answer = await closed.get("/admin/keys", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
    assert answer.status_code == 403 and "AIGNE_HUB_ADMIN_TOKEN" in answer.json()["error"]["message"]


async def test_key_lifecycle_over_rest(admin_stack):
    _gateway, bridge, admin = admin_stack
    created = await admin.post(
        "/admin/keys",
        json={"owner": "project:web", "name": "frontend", "allowed_models": ["openai/*"], "spend_cap": "2.5"},
    )
    assert created.status_code == 200, created.text
    body = created.json()
    secret, key = body["secret"], body["key"]
    assert secret.startswith("ahk_") and key["owner"] == "project:web" and key["spend_cap"] == "2.500000"
    assert secret not in (await admin.get("/admin/keys")).text, "secrets are never listed"

    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0)
    assert (await client.chat.completions.create(model="openai/gpt-4o", messages=HELLO)).choices
    listed = (await admin.get("/admin/keys", params={"owner": "project:web"})).json()["keys"]
    assert [k["id"] for k in listed] == [key["id"]]

    revoked = await admin.post(f"/admin/keys/{key['id']}:revoke", json={})
    assert revoked.status_code == 200 and revoked.json()["key"]["revoke_time"]
    with pytest.raises(openai.AuthenticationError):
        await client.chat.completions.create(model="openai/gpt-4o", messages=HELLO)
    assert (await admin.post("/admin/keys/nosuch:revoke", json={})).status_code == 404


async def test_credits_and_rates(admin_stack):
    _, _, admin = admin_stack
    granted = await admin.post(
        "/admin/credits:grant", json={"owner": "user:carol", "amount": "12.5", "note": "welcome"}
    )
    assert granted.json()["balance"]["balance"] == "12.500000"
    await admin.post("/admin/credits:grant", json={"owner": "user:carol", "amount": "0.25"})
    balance = (await admin.get("/admin/balance", params={"owner": "user:carol"})).json()["balance"]
    assert balance == {"owner": "user:carol", "balance": "12.750000", "reserved": "0.000000", "available": "12.750000"}
    bad = await admin.post("/admin/credits:grant", json={"owner": "user:carol", "amount": "lots"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "amount"

    rate = {"model": "openai/gpt-4o*", "input_per_million": "2.5", "output_per_million": "10"}
    assert (await admin.post("/admin/rates", json={"rate": rate})).status_code == 200
    bad_rate = await admin.post("/admin/rates", json={"rate": {"model": "x/*", "per_image": "a lot"}})
    assert bad_rate.status_code == 400 and bad_rate.json()["error"]["param"] == "rate.per_image"
    bad_owner = await admin.post("/admin/credits:grant", json={"owner": "carol", "amount": "1"})
    assert bad_owner.status_code == 400 and "user:NAME" in bad_owner.json()["error"]["message"]
    rates = (await admin.get("/admin/rates")).json()["rates"]
    assert {
        "model": "openai/gpt-4o*",
        "input_per_million": "2.500000",
        "output_per_million": "10.000000",
    }.items() <= next(r for r in rates if r["model"] == "openai/gpt-4o*").items()


async def test_provider_credentials_are_encrypted_masked_and_rotated(admin_stack, fake_openai):
    gateway, bridge, admin = admin_stack
    key = (await admin.post("/admin/keys", json={"owner": "user:dan", "name": "k"})).json()["secret"]
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):  # the configured key is wrong
        await client.chat.completions.create(model="vaulted/gpt-4o", messages=HELLO)

    bad = (
        await admin.post(
            "/admin/credentials", json={"provider": "vaulted", "secret": "sk-revoked-123456", "label": "old"}
        )
    ).json()
    good = (
        await admin.post("/admin/credentials", json={"provider": "vaulted", "secret": FAKE_KEY, "label": "new"})
    ).json()
    assert FAKE_KEY not in str(good) and good["credential"]["masked"] != FAKE_KEY

    outcomes: list[str] = []
    # Each stored credential is a deployment picked at random: until the bad one was.
    while "rejected" not in outcomes[:-2] and len(outcomes) < 40:
        try:
            await client.chat.completions.create(model="vaulted/gpt-4o", messages=HELLO)
            outcomes.append("ok")
        except openai.PermissionDeniedError:
            outcomes.append("rejected")
    assert outcomes.count("rejected") == 1, "a rejected credential leaves the rotation"
    assert outcomes[-2:] == ["ok", "ok"]
    assert fake_openai.requests[-1].headers["authorization"] == f"Bearer {FAKE_KEY}"

    listed = (await admin.get("/admin/credentials", params={"provider": "vaulted"})).json()["credentials"]
    status = {c["id"]: c["status"] for c in listed}
    assert status[bad["credential"]["id"]] == "invalid" and status[good["credential"]["id"]] == "active"
    async with gateway.accounts.db.read() as conn:
        from sqlalchemy import text

        raw = (await conn.execute(text("select * from provider_credentials"))).all()
    assert FAKE_KEY.encode() not in repr(raw).encode(), "stored encrypted"


async def test_usage_query_matches_the_ledger_over_grpc(admin_stack):
    gateway, bridge, admin = admin_stack
    created = (await admin.post("/admin/keys", json={"owner": "user:erin", "name": "k"})).json()
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=created["secret"], max_retries=0)
    for _ in range(3):
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    async with grpc.aio.insecure_channel(
        f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(ADMIN_TOKEN)
    ) as channel:
        report = await admin_grpc.AdminServiceStub(channel).QueryUsage(
            admin_pb.QueryUsageRequest(group_by=["key", "model"], key_id=created["key"]["id"])
        )
    records = await gateway.accounts.ledger.records(key_id=created["key"]["id"])
    assert len(report.totals) == 1
    total = report.totals[0]
    assert total.calls == 3 and total.model == "openai/gpt-4o-mini"
    assert total.input_tokens == sum(r.input_tokens for r in records)
    assert total.output_tokens == sum(r.output_tokens for r in records)
    rest = (await admin.get("/admin/usage", params={"group_by": "owner", "owner": "user:erin"})).json()["totals"]
    assert rest[0]["calls"] == 3 and rest[0]["owner"] == "user:erin"


async def test_rate_limits_are_set_listed_changed_and_removed_over_rest(admin_stack):
    _, bridge, admin = admin_stack
    created = (await admin.post("/admin/keys", json={"owner": "user:lima", "name": "k"})).json()
    key_id = created["key"]["id"]
    set_ = await admin.post("/admin/limits", json={"limit": {"key_id": key_id, "rpm": 2}})
    assert set_.status_code == 200 and set_.json()["limit"]["rpm"] == "2"  # int64 as JSON string
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=created["secret"], max_retries=0)
    for _ in range(2):
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)

    before = (await admin.get("/admin/limits", params={"key_id": key_id})).json()["limits"]
    bad = {
        "negative": {"key_id": key_id, "rpm": -1},
        "zero": {"key_id": key_id, "tpm": 0},
        "not a number": {"key_id": key_id, "rpm": "many"},
        "no limit": {"key_id": key_id},
        "both subjects": {"key_id": key_id, "owner": "user:lima", "rpm": 1},
    }
    for case, limit in bad.items():
        answer = await admin.post("/admin/limits", json={"limit": limit})
        assert answer.status_code == 400, (case, answer.text)
    unknown = await admin.post("/admin/limits", json={"limit": {"key_id": "nosuchkey", "rpm": 5}})
    assert unknown.status_code == 404 and "nosuchkey" in unknown.json()["error"]["message"]
    assert (await admin.get("/admin/limits", params={"key_id": key_id})).json()["limits"] == before, "nothing changed"

    changed = (await admin.post("/admin/limits", json={"limit": {"key_id": key_id, "tpm": 5000}})).json()["limit"]
    assert (changed["rpm"], changed["tpm"]) == ("2", "5000"), "a change keeps the limits it does not name"
    await admin.post("/admin/limits", json={"limit": {"owner": "user:lima", "model": "openai/*", "concurrency": 3}})
    first = (await admin.get("/admin/limits", params={"page_size": 1})).json()
    second = (await admin.get("/admin/limits", params={"page_size": 1, "page_token": first["next_page_token"]})).json()
    assert first["limits"][0] != second["limits"][0]

    assert (await admin.post("/admin/limits:remove", json={"key_id": key_id})).status_code == 200
    assert (await admin.post("/admin/limits:remove", json={"key_id": key_id})).status_code == 404
    reply = await client.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    assert reply.choices[0].message.content, "removing the rule lifts the limit at once on this replica"
    await client.close()


async def test_a_credential_is_deleted_the_standard_way(admin_stack):
    _gateway, _bridge, admin = admin_stack
    added = await admin.post("/admin/credentials", json={"provider": "vaulted", "secret": "sk-to-delete-1234"})
    credential_id = added.json()["credential"]["id"]

    deleted = await admin.delete(f"/admin/credentials/{credential_id}")
    assert deleted.status_code == 200 and deleted.json() == {}
    listed = (await admin.get("/admin/credentials", params={"provider": "vaulted"})).json()["credentials"]
    assert credential_id not in {c["id"] for c in listed}
    again = await admin.delete(f"/admin/credentials/{credential_id}")
    assert again.status_code == 404
    assert again.json()["error"]["code"] == "RESOURCE_NOT_FOUND"
    assert again.json()["error"]["param"] == "credential_id"
