"""Initial schema: owners, API keys, balances, grants, reservations, rates, usage
ledger, provider credentials.

Revision ID: 0001
Revises:
Create Date: 2026-11-25

Self-contained on purpose (no imports from `server.storage.schema`): a migration
describes the schema as it was at its revision, whatever the code says later.
Timestamps are naive UTC (`server.storage.schema.UTCDateTime`).
"""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision: str | None = None
branch_labels: str | None = None
depends_on: str | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def _ts(name: str, nullable: bool = False) -> sa.Column[datetime]:
    return sa.Column(name, sa.DateTime(timezone=False), nullable=nullable)


def _micros(name: str) -> sa.Column[int]:
    return sa.Column(name, sa.BigInteger(), server_default="0", nullable=False)


def upgrade() -> None:
    op.create_table(
        "owners",
        sa.Column("id", sa.String(length=200), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        _ts("created_at"),
        sa.CheckConstraint("kind IN ('user', 'project')", name=op.f("ck_owners_kind")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_owners")),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("prefix", sa.String(length=16), nullable=False),
        sa.Column("secret_hash", sa.LargeBinary(length=32), nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("owner_id", sa.String(length=200), nullable=False),
        _ts("created_at"),
        _ts("expires_at", nullable=True),
        _ts("revoked_at", nullable=True),
        sa.Column("allowed_models", sa.JSON(), nullable=True),
        sa.Column("spend_cap_micros", sa.BigInteger(), nullable=True),
        _micros("spent_micros"),
        _micros("reserved_micros"),
        sa.CheckConstraint("reserved_micros >= 0", name=op.f("ck_api_keys_reserved_nonnegative")),
        sa.CheckConstraint("spent_micros >= 0", name=op.f("ck_api_keys_spent_nonnegative")),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], name=op.f("fk_api_keys_owner_id_owners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_keys")),
        sa.UniqueConstraint("prefix", name=op.f("uq_api_keys_prefix")),
    )
    op.create_index(op.f("ix_api_keys_owner_id"), "api_keys", ["owner_id"])
    op.create_table(
        "balances",
        sa.Column("owner_id", sa.String(length=200), nullable=False),
        _micros("balance_micros"),
        _micros("reserved_micros"),
        _ts("updated_at"),
        sa.CheckConstraint("balance_micros >= reserved_micros", name=op.f("ck_balances_not_overdrawn")),
        sa.CheckConstraint("reserved_micros >= 0", name=op.f("ck_balances_reserved_nonnegative")),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], name=op.f("fk_balances_owner_id_owners")),
        sa.PrimaryKeyConstraint("owner_id", name=op.f("pk_balances")),
    )
    op.create_table(
        "credit_grants",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("owner_id", sa.String(length=200), nullable=False),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("note", sa.Text(), server_default="", nullable=False),
        _ts("created_at"),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], name=op.f("fk_credit_grants_owner_id_owners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_credit_grants")),
    )
    op.create_index(op.f("ix_credit_grants_owner_id"), "credit_grants", ["owner_id"])
    op.create_table(
        "reservations",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("owner_id", sa.String(length=200), nullable=False),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("amount_micros", sa.BigInteger(), nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=True),
        _ts("created_at"),
        _ts("expires_at"),
        sa.CheckConstraint("amount_micros >= 0", name=op.f("ck_reservations_amount_nonnegative")),
        sa.ForeignKeyConstraint(["key_id"], ["api_keys.id"], name=op.f("fk_reservations_key_id_api_keys")),
        sa.ForeignKeyConstraint(["owner_id"], ["owners.id"], name=op.f("fk_reservations_owner_id_owners")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_reservations")),
    )
    op.create_index(op.f("ix_reservations_expires_at"), "reservations", ["expires_at"])
    op.create_table(
        "model_rates",
        sa.Column("model", sa.String(length=200), nullable=False),
        _micros("input_per_million_micros"),
        _micros("output_per_million_micros"),
        _micros("cached_input_per_million_micros"),
        _micros("per_image_micros"),
        _micros("per_audio_second_micros"),
        _micros("per_character_micros"),
        _ts("updated_at"),
        sa.PrimaryKeyConstraint("model", name=op.f("pk_model_rates")),
    )
    op.create_table(
        "usage_records",
        sa.Column("id", BIG_ID, autoincrement=True, nullable=False),
        sa.Column("request_id", sa.String(length=200), nullable=False),
        _ts("created_at"),
        sa.Column("key_id", sa.String(length=32), nullable=True),
        sa.Column("owner_id", sa.String(length=200), nullable=True),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=False),
        sa.Column("operation", sa.String(length=32), server_default="", nullable=False),
        _micros("input_tokens"),
        _micros("output_tokens"),
        _micros("cached_tokens"),
        _micros("image_count"),
        _micros("audio_ms"),
        _micros("characters"),
        _micros("cost_micros"),
        _micros("credits_micros"),
        sa.Column("latency_ms", sa.Integer(), server_default="0", nullable=False),
        sa.Column("ttft_ms", sa.Integer(), nullable=True),
        sa.Column("outcome", sa.String(length=16), nullable=False),
        sa.Column("error_reason", sa.String(length=64), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_records")),
        sa.UniqueConstraint("request_id", name=op.f("uq_usage_records_request_id")),
    )
    op.create_index("ix_usage_records_created_at", "usage_records", ["created_at"])
    op.create_index("ix_usage_records_key_id_created_at", "usage_records", ["key_id", "created_at"])
    op.create_index("ix_usage_records_owner_id_created_at", "usage_records", ["owner_id", "created_at"])
    op.create_table(
        "provider_credentials",
        sa.Column("id", sa.String(length=32), nullable=False),
        sa.Column("provider", sa.String(length=100), nullable=False),
        sa.Column("label", sa.String(length=200), server_default="", nullable=False),
        sa.Column("nonce", sa.LargeBinary(length=12), nullable=False),
        sa.Column("ciphertext", sa.LargeBinary(), nullable=False),
        sa.Column("key_fingerprint", sa.String(length=16), nullable=False),
        sa.Column("masked", sa.String(length=32), nullable=False),
        sa.Column("status", sa.String(length=16), server_default="active", nullable=False),
        sa.Column("invalid_reason", sa.Text(), nullable=True),
        _ts("created_at"),
        _ts("updated_at"),
        sa.CheckConstraint("status IN ('active', 'invalid')", name=op.f("ck_provider_credentials_status")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provider_credentials")),
    )
    op.create_index(op.f("ix_provider_credentials_provider"), "provider_credentials", ["provider"])


def downgrade() -> None:
    for table in (
        "provider_credentials",
        "usage_records",
        "model_rates",
        "reservations",
        "credit_grants",
        "balances",
        "api_keys",
        "owners",
    ):
        op.drop_table(table)
