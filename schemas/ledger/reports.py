"""What the ledger tells people: counts and failures (the manifest is in ``manifest``).

Calling convention: every function takes a Connection from the caller, opened with
``ledger.connect(engine)`` (so database failures are raised as LedgerUnavailable), and
only reads.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.ledger.runs import find_run_id
from skufleet.schemas.ledger.transitions import TERMINAL
from skufleet.schemas.tables import Item, ItemStatus, Run


@dataclass(frozen=True)
class RunStatus:
    """A run's items counted by status, and the renders they started in all."""

    run_name: str
    counts: dict[str, int]
    attempts: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts[status.value] for status in TERMINAL)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run_name, "counts": self.counts, "attempts": self.attempts}


@dataclass(frozen=True)
class RunSummary:
    """One line of ``skufleet runs``."""

    name: str
    model: str
    template: str
    created_at: datetime
    cancelled: bool
    status: RunStatus


def _counts(conn: Connection, run_ids: list[int]) -> dict[int, tuple[dict[str, int], int]]:
    """Per run id: its items counted by status (every status, zeros too), and its attempts."""
    found: dict[int, tuple[dict[str, int], int]] = {
        run_id: ({status.value: 0 for status in ItemStatus}, 0) for run_id in run_ids
    }
    rows = conn.execute(
        sa.select(
            Item.run_id,
            Item.status,
            sa.func.count(),
            sa.func.coalesce(sa.func.sum(Item.attempts), 0),
        )
        .where(Item.run_id.in_(run_ids))
        .group_by(Item.run_id, Item.status)
    ).all()
    for run_id, status, count, started in rows:
        counts, attempts = found[run_id]
        counts[ItemStatus(status).value] = int(count)
        found[run_id] = (counts, attempts + int(started))
    return found


def run_status(conn: Connection, run_name: str) -> RunStatus:
    """Items of run ``run_name`` counted by status, and the renders they started in all."""
    counts, attempts = _counts(conn, [find_run_id(conn, run_name)]).popitem()[1]
    return RunStatus(run_name=run_name, counts=counts, attempts=attempts)


def list_runs(conn: Connection) -> list[RunSummary]:
    """Every run, newest first, with its items counted by status."""
    runs = conn.execute(
        sa.select(
            Run.id, Run.name, Run.model, Run.template, Run.created_at, Run.cancelled_at
        ).order_by(Run.created_at.desc(), Run.id.desc())
    ).all()
    counts = _counts(conn, [run.id for run in runs])
    return [
        RunSummary(
            run.name,
            run.model,
            run.template,
            run.created_at,
            run.cancelled_at is not None,
            RunStatus(run.name, *counts[run.id]),
        )
        for run in runs
    ]


def finished_since(conn: Connection, run_name: str, since: datetime) -> int:
    """Items of the run that reached succeeded or failed after ``since`` (for items/s)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(
                Item.run_id == find_run_id(conn, run_name),
                Item.status.in_([ItemStatus.SUCCEEDED, ItemStatus.FAILED]),
                Item.finished_at >= since,
            )
        ).scalar_one()
    )


def failure_reasons(conn: Connection, run_name: str, limit: int = 10) -> list[tuple[str, int]]:
    """The run's failed items grouped by the first line of their last error, commonest first."""
    reasons: dict[str, int] = {}
    errors = conn.execute(
        sa.select(Item.last_error).where(
            Item.run_id == find_run_id(conn, run_name), Item.status == ItemStatus.FAILED
        )
    ).scalars()
    for error in errors:
        reason = (error or "no error recorded").splitlines()[0][:160]
        reasons[reason] = reasons.get(reason, 0) + 1
    return sorted(reasons.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]
