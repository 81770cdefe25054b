"""AccountService (an API key's owner sees its own account) and the admin API's
recorded calls and provider health, over REST through Envoy and over gRPC."""

from __future__ import annotations

import grpc
import httpx
import openai
import pytest

from aigne.hub.v1 import account_service_pb2 as account_pb
from aigne.hub.v1 import account_service_pb2_grpc as account_grpc
from server.accounts.credits import rate_from_credits
from server.accounts.owners import ensure_owner
from server.app import start_gateway
from server.config import CooldownConfig, GatewayConfig, RoutingConfig, Settings
from server.limits.rules import LimitRule
from tests.conftest import gateway_config, start_bridge
from tests.helpers import bearer_interceptors
from tests.storage_fixtures import count_queries

ADMIN_TOKEN = "acct-admin-" + "b" * 32
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
async def accounts_stack(fake_openai, tmp_path_factory):
    base = gateway_config(fake_openai.base_url)
    # One failure rests a deployment: the health report shows it.
    routing = RoutingConfig(max_attempts=1, cooldown=CooldownConfig(failures=1, rest_s=120, max_rest_s=300))
    config = GatewayConfig(routing=routing, providers=base.providers, aliases=base.aliases)
    settings = Settings(
        grpc_port=0, data_dir=tmp_path_factory.mktemp("account-data"), admin_token=ADMIN_TOKEN, billing_enabled=True
    )
    gateway = await start_gateway(settings, config)
    accounts = gateway.accounts
    await accounts.credits.set_rate(rate_from_credits("*", {"input_per_million": 100, "output_per_million": 200}))
    secrets = {}
    for name in ("alice", "bob"):
        owner = await ensure_owner(accounts.db, "user", name)
        await accounts.credits.grant(owner.id, 5 * 10**6)
        _, secrets[name] = await accounts.keys.create_key(owner.id, f"{name}-key")
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("account-envoy"))
    alice = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secrets["alice"], max_retries=0)
    for _ in range(3):
        await alice.chat.completions.create(model="openai/gpt-4o-mini", messages=HELLO)
    with pytest.raises(openai.InternalServerError):
        await alice.chat.completions.create(model="openai/error-500", messages=HELLO)
    await alice.close()
    yield gateway, bridge, secrets
    await bridge.envoy.stop()
    await gateway.stop(0.5)


def client(bridge, secret: str) -> httpx.AsyncClient:
    return httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {secret}"})


async def test_a_key_sees_its_own_owner_only(accounts_stack):
    gateway, bridge, secrets = accounts_stack
    async with client(bridge, secrets["alice"]) as alice, client(bridge, secrets["bob"]) as bob:
        mine = (await alice.get("/account")).json()
        usage = (await alice.get("/account/usage", params={"group_by": ["model"]})).json()
        calls = (await alice.get("/account/calls")).json()
        theirs = (await bob.get("/account/calls")).json()
        bob_usage = (await bob.get("/account/usage")).json()
    assert mine["key"]["owner"] == "user:alice" and [k["name"] for k in mine["keys"]] == ["alice-key"]
    assert "secret" not in str(mine) and secrets["alice"] not in str(mine)
    assert mine["billing_enabled"] is True and mine["reservations"] == []
    [ledger_total] = await gateway.accounts.ledger.totals(owner_id="user:alice")
    assert mine["balance"]["balance"] == f"{5 - ledger_total.credits_micros / 10**6:.6f}"
    by_model = {row["model"]: row for row in usage["totals"]}
    assert by_model["openai/gpt-4o-mini"]["calls"] == 3 and by_model["openai/error-500"]["errors"] == 1
    assert calls["calls"][0]["model"] == "openai/error-500", "newest first"
    assert len(calls["calls"]) == 4 and all(c["owner"] == "user:alice" for c in calls["calls"])
    assert calls["calls"][0]["outcome"] == "error" and calls["calls"][0]["error_reason"]
    assert theirs["calls"] == [] and bob_usage["totals"][0]["calls"] == 0


async def test_account_calls_are_paged_newest_first(accounts_stack):
    _gateway, bridge, secrets = accounts_stack
    async with client(bridge, secrets["alice"]) as alice:
        first = (await alice.get("/account/calls", params={"page_size": 3})).json()
        second = (
            await alice.get("/account/calls", params={"page_size": 3, "page_token": first["next_page_token"]})
        ).json()
        bad = await alice.get("/account/calls", params={"page_token": "nonsense"})
    ids = [c["request_id"] for c in first["calls"] + second["calls"]]
    assert len(first["calls"]) == 3 and len(second["calls"]) == 1 and len(set(ids)) == 4
    assert second["next_page_token"] == ""
    times = [c["create_time"] for c in first["calls"] + second["calls"]]
    assert times == sorted(times, reverse=True)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "page_token"


