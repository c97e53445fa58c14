"""What the ledger tells people: counts, recent pace, retries and failures grouped by
kind (the manifest is in ``manifest``).

Calling convention: every function takes a Connection from the caller, opened with
``ledger.connect(engine)`` (so database failures are raised as LedgerUnavailable), and
only reads; :func:`error_kind` is plain text work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.ledger.runs import find_run_id
from skufleet.schemas.ledger.transitions import OPEN, TERMINAL
from skufleet.schemas.tables import Item, ItemStatus, Run


@dataclass(frozen=True)
class RunStatus:
    """A run's items counted by status, the renders they started in all, and what the
    quality gate drew for them.

    ``renders`` and ``rerolls`` sum ``items.renders`` and ``items.rerolls`` over every item
    of the run (retired ones included: they were drawn): candidate images drawn, and those
    drawn again because every candidate before failed a check."""

    run_name: str
    counts: dict[str, int]
    attempts: int
    renders: int = 0
    rerolls: int = 0

    @property
    def total(self) -> int:
        """Items of the run's current catalogue: retired ones (SKUs dropped from it) apart."""
        return sum(n for status, n in self.counts.items() if status != ItemStatus.RETIRED.value)

    @property
    def done(self) -> int:
        """Items of the current catalogue at rest (succeeded, needs_review, failed or
        cancelled)."""
        return sum(
            self.counts.get(status.value, 0)
            for status in TERMINAL
            if status is not ItemStatus.RETIRED
        )

    @property
    def needs_review(self) -> int:
        """Items whose stored image failed a quality check: waiting for a reviewer."""
        return self.counts.get(ItemStatus.NEEDS_REVIEW.value, 0)

    @property
    def stored(self) -> int:
        """Items of the current catalogue with a stored image: succeeded or needs_review."""
        return self.counts.get(ItemStatus.SUCCEEDED.value, 0) + self.needs_review

    @property
    def usable_ratio(self) -> float | None:
        """Of the items the fleet finished with (succeeded, needs_review, failed: cancelled
        and retired ones apart), the share that succeeded, 0-1: usable as they are, without
        a reviewer. None while none is finished."""
        succeeded = self.counts.get(ItemStatus.SUCCEEDED.value, 0)
        finished = self.stored + self.counts.get(ItemStatus.FAILED.value, 0)
        return succeeded / finished if finished else None

    @property
    def renders_per_item(self) -> float | None:
        """Candidate images drawn per stored image (``renders / stored``): 1.0 with one
        candidate and nothing re-rolled. None while nothing is stored, or nothing was
        counted (items stored before ledger revision 0007)."""
        return self.renders / self.stored if self.stored and self.renders else None

    def as_dict(self) -> dict[str, Any]:
        usable, per_item = self.usable_ratio, self.renders_per_item
        return {
            "run": self.run_name,
            "counts": self.counts,
            "attempts": self.attempts,
            "needs_review": self.needs_review,
            "renders": self.renders,
            "rerolls": self.rerolls,
            "usable_ratio": None if usable is None else round(usable, 4),
            "renders_per_item": None if per_item is None else round(per_item, 3),
        }


@dataclass(frozen=True)
class RunSummary:
    """One line of ``skufleet runs``."""

    name: str
    model: str
    template: str
    created_at: datetime
    cancelled: bool
    status: RunStatus


@dataclass
class _Tally:
    counts: dict[str, int]
    attempts: int = 0
    renders: int = 0
    rerolls: int = 0


def _counts(conn: Connection, run_ids: list[int]) -> dict[int, _Tally]:
    """Per run id: its items counted by status (every status, zeros too), and the sums of
    their attempts, renders and re-rolls."""
    found = {run_id: _Tally({status.value: 0 for status in ItemStatus}) for run_id in run_ids}
    coalesce = sa.func.coalesce
    rows = conn.execute(
        sa.select(
            Item.run_id,
            Item.status,
            sa.func.count(),
            coalesce(sa.func.sum(Item.attempts), 0),
            coalesce(sa.func.sum(Item.renders), 0),
            coalesce(sa.func.sum(Item.rerolls), 0),
        )
        .where(Item.run_id.in_(run_ids))
        .group_by(Item.run_id, Item.status)
    ).all()
    for run_id, status, count, attempts, renders, rerolls in rows:
        tally = found[run_id]
        tally.counts[ItemStatus(status).value] = int(count)
        tally.attempts += int(attempts)
        tally.renders += int(renders)
        tally.rerolls += int(rerolls)
    return found


