"""The web dashboard at /ui/ in a real browser: Debian's Chromium driven by
playwright-core (tests/ui/dashboard.mjs) against the real gateway and Envoy, with
usage made by real calls through the fake OpenAI upstream.

Each test runs one scenario of the Node driver, which prints what the page showed;
the numbers are compared with the ledger's. Every page the driver visits is checked
with axe-core (no serious or critical violation) and screenshotted at a laptop and a
phone width into `.artifacts/dashboard/` (the paths are printed). The static files'
headers (caching, Content-Security-Policy) are checked over plain HTTP.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import shutil
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest

from server.accounts.credits import rate_from_credits
from server.accounts.owners import ensure_owner
from server.app import start_gateway
from server.bridge.envoy_config import UI_DIST
from server.config import GatewayConfig, Settings
from tests.conftest import gateway_config, start_bridge

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "ui" / "dashboard.mjs"
ARTIFACTS = ROOT / ".artifacts" / "dashboard"
CHROMIUM = Path("/usr/lib/chromium/chromium")
ADMIN_TOKEN = "dash-admin-" + "a" * 32
OWNER = "user:dash"
HELLO = [{"role": "user", "content": "hello dashboard"}]

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and not os.environ.get("AIGNE_HUB_REQUIRE_CHROMIUM"),
    reason="Debian's chromium is not installed (make chromium)",
)


@pytest.fixture(scope="module")
async def stack(fake_openai, tmp_path_factory):
    settings = Settings(
        grpc_port=0,
        data_dir=tmp_path_factory.mktemp("dashboard-data"),
        admin_token=ADMIN_TOKEN,
        master_key=base64.b64encode(os.urandom(32)).decode(),
        billing_enabled=True,
        # Long enough for a browser to show a reservation while model "slow" is waited for.
        upstream_read_timeout_s=30.0,
    )
    # A monthly credit default for every key, listed beside the key's own rule as the config's.
    config = gateway_config(fake_openai.base_url)
    limits = GatewayConfig.model_validate({"limits": {"default_key": {"monthly_credits": 50}}}).limits
    gateway = await start_gateway(settings, config.model_copy(update={"limits": limits}))
    accounts = gateway.accounts
    # Prices that make every call cost something visible.
    await accounts.credits.set_rate(rate_from_credits("*", {"input_per_million": 100, "output_per_million": 200}))
    owner = await ensure_owner(accounts.db, "user", "dash")
    await accounts.credits.grant(owner.id, 10 * 10**6, "tests")
    key, secret = await accounts.keys.create_key(owner.id, "browser", spend_cap_micros=8 * 10**6)
    bridge = await start_bridge(gateway.port, tmp_path_factory.mktemp("dashboard-envoy"))
    async with httpx.AsyncClient(base_url=bridge.rest_url, headers={"authorization": f"Bearer {ADMIN_TOKEN}"}) as admin:
        limit = await admin.post("/admin/limits", json={"limit": {"key_id": key.id, "rpm": 600, "daily_credits": "3"}})
        assert limit.status_code == 200, limit.text
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0, timeout=20)
    for text in ("hello dashboard", "one two three four", "five six"):
        await client.chat.completions.create(model="openai/gpt-4o-mini", messages=[{"role": "user", "content": text}])
    await client.embeddings.create(model="openai/text-embedding-3-small", input="some words to embed")
    with pytest.raises(openai.PermissionDeniedError):  # a failed call (the provider refuses its key)
        await client.chat.completions.create(model="badkey/gpt-4o-mini", messages=HELLO)
    await client.close()
    yield gateway, bridge, secret
    await bridge.envoy.stop()
    await gateway.stop(0.5)


async def drive(scenario: str, bridge, secret: str, **env: str) -> dict:
    """Runs one scenario of the Node driver; its last output line is what it saw."""
    node = shutil.which("node")
    assert node, "node is needed for the browser tests"
    process = await asyncio.create_subprocess_exec(
        node,
        str(DRIVER),
        scenario,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={
            **os.environ,
            "HUB_URL": bridge.rest_url,
            "HUB_KEY": secret,
            "HUB_ADMIN_TOKEN": ADMIN_TOKEN,
            "ARTIFACTS": str(ARTIFACTS),
            "CHROMIUM": str(CHROMIUM),
            **env,
        },
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout=240)
    assert process.returncode == 0, err.decode()[-3000:]
    seen = json.loads(out.decode().strip().splitlines()[-1])
    assert "failure" not in seen, seen["failure"] + "\n" + err.decode()[-2000:]
    for path in seen["screenshots"]:
        print("screenshot:", path)
    assert not seen["csp_violations"], seen["csp_violations"]
    assert not seen["console_errors"], seen["console_errors"]
    assert "token_in_url" not in seen, "a token was put in a URL"
    assert all(not found for found in seen["axe"].values()), seen["axe"]
    assert screenshots_written(seen["screenshots"])
    return seen


def screenshots_written(paths: list[str]) -> bool:
    return bool(paths) and all(Path(p).stat().st_size > 5000 for p in paths)


def number(text: str) -> Decimal:
    return Decimal(text.replace(",", ""))


async def test_static_files_have_caching_headers_and_a_strict_csp(stack):
    _gateway, bridge, secret = stack
    index_html = (UI_DIST / "index.html").read_text()
    async with httpx.AsyncClient(base_url=bridge.rest_url) as client:
        index = await client.get("/ui/")
        bare = await client.get("/ui")
        bundle = next(p for p in (UI_DIST / "assets").iterdir() if p.suffix == ".js")
        asset = await client.get(f"/ui/assets/{bundle.name}")
        missing = await client.get("/ui/assets/nope.js")
        ledger = await client.get("/account")  # the API behind the page needs a key
        account = await client.get("/account", headers={"authorization": f"Bearer {secret}"})
    assert index.status_code == bare.status_code == 200 and index.text == index_html
    assert index.headers["content-type"].startswith("text/html")
    assert index.headers["cache-control"] == "no-cache"
    csp = index.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp and "frame-ancestors 'none'" in csp
    assert "<script>" not in index.text and 'type="module" crossorigin src="/ui/assets/' in index.text
    assert asset.status_code == 200 and asset.content == bundle.read_bytes()
    assert asset.headers["content-type"].startswith("text/javascript")
    assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
    # The files are gzipped for clients that accept it (httpx does); the API's JSON is not.
    assert asset.headers["content-encoding"] == "gzip" and "accept-encoding" in asset.headers["vary"].lower()
    assert account.status_code == 200 and "content-encoding" not in account.headers
    assert missing.status_code == 404
    assert ledger.status_code == 401


async def test_owner_sees_the_usage_the_ledger_has(stack):
    gateway, bridge, secret = stack
    seen = await drive("owner", bridge, secret)
    ledger = gateway.accounts.ledger
    [total] = await ledger.totals(owner_id=OWNER)
    assert total.calls == 5 and total.errors == 1 and total.credits_micros > 0
    assert seen["totals"] == {
        "calls": str(total.calls),
        "errors": str(total.errors),
        "input": f"{total.input_tokens:,}",
        "output": f"{total.output_tokens:,}",
        "credits": seen["totals"]["credits"],
    }
    assert number(seen["totals"]["credits"]) == Decimal(total.credits_micros) / 10**6
    by_model = {row.model: row for row in await ledger.totals("model", owner_id=OWNER)}
    shown = {cells[0]: cells for cells in seen["by_model"]}
    assert set(shown) == set(by_model)
    for model, row in by_model.items():
        assert shown[model][1:5] == [str(row.calls), str(row.errors), f"{row.input_tokens:,}", f"{row.output_tokens:,}"]
        assert number(shown[model][5]) == Decimal(row.credits_micros) / 10**6
    [today] = await ledger.totals("day", owner_id=OWNER)
    assert [cells[0] for cells in seen["by_day"]] == [today.day.isoformat()]
    assert seen["by_day"][0][1] == str(today.calls)
    assert seen["chart_label"] == "Requests per UTC day (x: day, y: requests)"
    assert seen["credits_chart_label"] == "Credits per UTC day (x: day, y: credits)"
    balance = await gateway.accounts.credits.balance(OWNER)
    assert number(seen["balance"]) == Decimal(balance.balance_micros) / 10**6 < 10
    assert seen["signed_in_as"].startswith(OWNER)
    [key_row] = seen["owner_keys"]
    assert key_row[1:5] == ["browser", "active", "all", "8.00 credits"]
    limits = re.fullmatch(
        r"\*: 600 requests/min, 3\.00 credits/day \(([\d.]+) spent today\); "
        r"\*: 50\.00 credits/month \(([\d.]+) spent\) \(config default\)",
        key_row[5],
    )
    assert limits, key_row[5]
    assert number(limits[1]) == number(limits[2]) == Decimal(total.credits_micros) / 10**6
    assert len(seen["calls"]) == 5
    newest = seen["calls"][0]
    assert newest[1] == "badkey/gpt-4o-mini" and "error" in newest[3]
    assert "ok" in seen["calls"][1][3] and seen["calls"][1][2] == "embedding"
    assert "No calls in this range" in seen["empty_range"] and seen["empty_range_calls"] == "0"


async def test_owner_sees_the_reservation_of_a_call_in_flight(stack, fake_openai):
    gateway, bridge, secret = stack
    client = openai.AsyncOpenAI(base_url=f"{bridge.rest_url}/v1", api_key=secret, max_retries=0, timeout=40)
    # The call stays in flight while the browser starts and reads the page, however busy the machine.
    slow_seconds, fake_openai.slow_seconds = fake_openai.slow_seconds, 25.0
    slow = asyncio.create_task(client.chat.completions.create(model="openai/slow", messages=HELLO))
    try:
        for _ in range(100):
            held = await gateway.accounts.credits.list_reservations(OWNER)
            if held:
                break
            await asyncio.sleep(0.05)
        [reservation] = held
        seen = await drive("reservations", bridge, secret)
    finally:
        # The client gives up on the call: the gateway cancels it and releases the hold.
        slow.cancel()
        await asyncio.gather(slow, return_exceptions=True)
        fake_openai.slow_seconds = slow_seconds
        await client.close()
    [row] = seen["reservations"]
    assert number(row[1]) == Decimal(reservation.amount_micros) / 10**6 > 0
    assert row[2].startswith("ahk_")
    assert row[4] == ("next calls (block)" if reservation.is_block else "a call")
    assert number(seen["reserved"]) == Decimal(reservation.amount_micros) / 10**6


async def test_admin_creates_uses_revokes_a_key_and_grants_credits(stack):
    gateway, bridge, secret = stack
    seen = await drive(
        "admin", bridge, secret, HUB_NEW_OWNER="project:fresh", HUB_PROVIDER_SECRET="sk-dashboard-0123456789abcdef"
    )
    assert seen["signed_in_as"] == "administrator"
    assert seen["secret_prefix"] == "ahk_"
    # No credits yet: refused; granted: served; revoked: refused again.
    assert seen["before_grant"]["status"] == 429
    assert seen["before_grant"]["body"]["error"]["code"] == "INSUFFICIENT_CREDITS"
    assert "project:fresh now has 5.00 credits" in seen["granted"]
    assert seen["after_grant"]["status"] == 200
    balance = await gateway.accounts.credits.balance("project:fresh")
    assert number(seen["new_owner_balance"]) == Decimal(balance.balance_micros) / 10**6 < 5
    assert seen["after_revoke"]["status"] == 401
    assert seen["after_revoke"]["body"]["error"]["code"] == "KEY_REVOKED"
    # The provider credential is listed masked only, then removed.
    [credential] = seen["credentials"]
    assert credential[0] == "openai" and credential[1] == "from-dashboard" and "active" in credential[3]
    assert "sk-dashboard-0123456789abcdef" not in seen["credentials_page_text"]
    assert "No stored credentials" in seen["credentials_after_remove"]
    # Health: the deployments that served calls, with their errors from the ledger.
    health = {row["deployment"]: row for row in seen["health"]}
    assert health["badkey/gpt-4o-mini"]["errors"] == "1" and health["badkey/gpt-4o-mini"]["calls"] == "1"
    # The refusal for want of credits is not the provider's error.
    assert health["openai/gpt-4o-mini"]["calls"] == "4" and health["openai/gpt-4o-mini"]["errors"] == "0"
    assert "serving" in health["openai/gpt-4o-mini"]["state"]
    # The calls page keeps the owner chosen on the accounts page.
    [fresh] = await gateway.accounts.ledger.totals(owner_id="project:fresh")
    assert seen["admin_calls"] == fresh.calls == 2


async def test_a_wrong_token_shows_an_error_and_reveals_nothing(stack):
    _gateway, bridge, secret = stack
    seen = await drive("wrong", bridge, secret)
    assert "401" in seen["key_error"] and "is not valid" in seen["key_error"]
    assert "401" in seen["admin_error"] and "wrong admin token" in seen["admin_error"]
    for name in ("key", "admin"):
        assert seen[f"{name}_nav"] == 0 and seen[f"{name}_storage"] == 0
        # The page is the sign-in page as it was, plus the error.
        without_error = seen[f"{name}_body"].replace(seen[f"{name}_error"], "")
        assert without_error.split() == seen["pristine"].split()


async def test_the_dashboard_works_with_the_keyboard(stack):
    _gateway, bridge, secret = stack
    seen = await drive("keyboard", bridge, secret)
    assert seen["first_focus"] == "token", "the token field comes first"
    assert "Usage" in seen["tab_order"] and seen["focus_outline"] != "none"
    assert seen["focused_after_nav"] == "page-title", "a new page moves focus to its heading"
    assert seen["url"].endswith("/ui/#/usage")
