"""A worker's finishes: the items of a stored batch recorded in one round trip.

Calling convention: as ``claims`` (every function takes the Engine and commits its own
transaction). Each finish is fenced like every settle of ``claims``: an item is finished
only while it is running and ``attempts`` is still the claim's. A batch is recorded by one
``UPDATE … FROM (VALUES …) RETURNING id`` on PostgreSQL (one row of values per item, so
the batch costs one round trip, not one per image), and by one statement per item in the
same transaction on SQLite (a file on the same machine: no round trip to save). The
candidates of the items that were finished are inserted in the same transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skufleet.schemas.ledger.claims import Claim, Gated, signed64
from skufleet.schemas.ledger.engine import begin, utcnow
from skufleet.schemas.ledger.transitions import TRANSITIONS
from skufleet.schemas.tables import Candidate, Item, ItemStatus


@dataclass(frozen=True)
class Finished:
    """One stored image, as its worker records it."""

    item: Claim
    byte_size: int
    sha256: str
    render_seconds: float
    width: int
    """Pixels of the stored image, as encoded (labels and thumbnails make them differ from
    the drawn size)."""
    height: int
    image_format: str
    """``png``, ``webp`` or ``jpeg``."""
    gated: Gated | None = None
    """Every candidate drawn and which is kept; None for a render without the gate."""


_COLUMNS: dict[str, sa.types.TypeEngine[Any]] = {
    "id": sa.BigInteger(),
    "attempts": sa.Integer(),
    "status": sa.String(16),
    "byte_size": sa.BigInteger(),
    "sha256": sa.String(64),
    "image_width": sa.Integer(),
    "image_height": sa.Integer(),
    "image_format": sa.String(8),
    "render_seconds": sa.Float(),
    "image_seed": sa.BigInteger(),
    "roll": sa.Integer(),
    "next_roll": sa.Integer(),
    "add_renders": sa.Integer(),
    "add_rerolls": sa.Integer(),
    "verdict": sa.String(16),
    "quality": sa.Text(),
    "phash": sa.BigInteger(),
    "last_error": sa.Text(),
}
"""The values of one finish that differ by item, in the order of a row of VALUES."""


def _row(done: Finished) -> dict[str, Any]:
    item, gated = done.item, done.gated
    move = TRANSITIONS["finish"]
    row: dict[str, Any] = {
        "id": item.id,
        "attempts": item.attempt,
        "status": move.to(ItemStatus.SUCCEEDED).value,
        "byte_size": done.byte_size,
        "sha256": done.sha256,
        "image_width": done.width,
        "image_height": done.height,
        "image_format": done.image_format,
        "render_seconds": done.render_seconds,
        "image_seed": item.seed,
        "roll": item.next_roll,
        "next_roll": item.next_roll + 1,
        "add_renders": 1,
        "add_rerolls": 0,
        "verdict": None,
        "quality": "{}",
        "phash": None,
        "last_error": None,
    }
    if gated is not None:
        kept = gated.image
        failed = [name for name, verdict in kept.scores.items() if not verdict["passed"]]
        row.update(
            status=move.to(ItemStatus.SUCCEEDED if kept.passed else ItemStatus.NEEDS_REVIEW).value,
            image_seed=kept.seed,
            roll=kept.roll,
            next_roll=max(c.roll for c in gated.candidates) + 1,
            add_renders=len(gated.candidates),
            add_rerolls=sum(c.reroll for c in gated.candidates),
            verdict="passed" if kept.passed else "failed",
            quality=json.dumps(kept.scores, sort_keys=True, separators=(",", ":")),
            phash=signed64(gated.phash),
            last_error=None if kept.passed else f"quality: failed {', '.join(failed)}",
        )
    return row


def _set(source: Any, now: datetime) -> dict[str, Any]:
    """The SET of a finish, reading each item's values from ``source`` (its row)."""
    return {
        "status": source.status,
        "byte_size": source.byte_size,
        "sha256": source.sha256,
        "image_width": source.image_width,
        "image_height": source.image_height,
        "image_format": source.image_format,
        "render_seconds": source.render_seconds,
        "image_seed": source.image_seed,
        "roll": source.roll,
        "next_roll": source.next_roll,
        "renders": Item.renders + source.add_renders,
        "rerolls": Item.rerolls + source.add_rerolls,
        "verdict": source.verdict,
        "quality": source.quality,
        "phash": source.phash,
        "last_error": source.last_error,
        "finished_at": now,
        "lease_expires_at": None,
        "updated_at": now,
    }


