"""The reconciler's side of the ledger: items whose worker or message was lost.

Calling convention: every function takes a Connection from the caller, opened with
``ledger.begin(engine)`` (so database failures are raised as LedgerUnavailable); the
caller commits before it publishes what these return.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.label import label
from skufleet.schemas.ledger.columns import PARAMS, columns
from skufleet.schemas.ledger.engine import utcnow
from skufleet.schemas.ledger.transitions import TRANSITIONS
from skufleet.schemas.tables import Item, ItemStatus, Run


@dataclass(frozen=True)
class Stranded:
    """Items of one run and model that need a message: their ids in batches."""

    run_id: int
    model: str
    batches: list[list[int]]
    run_name: str = ""
    names: dict[int, tuple[str, str]] = field(default_factory=dict)
    """Item id → (sku, shot), for :meth:`label`."""

    def label(self, ids: Sequence[int], note: str) -> str:
        """What Flower shows for the message of batch ``ids`` (``schemas.label``)."""
        return label(self.run_name, [self.names[i] for i in ids], note)


def _batched(rows: Sequence[Any], batch_size: int) -> list[Stranded]:
    """Rows of (id, run_id, model, run name, sku, shot, *PARAMS), grouped per run and
    parameters into batches of at most ``batch_size``, in id order."""
    found: dict[tuple[Any, ...], list[int]] = {}
    names: dict[int, tuple[str, str]] = {}
    run_names: dict[int, str] = {}
    for row in sorted(rows, key=lambda r: (r[1], r[2], *r[6:], r[0])):
        item_id, run_id, model, run_name, sku, shot, *params = row
        found.setdefault((run_id, model, *params), []).append(int(item_id))
        names[int(item_id)] = (sku, shot)
        run_names[run_id] = run_name
    return [
        Stranded(
            key[0],
            key[1],
            [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)],
            run_names[key[0]],
            {i: names[i] for i in ids},
        )
        for key, ids in found.items()
    ]


def stranded(conn: Connection, item_ids: Sequence[int], batch_size: int) -> list[Stranded]:
    """The given items' batches, with what a message and its label need."""
    rows: list[Any] = []
    for start in range(0, len(item_ids), 5000):
        rows += conn.execute(
            sa.select(
                Item.id, Item.run_id, Run.model, Run.name, Item.sku, Item.shot, *columns(PARAMS)
            )
            .join(Run, Run.id == Item.run_id)
            .where(Item.id.in_(item_ids[start : start + 5000]))
        ).all()
    return _batched(rows, batch_size)


def expire_leases(
    conn: Connection, max_attempts: int, batch_size: int, run_id: int | None = None
) -> tuple[list[Stranded], int]:
    """running → queued for items whose lease expired (their worker died, hung or was cut
    off), or → failed when that was their last allowed attempt; of run ``run_id`` only, if
    given.

    Returns the requeued items, to publish, and how many were failed.
    """
    move = TRANSITIONS["expire"]
    queued, failed = move.to(ItemStatus.QUEUED), move.to(ItemStatus.FAILED)
    now = utcnow()
    spent = (Item.attempts - Item.attempts_before_retry) >= max_attempts
    reason = sa.literal("lease expired before its worker finished: ") + sa.func.coalesce(
        Item.worker, "unknown worker"
    )
    rows = conn.execute(
        sa.update(Item)
        .where(
            Item.status.in_(move.sources),
            Item.lease_expires_at < now,
            *([Item.run_id == run_id] if run_id is not None else []),
        )
        .values(
            status=sa.case((spent, failed.value), else_=queued.value),
            last_error=reason,
            queued_at=sa.case((spent, None), else_=now),
            finished_at=sa.case((spent, now), else_=None),
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(Item.id, Item.status)
    ).all()
    requeued = [int(r.id) for r in rows if r.status == queued]
    return stranded(conn, requeued, batch_size), len(rows) - len(requeued)


def queued_models(conn: Connection, older_than: datetime, run_id: int | None = None) -> list[str]:
    """Models with items queued since before ``older_than``: candidates for lost messages."""
    return list(
        conn.execute(
            sa.select(Run.model)
            .distinct()
            .join(Item, Item.run_id == Run.id)
            .where(
                Item.status.in_(TRANSITIONS["republish"].sources),
                Item.queued_at < older_than,
                *([Item.run_id == run_id] if run_id is not None else []),
            )
        ).scalars()
    )


def requeue_stale(
    conn: Connection,
    model: str,
    older_than: datetime,
    batch_size: int,
    run_id: int | None = None,
) -> list[Stranded]:
    """Queued items of ``model`` waiting since before ``older_than`` (their message is
    presumed lost): stamped queued now, so the next pass leaves them alone, and returned to
    be published again. A duplicate message is harmless: the claim takes each item once."""
    move = TRANSITIONS["republish"]
    now = utcnow()
    runs = sa.select(Run.id).where(Run.model == model)
    ids = list(
        conn.execute(
            sa.update(Item)
            .where(
                Item.status.in_(move.sources),
                Item.queued_at < older_than,
                Item.run_id.in_(runs),
                *([Item.run_id == run_id] if run_id is not None else []),
            )
            .values(status=move.target, queued_at=now, updated_at=now)
            .returning(Item.id)
        ).scalars()
    )
    return stranded(conn, ids, batch_size)
