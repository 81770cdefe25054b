"""The one schema of both backends (SQLite and PostgreSQL), as SQLAlchemy Core tables.

Conventions:
- Money is integer micro-credits (`*_micros`, 1 credit = 1_000_000): no float drift,
  sums are exact on both backends.
- Timestamps are UTC. They are stored as naive UTC `TIMESTAMP` (no time zone) so that
  `date(created_at)` means the same UTC day on SQLite and on PostgreSQL; `UTCDateTime`
  converts to and from aware datetimes at the boundary.
- The migrations in `server.storage.migrations` create exactly these tables; a test
  compares the migrated database with this metadata.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Column,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
)
from sqlalchemy.types import DateTime, TypeDecorator

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

metadata = MetaData(naming_convention=NAMING_CONVENTION)

# Autoincrementing 64-bit ids: BIGINT on PostgreSQL, INTEGER (the rowid alias) on SQLite.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """An aware UTC datetime in Python, a naive UTC timestamp in the database."""

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given; storage needs aware (UTC) datetimes")
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if isinstance(value, str):  # pragma: no cover - SQLite returns datetime via the type
            value = datetime.fromisoformat(value)
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC)


def utcnow() -> datetime:
    return datetime.now(UTC)


owners = Table(
    "owners",
    metadata,
    # "user:alice", "project:search" — the kind is also a column for querying.
    Column("id", String(200), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("name", String(200), nullable=False),
    Column("created_at", UTCDateTime(), nullable=False),
    CheckConstraint("kind IN ('user', 'project')", name="kind"),
)

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    # The visible part of the secret (`ahk_<prefix>_...`); the lookup index.
    Column("prefix", String(16), nullable=False, unique=True),
    # SHA-256 (or HMAC-SHA256 with a pepper) of the whole secret.
    Column("secret_hash", LargeBinary(32), nullable=False),
    Column("name", String(200), nullable=False),
    Column("owner_id", String(200), ForeignKey("owners.id"), nullable=False, index=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=True),
    Column("revoked_at", UTCDateTime(), nullable=True),
    # A JSON list of fnmatch globs ("openai/*"); NULL means every model.
    Column("allowed_models", JSON(), nullable=True),
    # Spending cap over the key's lifetime; NULL means none.
    Column("spend_cap_micros", BigInteger(), nullable=True),
    Column("spent_micros", BigInteger(), nullable=False, server_default="0"),
    Column("reserved_micros", BigInteger(), nullable=False, server_default="0"),
    CheckConstraint("reserved_micros >= 0", name="reserved_nonnegative"),
    CheckConstraint("spent_micros >= 0", name="spent_nonnegative"),
)

balances = Table(
    "balances",
    metadata,
    Column("owner_id", String(200), ForeignKey("owners.id"), primary_key=True),
    Column("balance_micros", BigInteger(), nullable=False, server_default="0"),
    # Held by in-flight calls; `balance - reserved` is what a new call may reserve.
    Column("reserved_micros", BigInteger(), nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime(), nullable=False),
    # Second line of defence: the conditional UPDATEs never let these fail.
    CheckConstraint("reserved_micros >= 0", name="reserved_nonnegative"),
    CheckConstraint("balance_micros >= reserved_micros", name="not_overdrawn"),
)

credit_grants = Table(
    "credit_grants",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("owner_id", String(200), ForeignKey("owners.id"), nullable=False, index=True),
    Column("amount_micros", BigInteger(), nullable=False),
    Column("note", Text(), nullable=False, server_default=""),
    Column("created_at", UTCDateTime(), nullable=False),
)

reservations = Table(
    "reservations",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("owner_id", String(200), ForeignKey("owners.id"), nullable=False),
    Column("key_id", String(32), ForeignKey("api_keys.id"), nullable=True),
    Column("amount_micros", BigInteger(), nullable=False),
    Column("request_id", String(200), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    # After this a sweeper may release it (the replica that made it probably died).
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
    # The spend windows (`spend_windows.id`, space-separated) this reservation holds
    # `amount_micros` of; NULL: none. Settling moves the charge into each of them.
    Column("spend_window_ids", Text(), nullable=True),
    CheckConstraint("amount_micros >= 0", name="amount_nonnegative"),
)

model_rates = Table(
    "model_rates",
    metadata,
    # "openai/gpt-4o" or a glob ("openai/*", "*"); the most specific match wins.
    Column("model", String(200), primary_key=True),
    Column("input_per_million_micros", BigInteger(), nullable=False, server_default="0"),
    Column("output_per_million_micros", BigInteger(), nullable=False, server_default="0"),
    Column("cached_input_per_million_micros", BigInteger(), nullable=False, server_default="0"),
    Column("per_image_micros", BigInteger(), nullable=False, server_default="0"),
    Column("per_audio_second_micros", BigInteger(), nullable=False, server_default="0"),
    Column("per_character_micros", BigInteger(), nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime(), nullable=False),
)

# Append-only; deliberately without foreign keys so a record can always be written.
usage_records = Table(
    "usage_records",
    metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("request_id", String(200), nullable=False, unique=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("key_id", String(32), nullable=True),
    Column("owner_id", String(200), nullable=True),
    Column("provider", String(100), nullable=False),
    Column("model", String(200), nullable=False),
    Column("operation", String(32), nullable=False, server_default=""),
    Column("input_tokens", BigInteger(), nullable=False, server_default="0"),
    Column("output_tokens", BigInteger(), nullable=False, server_default="0"),
    Column("cached_tokens", BigInteger(), nullable=False, server_default="0"),
    Column("image_count", BigInteger(), nullable=False, server_default="0"),
    Column("audio_ms", BigInteger(), nullable=False, server_default="0"),
    Column("characters", BigInteger(), nullable=False, server_default="0"),
    # What the call cost at the rates (even with billing off) and what was charged.
    Column("cost_micros", BigInteger(), nullable=False, server_default="0"),
    Column("credits_micros", BigInteger(), nullable=False, server_default="0"),
    Column("latency_ms", Integer(), nullable=False, server_default="0"),
    Column("ttft_ms", Integer(), nullable=True),
    # Upstream attempts the call took (retries and fallbacks); 0 if it never reached one.
    Column("attempts", Integer(), nullable=False, server_default="1"),
    Column("outcome", String(16), nullable=False),
    Column("error_reason", String(64), nullable=True),
    # The stored provider credential that served the call (its id; migration 0006).
    Column("credential_id", String(32), nullable=True),
    Index("ix_usage_records_created_at", "created_at"),
    Index("ix_usage_records_key_id_created_at", "key_id", "created_at"),
    Index("ix_usage_records_owner_id_created_at", "owner_id", "created_at"),
)

provider_credentials = Table(
    "provider_credentials",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("provider", String(100), nullable=False, index=True),
    Column("label", String(200), nullable=False, server_default=""),
    # AES-256-GCM: 12-byte random nonce, ciphertext with its 16-byte tag.
    Column("nonce", LargeBinary(12), nullable=False),
    Column("ciphertext", LargeBinary(), nullable=False),
    # Which master key encrypted it (a fingerprint, not the key): a clear error when
    # AIGNE_HUB_MASTER_KEY changed.
    Column("key_fingerprint", String(16), nullable=False),
    # "sk-...abcd": the only form ever shown.
    Column("masked", String(32), nullable=False),
    Column("status", String(16), nullable=False, server_default="active"),
    Column("invalid_reason", Text(), nullable=True),
    Column("created_at", UTCDateTime(), nullable=False),
    Column("updated_at", UTCDateTime(), nullable=False),
    CheckConstraint("status IN ('active', 'invalid')", name="status"),
)

# Rate limits and spend windows (server.limits): on a key or on an owner (all its keys
# together), narrowed to a model glob. NULL limits are not enforced.
rate_limits = Table(
    "rate_limits",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("scope", String(8), nullable=False),
    # The key's id or the owner's id ("user:alice"); no foreign key: a limit may be set
    # before traffic, and removing a key must not need removing its limits first.
    Column("subject", String(200), nullable=False),
    Column("model", String(200), nullable=False, server_default="*"),
    Column("rpm", BigInteger(), nullable=True),
    Column("tpm", BigInteger(), nullable=True),
    Column("concurrency", BigInteger(), nullable=True),
    Column("daily_credits_micros", BigInteger(), nullable=True),
    Column("monthly_credits_micros", BigInteger(), nullable=True),
    Column("updated_at", UTCDateTime(), nullable=False),
    CheckConstraint("scope IN ('key', 'owner')", name="scope"),
    UniqueConstraint("scope", "subject", "model", name="uq_rate_limits_scope_subject_model"),
)

# Credits per UTC day / calendar month of a limit rule's scope, subject and model glob
# (server.limits.windows), one row per period: what settled calls were charged
# (`spent`) and what calls in flight hold (`reserved`). Keyed by the rule's scope,
# subject and glob, not by the rule's id, so removing and setting a rule again keeps
# the period's spend.
spend_windows = Table(
    "spend_windows",
    metadata,
    # sha256 of (scope, subject, model, period): a short id reservations can list.
    Column("id", String(64), primary_key=True),
    Column("scope", String(8), nullable=False),
    Column("subject", String(200), nullable=False),
    Column("model", String(200), nullable=False),
    # "day:2026-11-30" or "month:2026-11" (UTC).
    Column("period", String(16), nullable=False),
    Column("spent_micros", BigInteger(), nullable=False, server_default="0"),
    Column("reserved_micros", BigInteger(), nullable=False, server_default="0"),
    Column("updated_at", UTCDateTime(), nullable=False),
    CheckConstraint("spent_micros >= 0", name="spent_nonnegative"),
    CheckConstraint("reserved_micros >= 0", name="reserved_nonnegative"),
    UniqueConstraint("scope", "subject", "model", "period", name="uq_spend_windows_scope_subject_model_period"),
)

# State a conversation needs on its next turn (server.providers.conversation_state):
# Anthropic's thinking blocks, Gemini's thought signatures. The key is a digest of
# what the client echoes (tool call ids); rows past `expires_at` are ignored and purged.
conversation_state = Table(
    "conversation_state",
    metadata,
    Column("key", String(100), primary_key=True),
    Column("value", Text(), nullable=False),
    Column("expires_at", UTCDateTime(), nullable=False, index=True),
)