def _status(run_name: str, tally: _Tally) -> RunStatus:
    return RunStatus(run_name, tally.counts, tally.attempts, tally.renders, tally.rerolls)


def run_status(conn: Connection, run_name: str) -> RunStatus:
    """Items of run ``run_name`` counted by status, with their attempts, renders and
    re-rolls (:class:`RunStatus`)."""
    return _status(run_name, _counts(conn, [find_run_id(conn, run_name)]).popitem()[1])


def list_runs(conn: Connection, *, active_since: datetime | None = None) -> list[RunSummary]:
    """Every run, newest first, with its items counted by status.

    With ``active_since``, only the runs still open (an item pending, queued or running) and
    those created, changed or completed since then: what a dashboard shows, not every run
    ever made.
    """
    query = sa.select(
        Run.id, Run.name, Run.model, Run.template, Run.created_at, Run.cancelled_at
    ).order_by(Run.created_at.desc(), Run.id.desc())
    if active_since is not None:
        open_items = sa.select(Item.id).where(Item.run_id == Run.id, Item.status.in_(OPEN))
        query = query.where(
            sa.or_(
                open_items.exists(),
                Run.created_at >= active_since,
                Run.updated_at >= active_since,
                Run.completed_at >= active_since,
            )
        )
    runs = conn.execute(query).all()
    counts = _counts(conn, [run.id for run in runs])
    return [
        RunSummary(
            run.name,
            run.model,
            run.template,
            run.created_at,
            run.cancelled_at is not None,
            _status(run.name, counts[run.id]),
        )
        for run in runs
    ]


def recent_finishes(
    conn: Connection, run_name: str, now: datetime, window: timedelta
) -> tuple[int, float]:
    """The run's pace: items that reached succeeded, needs_review or failed within
    ``window`` before ``now``, and the seconds of work that window covers.

    The window starts at the earliest claim among those items and the items still running,
    if that is later than ``now - window``: a run 10 s into its first batch is measured over
    its own 10 s, not over a minute it has not lived yet.
    """
    run_id = find_run_id(conn, run_name)
    since = now - window
    finished, first_claim = conn.execute(
        sa.select(sa.func.count(), sa.func.min(Item.started_at)).where(
            Item.run_id == run_id,
            Item.status.in_([ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW, ItemStatus.FAILED]),
            Item.finished_at >= since,
        )
    ).one()
    running_claim = conn.execute(
        sa.select(sa.func.min(Item.started_at)).where(
            Item.run_id == run_id, Item.status == ItemStatus.RUNNING
        )
    ).scalar()
    claims = [_aware(at, now) for at in (first_claim, running_claim) if at is not None]
    start = max([since, min(claims)]) if claims else since
    return int(finished), max(0.0, (now - start).total_seconds())


def _aware(at: datetime, like: datetime) -> datetime:
    """SQLite hands timestamps back without their zone (they were stored in UTC)."""
    return at.replace(tzinfo=like.tzinfo) if at.tzinfo is None else at


def error_kind(error: str | None) -> str:
    """What kind of error ``error`` is, without what belongs to one item: the first line,
    with quoted text (keys, prompts, names), URLs, paths, worker names, hashes, ids and
    numbers replaced, so that the same failure of a thousand items is one kind.

    ``"StorageRefused: upload of 'r/A-1/front.png' refused: …"`` and the same for
    ``'r/B-2/front.png'`` are both ``"StorageRefused: upload of … refused: …"``.
    """
    lines = (error or "").strip().splitlines()
    if not lines:
        return "no error recorded"
    text = lines[0]
    for pattern, replacement in _ITEM_SPECIFIC:
        text = pattern.sub(replacement, text)
    text = _REPEATED.sub("…", _SPACE.sub(" ", text)).strip()
    return text if len(text) <= KIND_CHARACTERS else text[: KIND_CHARACTERS - 1] + "…"


