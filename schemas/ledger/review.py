"""Human review: a run's stored images with their scores, and reviewers' decisions.

An item whose best image failed a quality check ends ``needs_review``: stored, but out of
the manifest. A reviewer approves it (``approve``: it joins the manifest) or rejects it
(``reject``: back to pending, drawn again with its next seed variant, since ``next_roll``
is past every roll it had). A succeeded item may be rejected too. Every decision is a row
of ``reviews``, with who and when; either clears the run's completion mark, so its next
completion publishes the manifest that includes it (``run.updated``).

Calling convention: every function takes a Connection from the caller, opened with
``ledger.begin(engine)`` for a decision or ``ledger.connect(engine)`` for a read.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.ledger.engine import utcnow
from skufleet.schemas.ledger.transitions import TRANSITIONS
from skufleet.schemas.tables import Candidate, Item, ItemStatus, Review, Run

Decision = Literal["approved", "rejected"]
DECISIONS: tuple[Decision, ...] = ("approved", "rejected")
REVIEWABLE = (ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW)
"""Statuses whose items have a stored image a reviewer can look at."""


@dataclass(frozen=True)
class Reviewed:
    """One item of a run as the review page shows it."""

    id: int
    sku: str
    shot: str
    title: str
    category: str
    prompt: str
    status: str
    seed: int
    """The stored image's seed (its roll's seed variant)."""
    roll: int
    renders: int
    rerolls: int
    verdict: str | None
    scores: dict[str, Any]
    object_key: str | None
    sha256: str | None
    decision: str | None = None
    reviewer: str | None = None
    decided_at: str | None = None
    candidates: list[dict[str, Any]] = field(default_factory=list)

    @property
    def failed(self) -> list[str]:
        return [name for name, v in self.scores.items() if not v.get("passed", True)]

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "sku": self.sku,
            "shot": self.shot,
            "title": self.title,
            "category": self.category,
            "prompt": self.prompt,
            "status": self.status,
            "seed": self.seed,
            "roll": self.roll,
            "renders": self.renders,
            "rerolls": self.rerolls,
            "verdict": self.verdict,
            "scores": self.scores,
            "failed": self.failed,
            "object_key": self.object_key,
            "sha256": self.sha256,
            "decision": self.decision,
            "reviewer": self.reviewer,
            "decided_at": self.decided_at,
            "candidates": self.candidates,
        }


def reviewable(conn: Connection, run_id: int, *, limit: int | None = None) -> list[Reviewed]:
    """The run's items with a stored image (succeeded and needs review), by category, SKU
    and shot, each with its latest decision and every candidate drawn for it."""
    latest = (
        sa.select(Review.item_id, sa.func.max(Review.id).label("review_id"))
        .where(Review.run_id == run_id)
        .group_by(Review.item_id)
        .subquery()
    )
    query = (
        sa.select(
            Item.id,
            Item.sku,
            Item.shot,
            Item.fields,
            Item.prompt,
            Item.status,
            Item.seed,
            Item.image_seed,
            Item.roll,
            Item.renders,
            Item.rerolls,
            Item.verdict,
            Item.quality,
            Item.object_key,
            Item.sha256,
            Review.decision,
            Review.reviewer,
            Review.created_at,
        )
        .select_from(Item)
        .outerjoin(latest, latest.c.item_id == Item.id)
        .outerjoin(Review, Review.id == latest.c.review_id)
        .where(Item.run_id == run_id, Item.status.in_(REVIEWABLE))
        .order_by(Item.sku, Item.shot)
    )
    if limit is not None:
        query = query.limit(limit)
    rows = conn.execute(query).all()
    drawn: dict[int, list[dict[str, Any]]] = {}
    ids = [int(row.id) for row in rows]
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for c in conn.execute(
            sa.select(
                Candidate.item_id,
                Candidate.attempt,
                Candidate.roll,
                Candidate.seed,
                Candidate.passed,
                Candidate.kept,
                Candidate.scores,
            )
            .where(Candidate.item_id.in_(chunk))
            .order_by(Candidate.item_id, Candidate.id)
        ):
            drawn.setdefault(c.item_id, []).append(
                {
                    "attempt": c.attempt,
                    "roll": c.roll,
                    "seed": c.seed,
                    "passed": c.passed,
                    "kept": c.kept,
                    "scores": json.loads(c.scores or "{}"),
                }
            )
    found = []
    for row in rows:
        fields = json.loads(row.fields or "{}")
        found.append(
            Reviewed(
                id=int(row.id),
                sku=row.sku,
                shot=row.shot,
                title=str(fields.get("title") or ""),
                category=str(fields.get("category") or ""),
                prompt=row.prompt,
                status=str(row.status),
                seed=int(row.image_seed if row.image_seed is not None else row.seed),
                roll=int(row.roll or 0),
                renders=int(row.renders or 0),
                rerolls=int(row.rerolls or 0),
                verdict=row.verdict,
                scores=json.loads(row.quality or "{}"),
                object_key=row.object_key,
                sha256=row.sha256,
                decision=row.decision,
                reviewer=row.reviewer,
                decided_at=None if row.created_at is None else row.created_at.isoformat(),
                candidates=drawn.get(int(row.id), []),
            )
        )
    found.sort(key=lambda r: (r.category, r.sku, r.shot))
    return found


def find_items(conn: Connection, run_id: int, pairs: Sequence[tuple[str, str | None]]) -> list[int]:
    """Ids of the run's items for ``(sku, shot)`` pairs (shot None: every shot of the SKU);
    ConfigError naming the first pair the run does not have."""
    ids: list[int] = []
    for sku, shot in pairs:
        query = sa.select(Item.id).where(Item.run_id == run_id, Item.sku == sku)
        if shot is not None:
            query = query.where(Item.shot == shot)
        found = [int(i) for i in conn.execute(query.order_by(Item.id)).scalars()]
        if not found:
            what = f"SKU {sku!r}" + ("" if shot is None else f" shot {shot!r}")
            raise ConfigError(f"the run has no item for {what}")
        ids += [i for i in found if i not in ids]
    return ids


def decide(
    conn: Connection, run_id: int, item_id: int, decision: Decision, reviewer: str, note: str = ""
) -> ItemStatus | None:
    """Record ``reviewer``'s decision on an item of the run and make its move: approve
    (needs_review → succeeded; a succeeded item stays so, its approval recorded) or reject
    (succeeded | needs_review → pending, with a fresh attempt budget). Returns the item's
    new status, or None when it has no stored image to decide on (it is rendering, failed,
    or not an item of the run): then nothing is recorded."""
    if decision not in DECISIONS:
        raise ConfigError(f"a decision is one of {', '.join(DECISIONS)}, not {decision!r}")
    row = conn.execute(
        sa.select(Item.status, Item.image_seed, Item.seed, Item.sha256).where(
            Item.id == item_id, Item.run_id == run_id
        )
    ).first()
    if row is None or row.status not in REVIEWABLE:
        return None
    now = utcnow()
    if decision == "approved":
        move = TRANSITIONS["approve"]
        status = ItemStatus.SUCCEEDED
        if row.status in move.sources:
            changed = conn.execute(
                sa.update(Item)
                .where(Item.id == item_id, Item.status.in_(move.sources))
                .values(status=move.target, verdict="approved", last_error=None, updated_at=now)
            ).rowcount
            if changed != 1:
                return None
    else:
        move = TRANSITIONS["reject"]
        status = move.target
        changed = conn.execute(
            sa.update(Item)
            .where(Item.id == item_id, Item.status.in_(move.sources))
            .values(
                status=move.target,
                attempts_before_retry=Item.attempts,
                last_error=f"rejected by {reviewer[:200]}",
                finished_at=None,
                updated_at=now,
            )
        ).rowcount
        if changed != 1:
            return None
    conn.execute(
        sa.insert(Review).values(
            item_id=item_id,
            run_id=run_id,
            decision=decision,
            reviewer=reviewer[:255],
            seed=row.image_seed if row.image_seed is not None else row.seed,
            sha256=row.sha256,
            note=note,
            created_at=now,
        )
    )
    conn.execute(
        sa.update(Run)
        .where(Run.id == run_id)
        .values(completed_at=None, cancelled_at=None, updated_at=now)
    )
    return status


def decisions(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """Every decision on the run's items, oldest first."""
    rows = conn.execute(
        sa.select(
            Review.item_id,
            Item.sku,
            Item.shot,
            Review.decision,
            Review.reviewer,
            Review.seed,
            Review.created_at,
        )
        .join(Item, Item.id == Review.item_id)
        .where(Review.run_id == run_id)
        .order_by(Review.id)
    ).all()
    return [
        {
            "item_id": row.item_id,
            "sku": row.sku,
            "shot": row.shot,
            "decision": row.decision,
            "reviewer": row.reviewer,
            "seed": row.seed,
            "at": row.created_at.isoformat(),
        }
        for row in rows
    ]
