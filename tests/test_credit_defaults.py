"""The config file's credit limits for every key (`limits: {default_key: {daily_credits: X,
monthly_credits: X}}`): enforced like a key's own rule for all models, replaced kind by kind by such a
rule, added to by a narrower one, listed by `limits show` as `source: config`, and a
bad value stops the start with a message naming the field.

Real gRPC server, Envoy and the `aigne-hub` CLI against the fake OpenAI upstream; "now"
is set through `CreditService.clock` (the pricing and charges of tests/test_credit_windows.py).
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
import yaml
from pydantic import ValidationError

from server.app import Gateway, start_gateway
from server.config import GatewayConfig, Settings
from server.limits.rules import LimitRule
from server.limits.windows import CreditWindow, WindowSpend
from tests.conftest import Bridge, gateway_config, start_bridge
from tests.fakes.openai_upstream import FakeOpenAI
from tests.helpers import error_info
from tests.test_credit_windows import (
    CHARGE,
    CREDIT,
    LATE,
    NOON,
    RATE,
    _at,
    _chats,
    _cli,
    _funded_key,
    _limit,
    _served,
    _spend,
    upstream,  # noqa: F401 - the module's fake upstream
)


def _config(fake: FakeOpenAI, default_key: dict[str, Any]) -> GatewayConfig:
    limits = GatewayConfig.model_validate({"limits": {"default_key": default_key}}).limits
    return gateway_config(fake.base_url).model_copy(update={"limits": limits})


async def _gateway(url: str, config: GatewayConfig, now: datetime) -> Gateway:
    gateway = await start_gateway(
        Settings(grpc_port=0, database_url=url, billing_enabled=True, key_cache_ttl_s=0), config
    )
    await gateway.accounts.credits.set_rate(RATE)
    gateway.accounts.credits.clock = _at(now)  # type: ignore[assignment]
    return gateway


async def test_a_configured_daily_credit_limit_refuses_past_it_with_429_and_retry_after(
    upstream: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    # 5 credits a day: one call (reserves 4, charged 2.1), then 2.1 + 4 > 5.
    config = _config(upstream, {"daily_credits": 5})
    gateway = await _gateway(f"sqlite:///{tmp_path / 'hub.db'}", config, LATE)
    bridge: Bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        _, key, secret = await _funded_key(gateway)
        body = {"model": "openai/gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        async with httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {secret}"}) as rest:
            first = await rest.post("/v1/chat/completions", json=body)
            assert first.status_code == 200, first.text
            refused = await rest.post("/v1/chat/completions", json=body)
        assert refused.status_code == 429, refused.text
        assert refused.headers["retry-after"] == "90", "the real wait until midnight UTC"
        error = refused.json()["error"]
        assert error["code"] == "RATE_LIMITED"
        assert "credit limit reached: 5 credits per UTC day on this key" in error["message"]
        window = CreditWindow("key", key, "*", "daily_credits", 5 * CREDIT)
        assert await _spend(gateway.accounts.db, window, LATE) == WindowSpend(CHARGE, 0)
        records = await gateway.accounts.ledger.records(key_id=key)
        assert sorted((r.outcome, r.error_reason or "") for r in records) == [("error", "RATE_LIMITED"), ("ok", "")]
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)


async def test_a_keys_own_rule_replaces_the_default_and_a_narrower_one_adds_to_it(
    upstream: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    # 7 credits a day serves two calls one at a time, 11 serves four, 5 serves one.
    defaults = {"daily_credits": 7, "monthly_credits": 1000}
    gateway = await _gateway(url, _config(upstream, defaults), NOON)
    try:
        _, plain, plain_secret = await _funded_key(gateway)
        _, own, own_secret = await _funded_key(gateway)
        _, narrow, narrow_secret = await _funded_key(gateway)
        await _limit(gateway, LimitRule("key", own, "*", daily_credits_micros=11 * CREDIT))
        await _limit(gateway, LimitRule("key", narrow, "openai/gpt-4o-mini", daily_credits_micros=5 * CREDIT))

        served, refused = _served(await _serial(gateway, plain_secret, 3))
        assert served == 2 and refused[0].code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        info = error_info(refused[0])
        assert (info.metadata["scope"], info.metadata["limit_kind"], info.metadata["limit"]) == (
            "key",
            "daily_credits",
            "7",
        )
        assert info.metadata["model"] == "*"

        served, _ = _served(await _serial(gateway, own_secret, 5))
        assert served == 4, "the key's own rule for all models replaces the default"

        served, refused = _served(await _serial(gateway, narrow_secret, 2))
        assert served == 1 and error_info(refused[0]).metadata["model"] == "openai/gpt-4o-mini"
        served, refused = _served(await _serial(gateway, narrow_secret, 2, "openai/gpt-4o"))
        assert served == 1, "the default still holds beside a narrower rule: 2.1 + 2.1 + 4 > 7"
        assert (error_info(refused[0]).metadata["model"], error_info(refused[0]).metadata["limit"]) == ("*", "7")

        # `limits show` lists the default where it applies, marked as the config's.
        config_file = tmp_path / "gateway.yaml"
        config_file.write_text(yaml.safe_dump({"limits": {"default_key": defaults}}))
        env = {**os.environ, "AIGNE_HUB_DATABASE_URL": url, "AIGNE_HUB_CONFIG": str(config_file)}
        code, stdout, stderr = await _cli(env, "limits", "show", "--key", plain, "--json")
        assert code == 0, stderr
        [row] = json.loads(stdout)
        assert (row["source"], row["subject"], row["model"]) == ("config", plain, "*")
        assert (row["daily_credits"], row["daily_spent"], row["monthly_credits"]) == (
            "7.000000",
            "4.200000",
            "1000.000000",
        )
        code, stdout, _ = await _cli(env, "limits", "show", "--key", own, "--json")
        # Its own rule sets the daily credits: the default monthly credits still hold.
        assert [(r["source"], r["daily_credits"], r["monthly_credits"]) for r in json.loads(stdout)] == [
            ("rule", "11.000000", None),
            ("config", None, "1000.000000"),
        ]
        code, stdout, _ = await _cli(env, "limits", "show", "--key", narrow, "--json")
        assert sorted((r["source"], r["model"]) for r in json.loads(stdout)) == [
            ("config", "*"),
            ("rule", "openai/gpt-4o-mini"),
        ]
        code, stdout, _ = await _cli(env, "limits", "show")
        lines = stdout.splitlines()
        assert "source" in lines[0].split()
        assert [line.split()[:3] for line in lines if line.rstrip().endswith("config")] == [["key", "*", "*"]]
    finally:
        await gateway.stop(0.5)


async def test_an_owner_default_holds_across_its_keys_unless_the_owner_has_its_own_rule(
    upstream: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    gateway = await _gateway(url, _config_owner(upstream, {"daily_credits": 7}), NOON)
    try:
        owner, _, first = await _funded_key(gateway)
        _, _, second = await _funded_key(gateway, owner)
        served = [_served(await _chats(gateway.port, secret, 1))[0] for secret in (first, second, first, second)]
        assert served == [1, 1, 0, 0], "7 credits a day for the owner's keys together"
        info = error_info(_served(await _chats(gateway.port, second, 1))[1][0])
        assert (info.metadata["scope"], info.metadata["limit"], info.metadata["model"]) == ("owner", "7", "*")
        other, _, own = await _funded_key(gateway)
        await _limit(gateway, LimitRule("owner", other, "*", daily_credits_micros=11 * CREDIT))
        assert _served(await _serial(gateway, own, 5))[0] == 4, "the owner's own rule replaces the default"

        config_file = tmp_path / "gateway.yaml"
        config_file.write_text(yaml.safe_dump({"limits": {"default_owner": {"daily_credits": 7}}}))
        env = {**os.environ, "AIGNE_HUB_DATABASE_URL": url, "AIGNE_HUB_CONFIG": str(config_file)}
        code, stdout, stderr = await _cli(env, "limits", "show", "--owner", owner, "--json")
        assert code == 0, stderr
        [row] = json.loads(stdout)
        assert (row["source"], row["scope"], row["subject"]) == ("config", "owner", owner)
        assert (row["daily_credits"], row["daily_spent"]) == ("7.000000", "4.200000")
        code, stdout, _ = await _cli(env, "limits", "show", "--owner", other, "--json")
        assert [r["source"] for r in json.loads(stdout)] == ["rule"]
    finally:
        await gateway.stop(0.5)


def _config_owner(fake: FakeOpenAI, default_owner: dict[str, Any]) -> GatewayConfig:
    limits = GatewayConfig.model_validate({"limits": {"default_owner": default_owner}}).limits
    return gateway_config(fake.base_url).model_copy(update={"limits": limits})


async def _serial(gateway: Gateway, secret: str, calls: int, model: str = "openai/gpt-4o-mini") -> list[object]:
    """`calls` chat calls one after another (so each sees the previous one's charge)."""
    return [result for _ in range(calls) for result in await _chats(gateway.port, secret, 1, model)]


@pytest.mark.parametrize(
    ("default_key", "named"),
    [
        ({"daily_credits": -1}, "limits.default_key.daily_credits"),
        ({"monthly_credits": "lots"}, "limits.default_key.monthly_credits"),
        ({"daily_credits": 0}, "limits.default_key.daily_credits"),
        ({"monthly_credits": True}, "limits.default_key.monthly_credits"),
        ({"daily_credits": ".nan"}, "limits.default_key.daily_credits"),
        ({"rpm": -5}, "limits.default_key.rpm"),
        ({"weekly_credits": 5}, "limits.default_key.weekly_credits"),
    ],
    ids=["negative", "non-numeric", "zero", "boolean", "nan", "negative-rpm", "unknown"],
)
async def test_a_bad_default_stops_the_start_with_a_message_naming_the_field(
    tmp_path: Path, default_key: dict[str, Any], named: str
) -> None:
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text(yaml.safe_dump({"limits": {"default_key": default_key, "default_owner": {"rpm": 5}}}))
    env = {
        **os.environ,
        "AIGNE_HUB_DATABASE_URL": f"sqlite:///{tmp_path / 'hub.db'}",
        "AIGNE_HUB_CONFIG": str(config_file),
        "AIGNE_HUB_GRPC_PORT": "0",
    }
    code, _, stderr = await _cli(env, "grpc")
    assert code == 2, stderr
    assert f"config file {config_file} is invalid" in stderr and named in stderr, stderr
    assert "Traceback" not in stderr
    code, _, stderr = await _cli(env, "limits", "show")
    assert code != 0 and named in stderr, stderr


def test_a_bad_owner_default_names_its_field() -> None:
    with pytest.raises(ValidationError, match=r"limits\.default_owner\.monthly_credits"):
        GatewayConfig.model_validate({"limits": {"default_owner": {"monthly_credits": -3}}})


async def test_the_admin_and_account_apis_list_the_config_defaults_where_they_apply(
    upstream: FakeOpenAI,  # noqa: F811
    tmp_path: Path,
) -> None:
    # Defaults for every key (rpm, daily credits) and every owner (concurrency).
    limits = GatewayConfig.model_validate(
        {"limits": {"default_key": {"rpm": 50, "daily_credits": 7}, "default_owner": {"concurrency": 4}}}
    ).limits
    config = gateway_config(upstream.base_url).model_copy(update={"limits": limits})
    admin_token = "limits-admin-" + "x" * 32
    settings = Settings(
        grpc_port=0,
        database_url=f"sqlite:///{tmp_path / 'hub.db'}",
        billing_enabled=True,
        key_cache_ttl_s=0,
        admin_token=admin_token,
    )
    gateway = await start_gateway(settings, config)
    await gateway.accounts.credits.set_rate(RATE)
    gateway.accounts.credits.clock = _at(NOON)  # type: ignore[assignment]
    bridge: Bridge = await start_bridge(gateway.port, tmp_path / "envoy")
    try:
        owner, plain, plain_secret = await _funded_key(gateway)
        _, own, _ = await _funded_key(gateway, owner)
        await _limit(gateway, LimitRule("key", own, "*", rpm=5))  # replaces the default rpm only
        assert _served(await _chats(gateway.port, plain_secret, 1))[0] == 1
        headers = {"authorization": f"Bearer {admin_token}"}
        async with httpx.AsyncClient(base_url=bridge.rest_url, headers=headers) as admin:

            async def listed(**params: str) -> list[dict[str, Any]]:
                answer = await admin.get("/admin/limits", params=params)
                assert answer.status_code == 200, answer.text
                return list(answer.json()["limits"])

            [default] = await listed(key_id=plain)
            assert (default["source"], default["key_id"], default["model"]) == ("config", plain, "*")
            assert (default["rpm"], default["daily_credits"], default["daily_credits_spent"]) == (
                "50",
                "7.000000",
                "2.100000",
            ), "the default is counted under the key's id, with its spend"
            assert "update_time" not in default
            rule, default = await listed(key_id=own)
            assert (rule["source"], rule["rpm"], rule.get("daily_credits", "")) == ("rule", "5", "")
            assert (default["source"], "rpm" in default, default["daily_credits"]) == ("config", False, "7.000000")
            [owner_default] = await listed(owner=owner)
            assert (owner_default["source"], owner_default["owner"], owner_default["concurrency"]) == (
                "config",
                owner,
                "4",
            )
            assert await listed(key_id="nosuchkey") == [], "no default is listed for a key that does not exist"
            await _limit(gateway, LimitRule("owner", owner, "openai/*", rpm=9))  # beside the owner's default
            every = await listed()
            assert [(r["source"], r.get("key_id", ""), r.get("owner", "")) for r in every[-2:]] == [
                ("config", "*", ""),
                ("config", "", "*"),
            ], "after the rules, the defaults for every key and every owner"
            assert [r["source"] for r in every[:-2]] == ["rule", "rule"]
            # Paged: the defaults come on the last page only.
            first = (await admin.get("/admin/limits", params={"page_size": 1})).json()
            assert [r["source"] for r in first["limits"]] == ["rule"] and first["next_page_token"]
            last = await listed(page_size="1", page_token=first["next_page_token"])
            assert [r["source"] for r in last] == ["rule", "config", "config"]
        # The owner's own view (GET /account) lists them too.
        async with httpx.AsyncClient(
            base_url=bridge.rest_url, headers={"authorization": f"Bearer {plain_secret}"}
        ) as account:
            mine = (await account.get("/account")).json()["limits"]
        shown = {(r["source"], r.get("key_id", ""), r.get("owner", "")) for r in mine}
        assert {("config", "", owner), ("config", plain, ""), ("config", own, ""), ("rule", own, "")} <= shown
    finally:
        await bridge.envoy.stop()
        await gateway.stop(0.5)
