"""object keys fixed at enqueue, unique per run; the webhook's event outbox

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

- items.object_key is now set when an item is enqueued, from the injective key scheme of
  ``schemas.key``; rows without one get it here. Unique (run_id, object_key): no two items
  of a run can ever write the same object.
- Before this revision a SKU equal to another SKU's cleaned form got the same key, so one
  image could overwrite the other. Where succeeded items of a run share a key, one keeps
  it (the item whose key it is under the new scheme, or else the first); the others are
  marked failed with that reason and their new key, so that ``skufleet retry NAME
  --failed`` draws them again (see ``_assign_keys``).
- events: the outbox of webhook events (delivery retried until answered).
"""

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

from skufleet.schemas.key import object_key
from skufleet.schemas.output import FORMATS

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLLISION = (
    "its object key was shared with another SKU's (before skufleet's key scheme became "
    "injective), so its image may have been overwritten; it has a key of its own now: "
    "`skufleet retry RUN --failed` draws it again"
)


def _extension(output: str | None) -> str:
    fmt = json.loads(output or "{}").get("format", "png")
    return FORMATS.get(fmt, FORMATS["png"])[1]


def _assign_keys(conn: sa.Connection) -> None:
    """Give every item a key no other item of its run has, one run at a time.

    Every item's key becomes the one :func:`schemas.key.object_key` gives it, except a
    succeeded item's, which keeps the key its object was written at, unless another item
    has that key too: the item whose new key it is (a verbatim SKU equal to another SKU's
    old cleaned form), or else the first succeeded item there. The succeeded items that lose
    the key are failed with :data:`COLLISION` and get their new key. New keys never equal
    one another, and a key that is kept is no other item's new key, so no two items of a
    run end up with the same key.
    """
    items = sa.table(
        "items",
        sa.column("id"),
        sa.column("run_id"),
        sa.column("sku"),
        sa.column("shot"),
        sa.column("output"),
        sa.column("status"),
        sa.column("object_key"),
        sa.column("last_error"),
        sa.column("byte_size"),
        sa.column("sha256"),
        sa.column("finished_at"),
        sa.column("updated_at"),
    )
    runs = sa.table("runs", sa.column("id"), sa.column("name"))
    now = datetime.now(UTC)
    rekey = (
        sa.update(items)
        .where(items.c.id == sa.bindparam("item"))
        .values(object_key=sa.bindparam("key"))
    )
    lose = (
        sa.update(items)
        .where(items.c.id == sa.bindparam("item"))
        .values(
            object_key=sa.bindparam("key"),
            status="failed",
            last_error=COLLISION,
            byte_size=None,
            sha256=None,
            finished_at=now,
            updated_at=now,
        )
    )
    for run_id, name in conn.execute(sa.select(runs.c.id, runs.c.name).order_by(runs.c.id)).all():
        rows = conn.execute(
            sa.select(
                items.c.id,
                items.c.sku,
                items.c.shot,
                items.c.output,
                items.c.status,
                items.c.object_key,
            )
            .where(items.c.run_id == run_id)
            .order_by(items.c.id)
        ).all()
        new = {row.id: object_key(name, row.sku, row.shot, _extension(row.output)) for row in rows}
        owner = {key: item for item, key in new.items()}
        holders: dict[str, list[int]] = {}
        for row in rows:
            if row.status == "succeeded" and row.object_key is not None:
                holders.setdefault(row.object_key, []).append(row.id)
        kept: set[int] = set()
        for key, ids in holders.items():
            if key in owner:
                kept.update(i for i in ids if i == owner[key])
            else:
                kept.add(ids[0])
        losers = {i for ids in holders.values() for i in ids} - kept
        moved = [
            {"item": row.id, "key": new[row.id]}
            for row in rows
            if row.id not in kept and row.id not in losers and row.object_key != new[row.id]
        ]
        if moved:
            conn.execute(rekey, moved)
        if losers:
            conn.execute(lose, [{"item": i, "key": new[i]} for i in sorted(losers)])


def upgrade() -> None:
    _assign_keys(op.get_bind())
    with op.batch_alter_table("items") as batch:
        batch.create_unique_constraint("uq_items_run_object_key", ["run_id", "object_key"])
    op.create_table(
        "events",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("event_id", sa.String(length=64), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=True),
        sa.Column("kind", sa.String(length=32), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], ["runs.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("event_id"),
    )
    op.create_index("ix_events_pending", "events", ["delivered_at", "next_attempt_at"])


def downgrade() -> None:
    op.drop_index("ix_events_pending", table_name="events")
    op.drop_table("events")
    with op.batch_alter_table("items") as batch:
        batch.drop_constraint("uq_items_run_object_key", type_="unique")
