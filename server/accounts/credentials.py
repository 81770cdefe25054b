"""Provider credentials, encrypted at rest and never shown in full.

Each secret is sealed with AES-256-GCM under the master key (AIGNE_HUB_MASTER_KEY,
base64 of 32 random bytes, from the environment — never from the database): a fresh
random 96-bit nonce per encryption, and associated data binding the ciphertext to its
provider and row, so a ciphertext copied onto another provider or row fails to open.
A fingerprint of the master key is stored alongside, so a changed master key is
reported as exactly that instead of as corruption.

Only a masked form (`sk-...abcd`) is ever listed, logged or returned; `Credential`,
the one object holding a decrypted secret, hides it from `repr`.

`active(provider)` lists the provider's active credentials from an in-process cache
(refreshed every `cache_ttl_s`): the router makes each one a deployment of the provider,
so balancing, cooldowns and retries apply per credential; `select(provider)` rotates
round-robin over them for a call that is not routed. While the database is down the
cache keeps serving the credentials last read; `mark_invalid` takes one out of
rotation (here at once, on other replicas within the TTL) and `mark_active` puts it
back. Who decides is `server.accounts.credential_checks` (a probe confirms a provider's
"invalid key" before a credential leaves rotation; invalid ones are re-checked), an
admin (`ActivateProviderCredential`, `aigne-hub credentials activate`), or both.

Where calls go is logged at WARNING once per change, not per call: when a credential
leaves rotation (to the provider's other active credentials, or to the key configured
for the provider when none is left), and when a provider whose stored credentials are
all invalid falls back to its configured key. An `invalid_reason` is redacted of
anything key-shaped, and every decrypted secret is registered with `server.redaction`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Literal, cast

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Row, delete, select, tuple_, update

from server.errors import ProviderNotConfigured, StorageUnavailable
from server.redaction import redact, register_secret
from server.storage.database import Database
from server.storage.schema import provider_credentials, utcnow

log = logging.getLogger(__name__)
MASTER_KEY_ENV = "AIGNE_HUB_MASTER_KEY"
_MAX_REASON_CHARS = 500
_AAD_LABEL = b"aigne-hub/provider-credential/v1"

CredentialStatus = Literal["active", "invalid"]


class MasterKeyError(Exception):
    """The master key is missing or malformed, or cannot open a stored credential."""


def load_master_key(value: str | None = None) -> bytes:
    """The 32-byte master key from `value` (default: $AIGNE_HUB_MASTER_KEY, base64)."""
    encoded = value if value is not None else os.environ.get(MASTER_KEY_ENV)
    if not encoded:
        raise MasterKeyError(f"{MASTER_KEY_ENV} is not set; generate one with generate_master_key()")
    try:
        key = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise MasterKeyError(f"{MASTER_KEY_ENV} is not valid base64") from exc
    if len(key) != 32:
        raise MasterKeyError(f"{MASTER_KEY_ENV} must be 32 bytes (base64), not {len(key)}")
    return key


def generate_master_key() -> str:
    """A new random master key, base64-encoded (what AIGNE_HUB_MASTER_KEY holds)."""
    return base64.b64encode(os.urandom(32)).decode()


def key_fingerprint(master_key: bytes) -> str:
    """16 hex digits identifying a master key without revealing it."""
    return hmac.new(master_key, b"aigne-hub master key fingerprint", hashlib.sha256).hexdigest()[:16]


def mask_secret(secret: str) -> str:
    """`sk-...abcd`: the first three and the last four characters, when long enough."""
    if len(secret) < 12:
        return "****"
    return f"{secret[:3]}...{secret[-4:]}"


@dataclass(frozen=True, slots=True)
class CredentialInfo:
    """A stored credential as listed: everything but the secret."""

    id: str
    provider: str
    label: str
    masked: str
    status: CredentialStatus
    invalid_reason: str | None
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class Credential:
    """A decrypted credential, for the adapter's request only. Never log `secret`."""

    id: str
    provider: str
    label: str
    masked: str
    secret: str = field(repr=False)

    def __str__(self) -> str:
        return f"{self.provider} credential {self.masked} ({self.id})"


@dataclass(frozen=True, slots=True)
class _Pool:
    """A provider's stored credentials as the cache holds them."""

    expires: float
    active: list[Credential]
    invalid: int  # stored but out of rotation

    @property
    def falls_back(self) -> bool:
        """All stored credentials are invalid: calls use the provider's configured key."""
        return self.invalid > 0 and not self.active