class _Row:
    """One item's values as bound parameters, for the per-item statement."""

    def __init__(self, row: dict[str, Any]) -> None:
        for name, kind in _COLUMNS.items():
            setattr(self, name, sa.literal(row[name], kind))


def _update(conn: Connection, rows: list[dict[str, Any]], now: datetime) -> set[int]:
    move = TRANSITIONS["finish"]
    if conn.dialect.name == "postgresql" and len(rows) > 1:
        values = sa.values(
            *(sa.column(name, kind) for name, kind in _COLUMNS.items()), name="finished"
        ).data([tuple(row[name] for name in _COLUMNS) for row in rows])
        statement = (
            sa.update(Item)
            .where(
                Item.id == values.c.id,
                Item.attempts == values.c.attempts,
                Item.status.in_(move.sources),
            )
            .values(**_set(values.c, now))
            .returning(Item.id)
        )
        return {int(i) for i in conn.execute(statement).scalars()}
    done = set()
    for row in rows:
        one = (
            sa.update(Item)
            .where(
                Item.id == row["id"],
                Item.attempts == row["attempts"],
                Item.status.in_(move.sources),
            )
            .values(**_set(_Row(row), now))
        )
        if conn.execute(one).rowcount == 1:
            done.add(int(row["id"]))
    return done


def finish_many(engine: Engine, finished: Sequence[Finished]) -> set[int]:
    """running → succeeded (or needs_review, when the quality gate failed every candidate
    of an item) for each stored image whose item is still ours, in one transaction; the
    ids of the items finished (the others were taken over: fenced out). Each item's
    candidates are recorded with it."""
    if not finished:
        return set()
    now = utcnow()
    with begin(engine) as conn:
        done = _update(conn, [_row(f) for f in finished], now)
        candidates = [
            {
                "item_id": f.item.id,
                "run_id": f.item.run_id,
                "attempt": f.item.attempt,
                "roll": c.roll,
                "seed": c.seed,
                "scores": json.dumps(c.scores, sort_keys=True, separators=(",", ":")),
                "passed": c.passed,
                "kept": index == f.gated.kept,
                "created_at": now,
            }
            for f in finished
            if f.gated is not None and f.item.id in done
            for index, c in enumerate(f.gated.candidates)
        ]
        if candidates:
            conn.execute(sa.insert(Candidate), candidates)
    return done


def finish(
    engine: Engine,
    item: Claim,
    byte_size: int,
    sha256: str,
    render_seconds: float,
    *,
    width: int,
    height: int,
    image_format: str,
    gated: Gated | None = None,
) -> bool:
    """:func:`finish_many` for one item; False when it is no longer ours."""
    done = Finished(item, byte_size, sha256, render_seconds, width, height, image_format, gated)
    return item.id in finish_many(engine, [done])


def renew_many(engine: Engine, items: Sequence[Claim], lease_seconds: int) -> set[int]:
    """Extend our lease on each running item, in one statement; the ids still ours. Checked
    before a batch's uploads, so a worker that lost an item never writes its object."""
    if not items:
        return set()
    move = TRANSITIONS["renew"]
    now = utcnow()
    statement = (
        sa.update(Item)
        .where(
            sa.tuple_(Item.id, Item.attempts).in_([(c.id, c.attempt) for c in items]),
            Item.status.in_(move.sources),
        )
        .values(
            status=move.target,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(Item.id)
    )
    with begin(engine) as conn:
        return {int(i) for i in conn.execute(statement).scalars()}
