"""Provider credentials: encrypted at rest, masked, rotated, taken out on failure."""

from __future__ import annotations

import base64
import logging

import pytest
from sqlalchemy import select, update

from server.accounts import (
    CredentialVault,
    MasterKeyError,
    generate_master_key,
    load_master_key,
    mask_secret,
)
from server.errors import ProviderNotConfigured
from server.storage import Database
from server.storage.schema import provider_credentials
from tests.storage_fixtures import database_url, db  # noqa: F401

SECRET = "sk-proj-Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2Rl"
MASTER = load_master_key(generate_master_key())


async def test_secret_is_encrypted_at_rest_and_masked(db: Database, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.DEBUG)
    vault = CredentialVault(db, MASTER)
    info = await vault.add("openai", SECRET, label="primary")
    assert info.masked == "sk-...Y2Rl" == f"sk-...{SECRET[-4:]}"
    assert SECRET not in repr(info)

    async with db.read() as conn:
        row = (await conn.execute(select(provider_credentials))).one()
    raw = b"".join(v if isinstance(v, bytes) else str(v).encode() for v in row)
    assert SECRET.encode() not in raw and SECRET[8:24].encode() not in raw
    assert len(row.nonce) == 12 and len(row.ciphertext) == len(SECRET) + 16

    listed = await vault.list_credentials()
    assert [(c.provider, c.label, c.masked, c.status) for c in listed] == [("openai", "primary", info.masked, "active")]
    revealed = await vault.reveal(info.id)
    assert revealed.secret == SECRET
    assert SECRET not in repr(revealed) and SECRET not in str(revealed)
    assert SECRET not in caplog.text

    # A fresh random nonce every time: the same secret never encrypts the same way.
    other = await vault.add("openai", SECRET)
    async with db.read() as conn:
        rows = (await conn.execute(select(provider_credentials.c.nonce, provider_credentials.c.ciphertext))).all()
    assert rows[0] != rows[1]
    assert await vault.remove(other.id) and not await vault.remove(other.id)


async def test_wrong_master_key_fails_clearly(db: Database) -> None:  # noqa: F811
    info = await CredentialVault(db, MASTER).add("openai", SECRET)
    stranger = CredentialVault(db, load_master_key(generate_master_key()))
    with pytest.raises(MasterKeyError, match=r"another master key.*AIGNE_HUB_MASTER_KEY changed"):
        await stranger.reveal(info.id)
    with pytest.raises(MasterKeyError):
        await stranger.select("openai")


async def test_tampering_is_detected(db: Database) -> None:  # noqa: F811
    vault = CredentialVault(db, MASTER)
    a = await vault.add("openai", SECRET)
    b = await vault.add("anthropic", "sk-ant-" + "q" * 40)
    async with db.write() as conn:
        row = (await conn.execute(select(provider_credentials).where(provider_credentials.c.id == b.id))).one()
        # Move anthropic's ciphertext onto the openai row: the associated data no longer matches.
        await conn.execute(
            update(provider_credentials)
            .where(provider_credentials.c.id == a.id)
            .values(nonce=row.nonce, ciphertext=row.ciphertext)
        )
    with pytest.raises(MasterKeyError, match="tampered"):
        await vault.reveal(a.id)
    assert (await vault.reveal(b.id)).secret.startswith("sk-ant-")


async def test_round_robin_and_mark_invalid(db: Database) -> None:  # noqa: F811
    vault = CredentialVault(db, MASTER, cache_ttl_s=60)
    with pytest.raises(ProviderNotConfigured):
        await vault.select("openai")
    ids = [(await vault.add("openai", f"sk-key-number-{i}-abcdefgh")).id for i in range(3)]
    await vault.add("anthropic", "sk-ant-only-one-abcdefgh")

    picks = [(await vault.select("openai")).id for _ in range(6)]
    assert picks == ids + ids

    await vault.mark_invalid(ids[1], "upstream answered 401")
    picks = {(await vault.select("openai")).id for _ in range(6)}
    assert picks == {ids[0], ids[2]}
    listed = {c.id: c for c in await vault.list_credentials("openai")}
    assert listed[ids[1]].status == "invalid" and listed[ids[1]].invalid_reason == "upstream answered 401"

    await vault.mark_invalid(ids[0], "401")
    await vault.mark_invalid(ids[2], "401")
    with pytest.raises(ProviderNotConfigured, match="no active credential"):
        await vault.select("openai")
    await vault.mark_active(ids[2])
    assert (await vault.select("openai")).id == ids[2]
    assert (await vault.select("anthropic")).secret == "sk-ant-only-one-abcdefgh"
    with pytest.raises(KeyError):
        await vault.mark_invalid("nope", "x")


def test_master_key_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AIGNE_HUB_MASTER_KEY", raising=False)
    with pytest.raises(MasterKeyError, match="not set"):
        load_master_key()
    with pytest.raises(MasterKeyError, match="base64"):
        load_master_key("not base64!!")
    with pytest.raises(MasterKeyError, match="32 bytes"):
        load_master_key(base64.b64encode(b"short").decode())
    key = generate_master_key()
    monkeypatch.setenv("AIGNE_HUB_MASTER_KEY", key)
    assert load_master_key() == base64.b64decode(key)
    assert mask_secret("sk-abcdefghijklmnop") == "sk-...mnop"
    assert mask_secret("short") == "****"
