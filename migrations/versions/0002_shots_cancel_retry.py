"""template packs, cancelled items, explicit retries

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-27

- runs.template: the template pack of the latest enqueue
- runs.cancelled_at: when the run was cancelled
- items.attempts_before_retry: the attempt cap counts from here after a retry, while
  ``attempts`` (the fencing token) keeps growing
- items.status may now be 'cancelled' (a VARCHAR without a CHECK constraint: no DDL)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(
            sa.Column("template", sa.String(length=256), nullable=False, server_default="ecommerce")
        )
        batch.add_column(sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True))
    with op.batch_alter_table("items") as batch:
        batch.add_column(
            sa.Column("attempts_before_retry", sa.Integer(), nullable=False, server_default="0")
        )


def downgrade() -> None:
    op.execute("UPDATE items SET status = 'failed' WHERE status = 'cancelled'")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("attempts_before_retry")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("cancelled_at")
        batch.drop_column("template")
