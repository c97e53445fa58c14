"""scheduler, output spec and safety flag per item

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27

- items.scheduler: the sampler the item is drawn with ('default' = the model's own)
- items.output: how the image is stored (format, quality, max side, labels) as JSON text
- items.flagged: the safety checker flagged the image, which was therefore not uploaded
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(
            sa.Column("scheduler", sa.String(length=32), nullable=False, server_default="default")
        )
        batch.add_column(sa.Column("output", sa.Text(), nullable=False, server_default="{}"))
        batch.add_column(
            sa.Column("flagged", sa.Boolean(), nullable=False, server_default=sa.false())
        )


def downgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.drop_column("flagged")
        batch.drop_column("output")
        batch.drop_column("scheduler")
