"""Operations on a whole run: finding it, cancelling, retrying, marking it complete, and
the objects of its retired items.

Calling convention: every function takes a Connection from the caller, opened with
``ledger.begin(engine)`` for a change or ``ledger.connect(engine)`` for a read (so database
failures are raised as LedgerUnavailable); the caller's block is the transaction.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.ledger.engine import utcnow
from skufleet.schemas.ledger.transitions import OPEN, TRANSITIONS
from skufleet.schemas.params import DEFAULT_BATCH_SIZE
from skufleet.schemas.tables import Item, ItemStatus, Run


def find_run_id(conn: Connection, run_name: str) -> int:
    """The id of the run called ``run_name``; ConfigError if there is none."""
    found = conn.execute(sa.select(Run.id).where(Run.name == run_name)).scalar()
    if found is None:
        raise ConfigError(f"no run named {run_name!r} in the ledger")
    return int(found)


def find_run_name(conn: Connection, run_id: int) -> str | None:
    """The name of run ``run_id``; None if there is no such run."""
    return conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar()


def run_settings(conn: Connection, run_id: int) -> tuple[str, int]:
    """The run's model and the batch size of its latest enqueue (the default where that
    enqueue recorded none)."""
    model, params = conn.execute(sa.select(Run.model, Run.params).where(Run.id == run_id)).one()
    return str(model), int(params.get("batch_size", DEFAULT_BATCH_SIZE))


def cancel_run(conn: Connection, run_id: int) -> int:
    """pending | queued → cancelled for the whole run; returns how many items it stopped.

    Workers skip cancelled items when their message arrives; running items finish.
    """
    move = TRANSITIONS["cancel"]
    now = utcnow()
    cancelled = conn.execute(
        sa.update(Item)
        .where(Item.run_id == run_id, Item.status.in_(move.sources))
        .values(status=move.target, queued_at=None, updated_at=now)
    ).rowcount
    conn.execute(sa.update(Run).where(Run.id == run_id).values(cancelled_at=now, updated_at=now))
    return int(cancelled)


def retry_run(conn: Connection, run_id: int, *, failed_only: bool) -> int:
    """failed (and cancelled, unless ``failed_only``) → pending, with a fresh attempt budget.

    ``attempts`` keeps growing (it is the fencing token); the cap counts from here.
    """
    move = TRANSITIONS["retry_run"]
    sources = move.narrowed(ItemStatus.FAILED) if failed_only else move.sources
    now = utcnow()
    retried = conn.execute(
        sa.update(Item)
        .where(Item.run_id == run_id, Item.status.in_(sources))
        .values(
            status=move.target,
            attempts_before_retry=Item.attempts,
            finished_at=None,
            updated_at=now,
        )
    ).rowcount
    conn.execute(
        sa.update(Run)
        .where(Run.id == run_id)
        .values(cancelled_at=None, completed_at=None, updated_at=now)
    )
    return int(retried)


def complete_run(conn: Connection, run_id: int) -> bool:
    """Mark the run completed if it has no open item left; True for exactly one caller
    (a compare-and-set UPDATE: commit the caller's transaction at once).

    Workers call this when they finish a batch; the one that wins writes the manifest and
    calls the webhook. New work for the run (an enqueue, a retry) clears the mark.
    """
    open_items = sa.select(Item.id).where(Item.run_id == run_id, Item.status.in_(OPEN))
    now = utcnow()
    won = conn.execute(
        sa.update(Run)
        .where(Run.id == run_id, Run.completed_at.is_(None), ~open_items.exists())
        .values(completed_at=now, updated_at=now)
        .returning(Run.id)
    ).first()
    return won is not None


def record_completion(conn: Connection, run_id: int, digest: str) -> int | None:
    """Count a completion that published a manifest with ``digest`` (SHA-256 of its lines
    and counts); its number (1: the run's first), or None when the last one published the
    same digest, or the run is no longer marked completed (new work came in). One
    compare-and-set UPDATE: record the completion's event in the same transaction."""
    done = conn.execute(
        sa.update(Run)
        .where(
            Run.id == run_id,
            Run.completed_at.is_not(None),
            sa.or_(Run.manifest_digest.is_(None), Run.manifest_digest != digest),
        )
        .values(completions=Run.completions + 1, manifest_digest=digest)
        .returning(Run.completions)
    ).scalar()
    return None if done is None else int(done)


def retired_objects(conn: Connection, run_id: int, limit: int) -> list[tuple[int, str]]:
    """``(item id, object key)`` of up to ``limit`` retired items of the run whose object
    the ledger still holds, in id order."""
    rows = conn.execute(
        sa.select(Item.id, Item.object_key)
        .where(
            Item.run_id == run_id,
            Item.status == ItemStatus.RETIRED,
            Item.sha256.is_not(None),
            Item.object_key.is_not(None),
        )
        .order_by(Item.id)
        .limit(limit)
    ).all()
    return [(int(row.id), str(row.object_key)) for row in rows]


def forget_objects(conn: Connection, item_ids: list[int]) -> int:
    """The objects of these retired items were deleted: the ledger no longer holds them, so
    a revived item is drawn again. Returns how many items it changed."""
    return int(
        conn.execute(
            sa.update(Item)
            .where(Item.id.in_(item_ids), Item.status == ItemStatus.RETIRED)
            .values(
                byte_size=None,
                sha256=None,
                image_width=None,
                image_height=None,
                image_format=None,
                updated_at=utcnow(),
            )
        ).rowcount
    )


def reopen_run(conn: Connection, run_id: int) -> None:
    """Undo :func:`complete_run` when its follow-up (the manifest) could not be written."""
    conn.execute(sa.update(Run).where(Run.id == run_id).values(completed_at=None))


def finished_runs(conn: Connection) -> list[int]:
    """Runs with items, none of them open, not yet marked completed."""
    open_items = sa.select(Item.id).where(Item.run_id == Run.id, Item.status.in_(OPEN))
    any_item = sa.select(Item.id).where(Item.run_id == Run.id)
    return list(
        conn.execute(
            sa.select(Run.id).where(
                Run.completed_at.is_(None), any_item.exists(), ~open_items.exists()
            )
        ).scalars()
    )