async def test_account_api_needs_an_api_key(accounts_stack):
    gateway, bridge, _secrets = accounts_stack
    async with httpx.AsyncClient(base_url=bridge.rest_url) as anonymous:
        missing = await anonymous.get("/account")
        admin = await anonymous.get("/account", headers={"authorization": f"Bearer {ADMIN_TOKEN}"})
        wrong = await anonymous.get("/account/usage", headers={"authorization": "Bearer ahk_abcdefgh_" + "x" * 43})
    assert missing.status_code == admin.status_code == wrong.status_code == 401
    for answer in (missing, admin, wrong):
        assert "user:alice" not in answer.text and "balance" not in answer.text
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await account_grpc.AccountServiceStub(channel).GetAccount(account_pb.GetAccountRequest())
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_account_usage_refuses_bad_queries(accounts_stack):
    gateway, bridge, secrets = accounts_stack
    async with client(bridge, secrets["alice"]) as alice:
        by_owner = await alice.get("/account/usage", params={"group_by": "owner"})
        bad_day = await alice.get("/account/usage", params={"since": "yesterday"})
        ranged = await alice.get("/account/usage", params={"since": "2020-01-01", "until": "2020-02-01"})
    assert by_owner.status_code == 400 and "group_by" in by_owner.json()["error"]["message"]
    assert bad_day.status_code == 400 and bad_day.json()["error"]["param"] == "since"
    assert ranged.status_code == 200 and ranged.json()["totals"][0]["calls"] == 0
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}", interceptors=bearer_interceptors(secrets["alice"]))
    async with channel:
        answer = await account_grpc.AccountServiceStub(channel).QueryAccountUsage(
            account_pb.QueryAccountUsageRequest(group_by=["day"])
        )
    assert sum(row.calls for row in answer.totals) == 4


async def test_admin_lists_calls_and_provider_health(accounts_stack):
    _gateway, bridge, _secrets = accounts_stack
    async with client(bridge, ADMIN_TOKEN) as admin:
        calls = (await admin.get("/admin/calls", params={"owner": "user:alice", "page_size": 2})).json()
        everyone = (await admin.get("/admin/calls")).json()
        health = (await admin.get("/admin/health")).json()
        too_long = await admin.get("/admin/health", params={"window_minutes": 100000})
        negative = await admin.get("/admin/health", params={"window_minutes": -5})
        as_key = await admin.get("/admin/health", headers={"authorization": f"Bearer {_secrets['alice']}"})
    assert len(calls["calls"]) == 2 and calls["next_page_token"]
    assert len(everyone["calls"]) == 4
    rows = {row["deployment"]: row for row in health["deployments"]}
    assert health["window_minutes"] == 60
    assert rows["openai/error-500"]["resting"] is True and rows["openai/error-500"]["rest_seconds_left"] > 60
    assert rows["openai/error-500"]["errors"] == 1
    assert rows["openai/gpt-4o-mini"] == {
        "deployment": "openai/gpt-4o-mini",
        "provider": "openai",
        "resting": False,
        "rest_seconds_left": 0,
        "calls": 3,
        "errors": 0,
        "resting_credentials": [],  # no stored credential rests
    }
    for refused in (too_long, negative):
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "window_minutes"
    assert as_key.status_code == 401


async def test_admin_usage_takes_a_day_range(accounts_stack):
    # `since`/`until` are UTC days: they used to reach the database as naive times,
    # which it refuses (INTERNAL).
    _gateway, bridge, _secrets = accounts_stack
    async with client(bridge, ADMIN_TOKEN) as admin:
        today = (await admin.get("/admin/usage", params={"since": "2020-01-01", "group_by": "owner"})).json()
        before = (await admin.get("/admin/usage", params={"until": "2020-01-01"})).json()
    assert {row["owner"]: row["calls"] for row in today["totals"]} == {"user:alice": 4}
    assert before["totals"][0]["calls"] == 0


async def test_an_account_with_many_keys_is_read_in_as_many_queries_as_one_with_few(accounts_stack):
    """GET /account lists each key's limits: read for all keys at once, not three
    queries per key (1000 keys were 3000 queries)."""
    gateway, bridge, _ = accounts_stack
    accounts = gateway.accounts
    owner = await ensure_owner(accounts.db, "user", "carol")
    _, secret = await accounts.keys.create_key(owner.id, "carol-0")
    store = accounts.limiter.store

    async def read_account() -> tuple[dict, int]:
        with count_queries(accounts.db) as queries:
            async with client(bridge, secret) as carol:
                answer = await carol.get("/account")
        assert answer.status_code == 200, answer.text
        return answer.json(), len(queries)

    created = []
    for index in range(1, 4):
        key, _ = await accounts.keys.create_key(owner.id, f"carol-{index}")
        created.append(key.id)
    await store.set(LimitRule("key", created[0], "*", rpm=7))
    await read_account()  # the caller's key is looked up (and cached) on its first call
    few, few_queries = await read_account()
    for index in range(4, 40):
        key, _ = await accounts.keys.create_key(owner.id, f"carol-{index}")
        created.append(key.id)
    await store.set(LimitRule("key", created[-1], "openai/*", rpm=9))
    await store.set(LimitRule("key", created[-1], "*", concurrency=2))
    many, many_queries = await read_account()
    assert len(few["keys"]) == 4 and len(many["keys"]) == 40
    assert many_queries == few_queries, (few_queries, many_queries)
    rules = {(r["key_id"], r["model"]): r for r in many["limits"] if r["source"] == "rule"}
    assert set(rules) == {(created[0], "*"), (created[-1], "*"), (created[-1], "openai/*")}
    assert (rules[(created[0], "*")]["rpm"], rules[(created[-1], "*")]["concurrency"]) == ("7", "2")
    assert [r["model"] for r in many["limits"] if r.get("key_id") == created[-1]] == ["*", "openai/*"]
