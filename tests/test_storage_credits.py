"""Credits: rates, atomic reservations under concurrency, settlement, caps, billing off."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from server.accounts import (
    CreditService,
    InsufficientCredits,
    KeyStore,
    Ledger,
    ModelNotAllowed,
    Rate,
    SpendingCapReached,
    Usage,
    UsageRecord,
    cost_of,
    credits_to_micros,
    ensure_owner,
)
from server.accounts.errors import QuotaExceeded
from server.storage import Database
from server.storage.schema import api_keys, credit_grants, reservations, utcnow
from tests.storage_fixtures import database_url, db, open_replica  # noqa: F401

CREDIT = 1_000_000


async def _owner(db: Database, name: str = "acme") -> str:  # noqa: F811
    return (await ensure_owner(db, "project", name)).id


async def _key_row(db: Database, key_id: str) -> tuple[int, int]:  # noqa: F811
    async with db.read() as conn:
        row = (await conn.execute(select(api_keys).where(api_keys.c.id == key_id))).one()
    return row.spent_micros, row.reserved_micros


async def _attempt(credits: CreditService, owner: str, amount: int, key_id: str | None = None) -> object:
    try:
        return await credits.reserve(owner, amount, key_id=key_id)
    except QuotaExceeded as exc:
        return exc


async def test_fifty_concurrent_reservations_never_overdraw(database_url: str, db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits = CreditService(db, billing_enabled=True)
    await credits.grant(owner, 10 * CREDIT, "starter")
    replica = await open_replica(database_url)  # half the calls arrive at another replica
    try:
        other = CreditService(replica, billing_enabled=True)
        results = await asyncio.gather(*(_attempt(credits if i % 2 else other, owner, CREDIT) for i in range(50)))
    finally:
        await replica.close()
    held = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(held) == 10 and len(refused) == 40
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros, balance.available_micros) == (10 * CREDIT, 10 * CREDIT, 0)
    assert refused[0].reason == "INSUFFICIENT_CREDITS"
    assert "0.000000 available" in refused[0].message and "needs up to 1.000000" in refused[0].message
    assert refused[0].metadata == {"available_credits": "0.000000", "needed_credits": "1.000000"}

    # Each call cost 0.4: settling charges that and releases the rest.
    charged = await asyncio.gather(*(credits.settle(r, 400_000) for r in held))  # type: ignore[arg-type]
    assert charged == [400_000] * 10
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (6 * CREDIT, 0)
    assert balance.balance_micros >= 0
    # Settling again (a retry) charges nothing.
    assert await credits.settle(held[0], 400_000) == 0  # type: ignore[arg-type]
    assert (await credits.balance(owner)).balance_micros == 6 * CREDIT


async def test_many_concurrent_calls_with_random_costs_keep_the_books_exact(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits = CreditService(db, billing_enabled=True)
    ledger = Ledger(db)
    await credits.grant(owner, 7 * CREDIT)

    async def call(i: int) -> None:
        try:
            held = await credits.reserve(owner, 900_000, request_id=f"c{i}")
        except InsufficientCredits:
            return
        await asyncio.sleep(0.001 * (i % 5))
        await ledger.record(
            UsageRecord(f"c{i}", "openai", "openai/x", owner_id=owner, cost_micros=i * 7919 % 900_001), reservation=held
        )

    await asyncio.gather(*(call(i) for i in range(60)))
    balance = await credits.balance(owner)
    (total,) = await ledger.totals(owner_id=owner)
    assert balance.reserved_micros == 0 and balance.balance_micros >= 0
    assert balance.balance_micros == 7 * CREDIT - total.credits_micros
    async with db.read() as conn:
        granted = (await conn.execute(select(func.sum(credit_grants.c.amount_micros)))).scalar_one()
        open_holds = (await conn.execute(select(func.count()).select_from(reservations))).scalar_one()
    assert int(granted) - total.credits_micros == balance.balance_micros
    assert open_holds == 0


async def test_release_gives_everything_back(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits = CreditService(db, billing_enabled=True)
    await credits.grant(owner, 5 * CREDIT)
    held = await credits.reserve(owner, 5 * CREDIT)
    with pytest.raises(InsufficientCredits):
        await credits.reserve(owner, 1)
    await credits.release(held)
    balance = await credits.balance(owner)
    assert (balance.balance_micros, balance.reserved_micros) == (5 * CREDIT, 0)


async def test_unknown_owner_has_nothing(db: Database) -> None:  # noqa: F811
    credits = CreditService(db, billing_enabled=True)
    owner = await _owner(db, "poor")
    with pytest.raises(InsufficientCredits, match=r"0\.000000 available.*needs up to 2\.500000"):
        await credits.reserve(owner, 2_500_000)
    assert (await credits.balance(owner)).available_micros == 0


async def test_key_spending_cap_is_enforced_atomically(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    key, _ = await KeyStore(db).create_key(owner, "capped", spend_cap_micros=3 * CREDIT)
    credits = CreditService(db, billing_enabled=True)
    await credits.grant(owner, 100 * CREDIT)
    results = await asyncio.gather(*(_attempt(credits, owner, CREDIT, key.id) for _ in range(20)))
    held = [r for r in results if not isinstance(r, BaseException)]
    capped = [r for r in results if isinstance(r, SpendingCapReached)]
    assert len(held) == 3 and len(capped) == 17
    assert capped[0].reason == "SPENDING_CAP_REACHED" and "leaves 0.000000" in capped[0].message
    # The refused calls' balance holds were rolled back with them.
    assert (await credits.balance(owner)).reserved_micros == 3 * CREDIT
    assert await _key_row(db, key.id) == (0, 3 * CREDIT)

    for reservation in held:
        await credits.settle(reservation, CREDIT // 2)  # type: ignore[arg-type]
    assert await _key_row(db, key.id) == (3 * CREDIT // 2, 0)
    more = await asyncio.gather(*(_attempt(credits, owner, CREDIT, key.id) for _ in range(5)))
    assert sum(not isinstance(r, BaseException) for r in more) == 1  # 1.5 left: one more call

    # The owner's other keys are not limited by this key's cap.
    free_key, _ = await KeyStore(db).create_key(owner, "uncapped")
    assert not isinstance(await _attempt(credits, owner, 10 * CREDIT, free_key.id), BaseException)


async def test_billing_off_charges_nothing_but_records_usage(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits = CreditService(db)  # the default
    assert not credits.billing_enabled
    await credits.set_rate(Rate("openai/*", input_per_million_micros=2 * CREDIT))
    held = await credits.reserve(owner, 10**12)  # no balance at all, still fine
    assert held.id is None and held.amount_micros == 0
    cost = await credits.price("openai/gpt-4o", Usage(input_tokens=1_000_000))
    assert cost == 2 * CREDIT
    assert await credits.price("unpriced/model", Usage(input_tokens=10)) == 0
    ledger = Ledger(db)
    recorded = await ledger.record(
        UsageRecord("free", "openai", "openai/gpt-4o", owner_id=owner, input_tokens=10**6, cost_micros=cost),
        reservation=held,
    )
    assert recorded.inserted and recorded.credits_micros == 0
    stored = await ledger.get("free")
    assert stored is not None and stored.cost_micros == 2 * CREDIT and stored.credits_micros == 0
    assert (await credits.balance(owner)).balance_micros == 0
    assert await credits.settle(held, 5) == 0


async def test_rates_and_prices(db: Database) -> None:  # noqa: F811
    credits = CreditService(db, billing_enabled=True, rates_cache_ttl_s=0)
    await credits.set_rate(Rate("*", input_per_million_micros=1))
    await credits.set_rate(Rate("openai/*", input_per_million_micros=5 * CREDIT, output_per_million_micros=15 * CREDIT))
    await credits.set_rate(
        Rate(
            "openai/gpt-4o",
            input_per_million_micros=2_500_000,
            output_per_million_micros=10 * CREDIT,
            cached_input_per_million_micros=1_250_000,
        )
    )
    await credits.set_rate(Rate("openai/dall-e-3", per_image_micros=40_000))
    await credits.set_rate(Rate("openai/whisper-1", per_audio_second_micros=100))
    await credits.set_rate(Rate("openai/tts-1", per_character_micros=15))

    gpt4o = await credits.price(
        "openai/gpt-4o", Usage(input_tokens=1_000_000, cached_tokens=400_000, output_tokens=1000)
    )
    assert gpt4o == 600_000 * 2_500_000 // CREDIT + 400_000 * 1_250_000 // CREDIT + 10_000
    assert await credits.price("openai/gpt-4o-mini", Usage(input_tokens=1)) == 5  # the glob, rounded up
    assert await credits.price("mistral/large", Usage(input_tokens=3)) == 1  # "*" fallback, rounded up
    assert await credits.price("openai/dall-e-3", Usage(images=3)) == 120_000
    assert await credits.price("openai/whisper-1", Usage(audio_ms=61_500)) == 6150
    assert await credits.price("openai/tts-1", Usage(characters=1000)) == 15_000

    await credits.delete_rate("*")
    with pytest.raises(ModelNotAllowed, match="no price"):
        await credits.price("mistral/large", Usage(input_tokens=3))
    assert [r.model for r in await credits.list_rates()][:2] == ["openai/*", "openai/dall-e-3"]
    await credits.set_rate(Rate("openai/tts-1", per_character_micros=30))  # update in place
    assert await credits.price("openai/tts-1", Usage(characters=10)) == 300
    with pytest.raises(ValueError):
        await credits.set_rate(Rate("bad", input_per_million_micros=-1))


def test_cost_arithmetic_is_exact() -> None:
    rate = Rate("m", input_per_million_micros=3, output_per_million_micros=7, cached_input_per_million_micros=1)
    assert cost_of(rate, Usage()) == 0
    assert cost_of(rate, Usage(input_tokens=10**15, output_tokens=10**15)) == 10 * 10**9
    assert cost_of(rate, Usage(input_tokens=5, cached_tokens=50)) == 1  # cached clamped to input, rounded up
    assert credits_to_micros("12.345678") == 12_345_678
    assert credits_to_micros(0.1) == 100_000


async def test_grants_and_debits(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    credits = CreditService(db, billing_enabled=True)
    assert (await credits.grant(owner, 3 * CREDIT)).balance_micros == 3 * CREDIT
    held = await credits.reserve(owner, 2 * CREDIT)
    with pytest.raises(InsufficientCredits, match=r"only 1\.000000 available"):
        await credits.grant(owner, -2 * CREDIT, "refund")  # cannot take what calls hold
    assert (await credits.grant(owner, -CREDIT)).balance_micros == 2 * CREDIT
    await credits.settle(held, 2 * CREDIT)
    assert (await credits.balance(owner)).balance_micros == 0


async def test_expired_reservations_are_released(db: Database) -> None:  # noqa: F811
    owner = await _owner(db)
    key, _ = await KeyStore(db).create_key(owner, "k", spend_cap_micros=5 * CREDIT)
    credits = CreditService(db, billing_enabled=True, reservation_lease_s=60)
    await credits.grant(owner, 5 * CREDIT)
    stale = await credits.reserve(owner, 4 * CREDIT, key_id=key.id)
    assert await credits.release_expired() == 0
    # Its process died: the sweeper of another one releases it (no process sweeps its own).
    sweeper = CreditService(db, billing_enabled=True)
    assert await sweeper.release_expired() == 0
    assert await sweeper.release_expired(now=utcnow() + timedelta(seconds=61)) == 1
    assert (await credits.balance(owner)).reserved_micros == 0
    assert await _key_row(db, key.id) == (0, 0)
    assert await credits.settle(stale, CREDIT) == 0  # too late: nothing charged, logged
