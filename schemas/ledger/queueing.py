"""Pending items onto the queue, and back: the ledger's side of publishing.

Calling convention: every function takes the Engine and commits its own transactions
(opened with ``begin``, so database failures are raised as LedgerUnavailable): items are
marked queued and committed a chunk at a time *before* their messages are published, so a
worker never gets a message for an item the ledger does not show queued.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skufleet.schemas.label import label
from skufleet.schemas.ledger.columns import PARAMS, columns
from skufleet.schemas.ledger.engine import begin, connect, utcnow
from skufleet.schemas.ledger.transitions import TRANSITIONS
from skufleet.schemas.tables import Item, Run


@dataclass(frozen=True)
class Queued:
    """One committed chunk of queued items: batches of ids that share their generation
    parameters, and what a message's label shows of each item. Iterating it gives the
    batches."""

    run_name: str
    batches: list[list[int]]
    names: dict[int, tuple[str, str]]
    """Item id → (sku, shot), for :meth:`label`."""

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def label(self, ids: Sequence[int]) -> str:
        """What Flower shows for the message of batch ``ids`` (``schemas.label``)."""
        return label(self.run_name, [self.names[i] for i in ids])


def queue_pending(
    engine: Engine, run_id: int, batch_size: int, chunk_items: int = 2000
) -> Iterator[Queued]:
    """pending → queued for the run, a chunk at a time, each committed before it is yielded
    as batches that share their generation parameters, in item order.

    Memory stays constant at any run size: a chunk is at most ``chunk_items`` ids.
    """
    move = TRANSITIONS["queue"]
    params = columns(PARAMS)
    per_chunk = max(batch_size, chunk_items // batch_size * batch_size)
    with connect(engine) as conn:
        run_name = conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar() or ""
        groups = conn.execute(
            sa.select(*params)
            .where(Item.run_id == run_id, Item.status.in_(move.sources))
            .distinct()
        ).all()
    for group in groups:
        same = [column == value for column, value in zip(params, group, strict=True)]
        last = 0  # keyset: each chunk starts after the previous one's last id
        while True:
            now = utcnow()
            oldest = (
                sa.select(Item.id)
                .where(
                    Item.run_id == run_id,
                    Item.status.in_(move.sources),
                    *same,
                    Item.id > last,
                )
                .order_by(Item.id)
                .limit(per_chunk)
                .scalar_subquery()
            )
            with begin(engine) as conn:
                rows = conn.execute(
                    sa.update(Item)
                    .where(Item.id.in_(oldest), Item.status.in_(move.sources))
                    .values(status=move.target, queued_at=now, updated_at=now)
                    .returning(Item.id, Item.sku, Item.shot)
                ).all()
            if not rows:
                break
            names = {int(r.id): (r.sku, r.shot) for r in rows}
            ids = sorted(names)
            last = ids[-1]
            batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
            yield Queued(run_name, batches, names)


def unmark_queued(engine: Engine, item_ids: Sequence[int]) -> None:
    """queued → pending for items whose message could not be published."""
    move = TRANSITIONS["unqueue"]
    with begin(engine) as conn:
        conn.execute(
            sa.update(Item)
            .where(Item.id.in_(item_ids), Item.status.in_(move.sources))
            .values(status=move.target, queued_at=None, updated_at=utcnow())
        )