class CredentialVault:
    """Encrypted provider credentials: add, list (masked), remove, select, mark_invalid."""

    def __init__(self, db: Database, master_key: bytes, *, cache_ttl_s: float = 5.0) -> None:
        if len(master_key) != 32:
            raise MasterKeyError("the master key must be 32 bytes")
        self._db = db
        self._aead = AESGCM(master_key)
        self._fingerprint = key_fingerprint(master_key)
        self._ttl = cache_ttl_s
        self._pools: dict[str, _Pool] = {}
        self._turns: dict[str, itertools.count[int]] = {}
        # Per provider: whether its calls fell back to the configured key when last seen.
        self._falling_back: dict[str, bool] = {}

    async def add(self, provider: str, secret: str, *, label: str = "") -> CredentialInfo:
        if not provider or not secret:
            raise ValueError("a credential needs a provider and a secret")
        credential_id = uuid.uuid4().hex
        nonce = os.urandom(12)
        ciphertext = self._aead.encrypt(nonce, secret.encode(), _aad(provider, credential_id))
        now = utcnow()
        info = CredentialInfo(credential_id, provider, label, mask_secret(secret), "active", None, now, now)
        async with self._db.write() as conn:
            await conn.execute(
                provider_credentials.insert().values(
                    id=credential_id,
                    provider=provider,
                    label=label,
                    nonce=nonce,
                    ciphertext=ciphertext,
                    key_fingerprint=self._fingerprint,
                    masked=info.masked,
                    status="active",
                    created_at=now,
                    updated_at=now,
                )
            )
        self._pools.pop(provider, None)
        return info

    async def list_credentials(
        self,
        provider: str | None = None,
        *,
        after: tuple[str, datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[CredentialInfo]:
        """Stored credentials (of `provider`), masked, by provider and age; a page of
        `limit` of them after the one whose (provider, created_at, id) is `after`."""
        order = (provider_credentials.c.provider, provider_credentials.c.created_at, provider_credentials.c.id)
        query = select(provider_credentials).order_by(*order).limit(limit)
        if provider is not None:
            query = query.where(provider_credentials.c.provider == provider)
        if after is not None:
            query = query.where(tuple_(*order) > tuple_(*after))
        async with self._db.read() as conn:
            rows = (await conn.execute(query)).all()
        return [_info(row) for row in rows]

    async def remove(self, credential_id: str) -> bool:
        async with self._db.write() as conn:
            done = await conn.execute(
                delete(provider_credentials)
                .where(provider_credentials.c.id == credential_id)
                .returning(provider_credentials.c.provider)
            )
            provider = done.scalar_one_or_none()
        if provider is not None:
            self._pools.pop(provider, None)
        return provider is not None

    async def reveal(self, credential_id: str) -> Credential:
        """The decrypted credential (for the gateway's own use, never for a client)."""
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(provider_credentials).where(provider_credentials.c.id == credential_id))
            ).one_or_none()
        if row is None:
            raise KeyError(credential_id)
        return self._open(row)

    async def active(self, provider: str) -> list[Credential]:
        """The provider's active credentials, oldest first, from the cache: each is a
        deployment of the provider (server.api.credential_deployments). Empty when
        it has none, and then calls use the provider's configured key."""
        pool = await self._pool(provider)
        self._note_fallback(provider, pool)
        return pool.active

    async def select(self, provider: str) -> Credential:
        """The next active credential of `provider`, round-robin; PROVIDER_NOT_CONFIGURED
        when it has none."""
        pool = await self._pool(provider)
        self._note_fallback(provider, pool)
        if not pool.active:
            raise ProviderNotConfigured(
                f"provider {provider!r} has no active credential", metadata={"provider": provider}
            )
        turn = next(self._turns.setdefault(provider, itertools.count()))
        return pool.active[turn % len(pool.active)]

    async def mark_invalid(self, credential_id: str, reason: str) -> None:
        """Takes the credential out of rotation (the provider rejected it and a probe
        confirmed) and logs where the provider's calls go now."""
        reason = redact(reason)[:_MAX_REASON_CHARS]
        provider, masked = await self._set_status(credential_id, "invalid", reason)
        pool = await self._pool(provider)
        self._falling_back[provider] = pool.falls_back
        destination = (
            f"the {len(pool.active)} other active stored credential(s)"
            if pool.active
            else "the key configured for the provider, if any (no stored credential is active)"
        )
        log.warning(
            "%s credential %s (%s) marked invalid (%s); calls move to %s",
            provider, masked, credential_id, reason, destination,
        )  # fmt: skip

    async def mark_active(self, credential_id: str) -> None:
        """Puts the credential back into rotation."""
        provider, masked = await self._set_status(credential_id, "active", None)
        log.warning("%s credential %s (%s) is active again and back in rotation", provider, masked, credential_id)

    async def info(self, credential_id: str) -> CredentialInfo:
        """One credential, masked; KeyError if there is none with this id."""
        async with self._db.read() as conn:
            row = (
                await conn.execute(select(provider_credentials).where(provider_credentials.c.id == credential_id))
            ).one_or_none()
        if row is None:
            raise KeyError(credential_id)
        return _info(row)

    async def _set_status(self, credential_id: str, status: CredentialStatus, reason: str | None) -> tuple[str, str]:
        """Stores the status; the credential's provider and masked form."""
        async with self._db.write() as conn:
            done = await conn.execute(
                update(provider_credentials)
                .where(provider_credentials.c.id == credential_id)
                .values(status=status, invalid_reason=reason, updated_at=utcnow())
                .returning(provider_credentials.c.provider, provider_credentials.c.masked)
            )
            row = done.one_or_none()
        if row is None:
            raise KeyError(credential_id)
        self._pools.pop(row.provider, None)
        return str(row.provider), str(row.masked)

    async def _pool(self, provider: str) -> _Pool:
        cached = self._pools.get(provider)
        now = time.monotonic()
        if cached is not None and cached.expires > now:
            return cached
        try:
            async with self._db.read() as conn:
                rows = (
                    await conn.execute(
                        select(provider_credentials)
                        .where(provider_credentials.c.provider == provider)
                        .order_by(provider_credentials.c.created_at, provider_credentials.c.id)
                    )
                ).all()
        except StorageUnavailable:
            if cached is None:
                raise
            # The database is down: calls keep the credentials last read (the database
            # logs the outage), and the next read is tried after another TTL.
            self._pools[provider] = replace(cached, expires=now + self._ttl)
            return cached
        active = [self._open(row) for row in rows if row.status == "active"]
        pool = _Pool(now + self._ttl, active, invalid=len(rows) - len(active))
        self._pools[provider] = pool
        return pool

    def _note_fallback(self, provider: str, pool: _Pool) -> None:
        """Logs when the provider's calls start or stop falling back to its configured
        key because every stored credential is invalid (once per change)."""
        if self._falling_back.get(provider, False) == pool.falls_back:
            return
        self._falling_back[provider] = pool.falls_back
        if pool.falls_back:
            log.warning(
                "all %d stored %s credentials are invalid: calls fall back to the key configured for the "
                "provider, if any, until one is reactivated",
                pool.invalid, provider,
            )  # fmt: skip
        else:
            log.warning("%s has an active stored credential again: calls use stored credentials", provider)

    def _open(self, row: Row[tuple[object, ...]]) -> Credential:
        if row.key_fingerprint != self._fingerprint:
            raise MasterKeyError(
                f"{row.provider} credential {row.masked} ({row.id}) was encrypted with another master key "
                f"(fingerprint {row.key_fingerprint}, configured {self._fingerprint}): "
                f"was {MASTER_KEY_ENV} changed?"
            )
        try:
            plaintext = self._aead.decrypt(bytes(row.nonce), bytes(row.ciphertext), _aad(row.provider, row.id))
        except InvalidTag:
            raise MasterKeyError(
                f"{row.provider} credential {row.masked} ({row.id}) does not decrypt: "
                "the stored ciphertext is corrupted or was tampered with"
            ) from None
        secret = plaintext.decode()
        register_secret(secret)  # redacted wherever a provider echoes it
        return Credential(row.id, row.provider, row.label, row.masked, secret)


def _aad(provider: str, credential_id: str) -> bytes:
    return b"\x00".join((_AAD_LABEL, provider.encode(), credential_id.encode()))


def _info(row: Row[tuple[object, ...]]) -> CredentialInfo:
    return CredentialInfo(
        id=row.id,
        provider=row.provider,
        label=row.label,
        masked=row.masked,
        status=cast(CredentialStatus, row.status),
        invalid_reason=row.invalid_reason,
        created_at=row.created_at,
        updated_at=row.updated_at,
    )