KIND_CHARACTERS = 160
"""Longest kind shown; longer ones are cut with an ellipsis."""

_ITEM_SPECIFIC: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?<!\w)'[^']*'(?!\w)|(?<!\w)\"[^\"]*\"(?!\w)"), "…"),  # repr'd values
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"()<>,]+", re.IGNORECASE), "…"),  # URLs
    (re.compile(r"\b[\w.-]+@[\w.-]+"), "…"),  # worker names: gpu0@host-a
    (re.compile(r"(?<![\w/])[\w.~%+-]*(?:/[\w.~%+@=-]+)+/?"), "…"),  # paths, object keys
    (re.compile(r"\b0x[0-9a-f]+\b|\b(?=[0-9a-f-]*\d)[0-9a-f]{8,}(?:-[0-9a-f]{4,})*\b", re.I), "…"),
    (re.compile(r"\b(?=[\w-]*\d)\w+(?:[-_]\w+)+\b"), "…"),  # ids: SKU-00042, A1_B2
    (re.compile(r"(?<![\w.])[-+]?\d+(?:[.,]\d+)*"), "N"),  # counts, sizes, item ids
)
_REPEATED = re.compile(r"…(?:[\s,;]*…)+")
_SPACE = re.compile(r"\s+")


def _kinds(conn: Connection, *where: Any, limit: int) -> tuple[int, list[tuple[str, int]]]:
    """Items matching ``where`` that have an error: how many, and their kinds with counts,
    commonest first (at most ``limit`` kinds)."""
    kinds: dict[str, int] = {}
    rows = conn.execute(
        sa.select(Item.last_error, sa.func.count()).where(*where).group_by(Item.last_error)
    ).all()
    for error, count in rows:
        kind = error_kind(error)
        kinds[kind] = kinds.get(kind, 0) + int(count)
    ranked = sorted(kinds.items(), key=lambda pair: (-pair[1], pair[0]))
    return sum(kinds.values()), ranked[:limit]


def failure_reasons(conn: Connection, run_name: str, limit: int = 10) -> list[tuple[str, int]]:
    """The run's failed items grouped by the kind of their last error (:func:`error_kind`),
    commonest first."""
    run_id = find_run_id(conn, run_name)
    where = (Item.run_id == run_id, Item.status == ItemStatus.FAILED)
    return _kinds(conn, *where, limit=limit)[1]


def retrying(conn: Connection, run_name: str, limit: int = 10) -> tuple[int, list[tuple[str, int]]]:
    """The run's items that are being tried again: open (pending, queued or running) with
    the error of an earlier attempt recorded (a retryable error, an expired lease, a device
    that failed, or `skufleet retry` after a failure). How many, and the kinds of their last
    errors, commonest first."""
    run_id = find_run_id(conn, run_name)
    where = (Item.run_id == run_id, Item.status.in_(OPEN), Item.last_error.is_not(None))
    return _kinds(conn, *where, limit=limit)


def missing_items(conn: Connection, run_name: str) -> list[dict[str, Any]]:
    """The run's items that did not succeed (for ``skufleet generate``, whose runs are a few
    dozen items at most): sku, shot, status and last error, in item order (a needs_review
    item's error names the checks it failed)."""
    rows = conn.execute(
        sa.select(Item.sku, Item.shot, Item.status, Item.last_error)
        .where(Item.run_id == find_run_id(conn, run_name), Item.status != ItemStatus.SUCCEEDED)
        .order_by(Item.id)
    ).all()
    return [
        {"sku": sku, "shot": shot, "status": ItemStatus(status).value, "error": error}
        for sku, shot, status, error in rows
    ]
