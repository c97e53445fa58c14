"""the quality gate and human review: candidates, scores, rolls, reviews; needs_review

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04

- items.image_seed, roll, next_roll: the stored image's seed and roll, and the roll the
  next render starts from. Items already stored were drawn with their own seed (roll 0),
  so their next render draws roll 1.
- items.renders, rerolls: candidates drawn, ever, and the re-rolls among them (one render
  per stored item before this revision, none re-rolled).
- items.verdict, quality, phash: the gate's verdict and scores on the stored image, and
  its perceptual hash (null and ``{}`` for images stored before: never checked).
- candidates: every image a render drew for an item (roll, seed, scores, kept or not).
- reviews: reviewers' decisions (approved, rejected), with who and when.
- ``needs_review`` is a new value of items.status, a VARCHAR(16): nothing to alter.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("image_seed", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("roll", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("next_roll", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("renders", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("rerolls", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("verdict", sa.String(length=16), nullable=True))
        batch.add_column(sa.Column("quality", sa.Text(), server_default="{}", nullable=False))
        batch.add_column(sa.Column("phash", sa.BigInteger(), nullable=True))
    items = sa.table(
        "items",
        sa.column("sha256"),
        sa.column("seed"),
        sa.column("image_seed"),
        sa.column("roll"),
        sa.column("next_roll"),
        sa.column("renders"),
    )
    op.get_bind().execute(
        sa.update(items)
        .where(items.c.sha256.is_not(None))
        .values(image_seed=items.c.seed, roll=0, next_roll=1, renders=1)
    )
    op.create_table(
        "candidates",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("roll", sa.Integer(), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=False),
        sa.Column("scores", sa.Text(), nullable=False),
        sa.Column("passed", sa.Boolean(), nullable=False),
        sa.Column("kept", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_candidates_item", "candidates", ["item_id", "roll"])
    op.create_table(
        "reviews",
        sa.Column("id", BIG_ID, nullable=False),
        sa.Column("item_id", BIG_ID, nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("decision", sa.String(length=16), nullable=False),
        sa.Column("reviewer", sa.String(length=255), nullable=False),
        sa.Column("seed", sa.BigInteger(), nullable=True),
        sa.Column("sha256", sa.String(length=64), nullable=True),
        sa.Column("note", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["item_id"], ["items.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_reviews_run", "reviews", ["run_id", "item_id"])


def downgrade() -> None:
    op.drop_index("ix_reviews_run", table_name="reviews")
    op.drop_table("reviews")
    op.drop_index("ix_candidates_item", table_name="candidates")
    op.drop_table("candidates")
    # an image waiting for review was never delivered: it is drawn again
    op.execute("UPDATE items SET status = 'pending' WHERE status = 'needs_review'")
    with op.batch_alter_table("items") as batch:
        for column in (
            "phash",
            "quality",
            "verdict",
            "rerolls",
            "renders",
            "next_roll",
            "roll",
            "image_seed",
        ):
            batch.drop_column(column)
