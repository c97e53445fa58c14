"""the manifest as a contract: catalogue fields, the stored image's size and format,
completions; the retired status

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

- items.fields: the catalogue fields each manifest line carries (title, category, the
  pack's ``manifest_columns``), canonical JSON written at enqueue; ``{}`` for the items
  enqueued before (the next enqueue of their catalogue fills it in).
- items.image_width, image_height, image_format: the stored image as the worker encoded
  it. For items already stored, the format comes from their output spec, and the size is
  the drawn size where nothing changed it (no labels, no ``max_side``); otherwise the size
  is left unknown (null).
- runs.completions and runs.manifest_digest: which event a completion sends
  (``run.completed`` first, ``run.updated`` after a change). A run already completed, or
  with an event in the outbox, counts one completion.
- ``retired`` is a new value of items.status, a VARCHAR(16): nothing to alter.
"""

import json
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def _record_stored_images(conn: sa.Connection) -> None:
    """Fill image_format (and image_width/height where they are the drawn size) for every
    item with a stored object, one statement per distinct output spec (a catalogue has few
    unless its labels differ by row)."""
    items = sa.table(
        "items",
        sa.column("output"),
        sa.column("sha256"),
        sa.column("width"),
        sa.column("height"),
        sa.column("image_width"),
        sa.column("image_height"),
        sa.column("image_format"),
    )
    stored = items.c.sha256.is_not(None)
    outputs = conn.execute(sa.select(items.c.output).where(stored).distinct()).scalars().all()
    for output in outputs:
        spec = json.loads(output or "{}")
        values: dict[str, object] = {"image_format": spec.get("format", "png")}
        if not spec.get("labels") and spec.get("max_side") is None:
            values.update(image_width=items.c.width, image_height=items.c.height)
        conn.execute(sa.update(items).where(stored, items.c.output == output).values(**values))


def upgrade() -> None:
    with op.batch_alter_table("items") as batch:
        batch.add_column(sa.Column("fields", sa.Text(), server_default="{}", nullable=False))
        batch.add_column(sa.Column("image_width", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("image_height", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("image_format", sa.String(length=8), nullable=True))
    with op.batch_alter_table("runs") as batch:
        batch.add_column(sa.Column("completions", sa.Integer(), server_default="0", nullable=False))
        batch.add_column(sa.Column("manifest_digest", sa.String(length=64), nullable=True))
    conn = op.get_bind()
    _record_stored_images(conn)
    runs = sa.table("runs", sa.column("id"), sa.column("completed_at"), sa.column("completions"))
    events = sa.table("events", sa.column("run_id"))
    conn.execute(
        sa.update(runs)
        .where(
            sa.or_(
                runs.c.completed_at.is_not(None),
                sa.select(events.c.run_id).where(events.c.run_id == runs.c.id).exists(),
            )
        )
        .values(completions=1)
    )


def downgrade() -> None:
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("manifest_digest")
        batch.drop_column("completions")
    with op.batch_alter_table("items") as batch:
        batch.drop_column("image_format")
        batch.drop_column("image_height")
        batch.drop_column("image_width")
        batch.drop_column("fields")
    op.execute("UPDATE items SET status = 'cancelled' WHERE status = 'retired'")
