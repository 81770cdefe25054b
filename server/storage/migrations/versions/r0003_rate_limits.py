"""Rate limits and spend windows per key or owner, narrowed to a model glob
(server.limits). Self-contained like r0001: no imports from the schema module.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "rate_limits",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False, server_default="*"),
        sa.Column("rpm", sa.BigInteger(), nullable=True),
        sa.Column("tpm", sa.BigInteger(), nullable=True),
        sa.Column("concurrency", sa.BigInteger(), nullable=True),
        sa.Column("daily_credits_micros", sa.BigInteger(), nullable=True),
        sa.Column("monthly_credits_micros", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False),
        sa.CheckConstraint("scope IN ('key', 'owner')", name=op.f("ck_rate_limits_scope")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rate_limits")),
        sa.UniqueConstraint("scope", "subject", "model", name=op.f("uq_rate_limits_scope_subject_model")),
    )


def downgrade() -> None:
    op.drop_table("rate_limits")
