"""run completion

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-27

- runs.completed_at: set once, by the worker that finishes a run's last open item, which
  then writes the manifest to the bucket and calls the webhook; cleared when the run gets
  new work (an enqueue or a retry)
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("completed_at")
