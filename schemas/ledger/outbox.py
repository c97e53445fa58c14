"""The outbox of webhook events: written in the ledger first, delivered after.

An event is recorded when something happens (a run completes) and stays in ``events`` until
the webhook answers it with a 2xx. Delivery claims an event due now by moving its
``next_attempt_at`` past the longest a delivery can take (a compare-and-set UPDATE, so two
deliverers never send the same event at once), then marks it delivered, or failed with the
next attempt :func:`backoff` away. An event whose deliverer died is due again when its claim
runs out.

Calling convention: every function takes the Engine and commits its own transaction (opened
with ``begin``, so database failures are raised as LedgerUnavailable): a claimed event must
be committed as claimed before it is sent. :func:`add` alone takes the caller's Connection,
so that an event commits with what it reports (a run's completion).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skufleet.schemas.ledger.engine import begin, utcnow
from skufleet.schemas.tables import Event

RUN_COMPLETED = "run.completed"
"""A run's last open item is done, for the first time; its manifest is in the bucket."""
RUN_UPDATED = "run.updated"
"""A run that had completed changed (items retried, changed, added or retired) and is done
again; its new manifest is in the bucket."""

FIRST_BACKOFF = timedelta(seconds=30)
"""Wait after the first failed delivery; it doubles with each failure after it."""
MAX_BACKOFF = timedelta(hours=1)
"""The longest wait between two deliveries of one event."""
CLAIM = timedelta(seconds=60)
"""How long a claimed event belongs to its deliverer: well past one delivery's timeouts."""
MAX_ERROR = 1000
"""Characters of a delivery error kept in ``last_error``."""


@dataclass(frozen=True)
class PendingEvent:
    """An event claimed for delivery: its body is ``payload`` as it was recorded."""

    event_id: str
    run_id: int | None
    kind: str
    payload: dict[str, Any]
    attempts: int
    """Deliveries started, this one included."""


def backoff(attempts: int) -> timedelta:
    """The wait after ``attempts`` failed deliveries: 30 s, 1 min, 2 min, … at most 1 h."""
    if attempts < 1:
        return timedelta(0)
    return min(FIRST_BACKOFF * 2 ** min(attempts - 1, 32), MAX_BACKOFF)


def record(engine: Engine, run_id: int | None, kind: str, payload: dict[str, Any]) -> str:
    """Add an event due now; its id. The stored body is ``payload`` with ``"id"`` (the
    event id) and ``"event"`` (``kind``) added, so a receiver can deduplicate."""
    with begin(engine) as conn:
        return add(conn, run_id, kind, payload)


def add(conn: Connection, run_id: int | None, kind: str, payload: dict[str, Any]) -> str:
    """:func:`record` in the caller's transaction."""
    event_id = str(uuid.uuid4())
    now = utcnow()
    conn.execute(
        sa.insert(Event).values(
            event_id=event_id,
            run_id=run_id,
            kind=kind,
            payload={**payload, "event": kind, "id": event_id},
            attempts=0,
            next_attempt_at=now,
            created_at=now,
        )
    )
    return event_id


def claim_due(engine: Engine, limit: int = 1, now: datetime | None = None) -> list[PendingEvent]:
    """Claim up to ``limit`` undelivered events whose next attempt is due, oldest first.

    Each claim counts an attempt and holds the event for :data:`CLAIM`: another deliverer
    does not see it until then, or until :func:`mark_failed` sets its next attempt.
    """
    now = now or utcnow()
    due = (
        (Event.delivered_at.is_(None)) & (Event.next_attempt_at <= now)  # re-checked per row
    )
    oldest = sa.select(Event.id).where(due).order_by(Event.next_attempt_at, Event.id).limit(limit)
    statement = (
        sa.update(Event)
        .where(Event.id.in_(oldest.scalar_subquery()), due)
        .values(attempts=Event.attempts + 1, next_attempt_at=now + CLAIM)
        .returning(Event.event_id, Event.run_id, Event.kind, Event.payload, Event.attempts)
    )
    with begin(engine) as conn:
        rows = conn.execute(statement).all()
    return [
        PendingEvent(
            event_id=row.event_id,
            run_id=row.run_id,
            kind=row.kind,
            payload=dict(row.payload),
            attempts=int(row.attempts),
        )
        for row in rows
    ]


def mark_delivered(engine: Engine, event_id: str) -> bool:
    """The webhook took the event; False if it was already marked delivered."""
    now = utcnow()
    with begin(engine) as conn:
        done = conn.execute(
            sa.update(Event)
            .where(Event.event_id == event_id, Event.delivered_at.is_(None))
            .values(delivered_at=now, last_error=None)
            .returning(Event.id)
        ).first()
    return done is not None


def mark_failed(engine: Engine, event_id: str, error: str) -> datetime | None:
    """The delivery failed with ``error``: the event is due again after :func:`backoff` of
    its attempts. The next attempt's time, or None if the event is delivered or gone."""
    now = utcnow()
    with begin(engine) as conn:
        attempts = conn.execute(
            sa.select(Event.attempts).where(
                Event.event_id == event_id, Event.delivered_at.is_(None)
            )
        ).scalar()
        if attempts is None:
            return None
        next_attempt = now + backoff(int(attempts))
        conn.execute(
            sa.update(Event)
            .where(Event.event_id == event_id, Event.delivered_at.is_(None))
            .values(next_attempt_at=next_attempt, last_error=error[:MAX_ERROR])
        )
    return next_attempt
