"""Accounts: API keys, the usage ledger, credits and provider credentials.

keys = KeyStore(db, cache_ttl_s=5)          authenticate(secret) -> KeyRecord
authorize(key, "openai/gpt-4o")             MODEL_NOT_ALLOWED outside the allow-list
credits = CreditService(db, billing_enabled=...)   reserve / settle / release
ledger = Ledger(db)                         record(usage, reservation=...) / totals(...)
vault = CredentialVault(db, load_master_key())     add / list / select / mark_invalid
"""

from server.accounts.credentials import (
    Credential,
    CredentialInfo,
    CredentialVault,
    MasterKeyError,
    generate_master_key,
    load_master_key,
    mask_secret,
)
from server.accounts.credits import (
    Balance,
    CreditService,
    Rate,
    Reservation,
    Usage,
    cost_of,
    credits_to_micros,
)
from server.accounts.errors import (
    InsufficientCredits,
    KeyExpired,
    KeyInvalid,
    KeyRevoked,
    ModelNotAllowed,
    PermissionDenied,
    QuotaExceeded,
    SpendingCapReached,
    Unauthenticated,
)
from server.accounts.keys import KeyRecord, KeyStore, authorize
from server.accounts.ledger import Ledger, Recorded, StoredUsage, UsageRecord, UsageTotals
from server.accounts.owners import Owner, ensure_owner, get_owner, owner_id
from server.accounts.settings import AccountsSettings

__all__ = [
    "AccountsSettings",
    "Balance",
    "Credential",
    "CredentialInfo",
    "CredentialVault",
    "CreditService",
    "InsufficientCredits",
    "KeyExpired",
    "KeyInvalid",
    "KeyRecord",
    "KeyRevoked",
    "KeyStore",
    "Ledger",
    "MasterKeyError",
    "ModelNotAllowed",
    "Owner",
    "PermissionDenied",
    "QuotaExceeded",
    "Rate",
    "Recorded",
    "Reservation",
    "SpendingCapReached",
    "StoredUsage",
    "Unauthenticated",
    "Usage",
    "UsageRecord",
    "UsageTotals",
    "authorize",
    "cost_of",
    "credits_to_micros",
    "ensure_owner",
    "generate_master_key",
    "get_owner",
    "load_master_key",
    "mask_secret",
    "owner_id",
]
