"""Credit limits per UTC day and calendar month, enforced (server.limits.windows): the
`spend_windows` counters and the windows each credit reservation holds. Self-contained
like r0001: no imports from the schema module.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    op.create_table(
        "spend_windows",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("scope", sa.String(8), nullable=False),
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("model", sa.String(200), nullable=False),
        sa.Column("period", sa.String(16), nullable=False),
        sa.Column("spent_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("reserved_micros", sa.BigInteger(), nullable=False, server_default="0"),
        sa.Column("updated_at", sa.DateTime(timezone=False), nullable=False),
        sa.CheckConstraint("spent_micros >= 0", name=op.f("ck_spend_windows_spent_nonnegative")),
        sa.CheckConstraint("reserved_micros >= 0", name=op.f("ck_spend_windows_reserved_nonnegative")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_spend_windows")),
        sa.UniqueConstraint(
            "scope", "subject", "model", "period", name=op.f("uq_spend_windows_scope_subject_model_period")
        ),
    )
    with op.batch_alter_table("reservations") as batch:
        batch.add_column(sa.Column("spend_window_ids", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("reservations") as batch:
        batch.drop_column("spend_window_ids")
    op.drop_table("spend_windows")
