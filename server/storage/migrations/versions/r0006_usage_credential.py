"""The stored provider credential that served a call (`usage_records.credential_id`, the
id the `x-aigne-hub-credential` header names; never the secret), so the ledger can say
which of a provider's keys a call used. Nullable: calls served by the configured key,
refused before any provider, and the records written before this revision have none.
Self-contained like r0001: no imports from the schema module.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.add_column(sa.Column("credential_id", sa.String(32), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("usage_records") as batch:
        batch.drop_column("credential_id")
