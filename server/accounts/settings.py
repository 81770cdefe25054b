"""Accounts settings (`AIGNE_HUB_*`); meant to be folded into `server.config.Settings`.

AIGNE_HUB_BILLING_ENABLED         charge credits (default off: usage is still recorded)
AIGNE_HUB_KEY_CACHE_TTL_S         how long a replica trusts a cached key (default 5 s):
                                  the bound on how late a revocation takes effect
AIGNE_HUB_KEY_NEGATIVE_CACHE_TTL_S   same for unknown/wrong secrets (default 1 s)
AIGNE_HUB_KEY_CACHE_OUTAGE_GRACE_S   while the database is unreachable, a key read before
                                  keeps working this long past its TTL (default 300 s; 0: off)
AIGNE_HUB_KEY_PEPPER              optional server secret mixed into key hashes (HMAC)
AIGNE_HUB_MASTER_KEY              base64 of 32 bytes: encrypts provider credentials
AIGNE_HUB_CREDENTIAL_RECHECK_S    how often invalid provider credentials are re-probed
                                  and reactivated if accepted (default 300 s)
AIGNE_HUB_RESERVATION_LEASE_S     a credit reservation's lease (default 120 s): the
                                  serving process renews it every third of it, and a
                                  reservation left unrenewed (its process died) is
                                  released within about one lease
AIGNE_HUB_CREDIT_BLOCK_CALLS      with billing on, each serving process holds credits
                                  for this many calls' worst cases at a time and calls
                                  draw from them without a transaction of their own
                                  (default 16; 0: each call reserves its own; see
                                  server.accounts.credit_blocks)
"""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


class AccountsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AIGNE_HUB_", extra="ignore")

    billing_enabled: bool = False
    key_cache_ttl_s: float = Field(5.0, ge=0)
    key_negative_cache_ttl_s: float = Field(1.0, ge=0)
    key_cache_max_entries: int = Field(100_000, ge=1)
    key_cache_outage_grace_s: float = Field(300.0, ge=0)
    key_pepper: SecretStr | None = None
    master_key: SecretStr | None = None
    credential_cache_ttl_s: float = Field(5.0, ge=0)
    credential_recheck_s: float = Field(300.0, gt=0)
    reservation_lease_s: float = Field(120.0, ge=1)
    credit_block_calls: int = Field(16, ge=0, le=10_000)
    ledger_max_batch: int = Field(500, ge=1)
