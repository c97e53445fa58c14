"""The worker's side of the ledger: claiming items, then settling each one it holds.

Calling convention: every function takes the Engine and commits its own transaction (opened
with ``begin``, so database failures are raised as LedgerUnavailable): a claim or a
finish is committed at once, whatever the worker does next.

A claim is one compare-and-set UPDATE … RETURNING, so two workers never both win an item.
The attempt number it returns is the fencing token: a worker settles an item only while
``attempts`` still equals its claim's, so a stale worker's late finish is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skufleet.schemas.ledger.columns import CLAIMED, PARAMS, columns
from skufleet.schemas.ledger.engine import begin, utcnow
from skufleet.schemas.ledger.transitions import TRANSITIONS, Transition
from skufleet.schemas.params import GenerationParams
from skufleet.schemas.tables import Item, ItemStatus, Run


@dataclass(frozen=True)
class Claim:
    """An item a worker won: everything needed to render and store it, all read from its
    row (never from the message), and its fencing token."""

    id: int
    run_id: int
    run_name: str
    sku: str
    shot: str
    prompt: str
    negative_prompt: str
    seed: int
    params: GenerationParams
    output: str
    """The item's OutputSpec as JSON."""
    object_key: str | None
    """Where the image goes, fixed at enqueue (None only for a row no enqueue has keyed)."""
    attempt: int
    attempts_before_retry: int = 0
    """Attempts made before the item was last retried or changed; the cap counts after it."""
    next_roll: int = 0
    """The first roll this render draws (past every roll stored before: see ``reject``)."""

    def may_retry(self, max_attempts: int) -> bool:
        return self.attempt - self.attempts_before_retry < max_attempts


@dataclass(frozen=True)
class ClaimResult:
    """What a claim found: the run, why the message was refused (if it was), what it won."""

    run_name: str | None
    """None: the message names no existing run."""
    refused: str | None
    """One line, when the message does not match the ledger: then nothing was claimed."""
    claims: list[Claim]
    quality: dict[str, Any] = field(default_factory=dict)
    """The run's quality settings (``Run.params["quality"]``): checks, thresholds,
    max_rolls, candidates; ``{}`` for the defaults."""


@dataclass(frozen=True)
class Drawn:
    """One candidate image a render drew for an item, as the ledger records it."""

    roll: int
    seed: int
    scores: dict[str, Any]
    """``{check: {score, threshold, passed}}``."""
    passed: bool
    reroll: bool
    """Drawn because every candidate before it failed a check."""


@dataclass(frozen=True)
class Gated:
    """What the quality gate made of an item's render: every candidate, and which is kept."""

    candidates: tuple[Drawn, ...]
    kept: int
    """Index into ``candidates`` of the stored image."""
    phash: int
    """The kept image's 64-bit perceptual hash (unsigned)."""

    @property
    def image(self) -> Drawn:
        return self.candidates[self.kept]


def signed64(value: int) -> int:
    """An unsigned 64-bit value as the signed BIGINT SQL stores."""
    return value - (1 << 64) if value >= 1 << 63 else value


def unsigned64(value: int) -> int:
    return value + (1 << 64) if value < 0 else value


def _refusal(
    conn: Connection, run_id: int, model: str, item_ids: Sequence[int]
) -> tuple[str | None, str | None, dict[str, Any]]:
    """``(run name, reason, quality settings)``: the reason is None when every item of the
    message is an item of run ``run_id`` and that run is drawn with ``model``."""
    wanted = sorted(set(item_ids))
    ours = (
        sa.select(sa.func.count())
        .where(Item.id.in_(wanted), Item.run_id == run_id)
        .scalar_subquery()
    )
    run = conn.execute(
        sa.select(Run.name, Run.model, Run.params, ours).where(Run.id == run_id)
    ).first()
    if run is None:
        return None, f"no run with id {run_id}", {}
    run_name, run_model, params, found = run
    quality = dict((params or {}).get("quality") or {})
    if run_model != model:
        return run_name, f"run {run_name} is for model {run_model!r}, not {model!r}", quality
    if found != len(wanted):
        return (
            run_name,
            f"{len(wanted) - found} of the message's items are not items of run {run_name}",
            quality,
        )
    return run_name, None, quality


def claim(
    engine: Engine,
    run_id: int,
    model: str,
    item_ids: Sequence[int],
    worker: str,
    device: str,
    lease_seconds: int,
) -> ClaimResult:
    """queued → running for those of ``item_ids`` that are items of run ``run_id``, whose
    model is ``model`` (the one the worker holds), and are still queued; one transaction.

    A message that names another run's items, or a run of another model, or no run, is
    refused as a whole: nothing is claimed and the reason is returned. Items already running
    elsewhere, succeeded, failed or cancelled are not returned: the caller renders only what
    it won, so a duplicate message is harmless.
    """
    move = TRANSITIONS["claim"]
    now = utcnow()
    statement = (
        sa.update(Item)
        .where(
            Item.id.in_(item_ids),
            Item.run_id == run_id,
            Item.run_id.in_(sa.select(Run.id).where(Run.id == run_id, Run.model == model)),
            Item.status.in_(move.sources),
        )
        .values(
            status=move.target,
            attempts=Item.attempts + 1,
            worker=worker,
            device=device,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(*columns(CLAIMED))
    )
    with begin(engine) as conn:
        run_name, refused, quality = _refusal(conn, run_id, model, item_ids)
        if run_name is None or refused is not None:
            return ClaimResult(run_name, refused, [])
        rows = conn.execute(statement).all()
    claims = [
        Claim(
            id=int(r.id),
            run_id=int(r.run_id),
            run_name=run_name,
            sku=r.sku,
            shot=r.shot,
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            seed=int(r.seed),
            params=GenerationParams(**{name: r._mapping[name] for name in PARAMS}),
            output=r.output,
            object_key=r.object_key,
            attempt=int(r.attempts),
            attempts_before_retry=int(r.attempts_before_retry),
            next_roll=int(r.next_roll),
        )
        for r in rows
    ]
    return ClaimResult(run_name, None, sorted(claims, key=lambda c: c.id), quality)


def _fenced(
    conn: Connection, item: Claim, move: Transition, values: dict[str, Any], target: Any = None
) -> bool:
    """Make ``move`` on an item we hold, writing ``values`` too: only from the move's
    sources, and only while ``attempts`` is still the claim's. False if it is not ours."""
    result = conn.execute(
        sa.update(Item)
        .where(
            Item.id == item.id,
            Item.attempts == item.attempt,
            Item.status.in_(move.sources),
        )
        .values(status=move.target if target is None else target, **values)
    )
    return result.rowcount == 1


def _fenced_update(engine: Engine, item: Claim, move: Transition, values: dict[str, Any]) -> bool:
    with begin(engine) as conn:
        return _fenced(conn, item, move, values)


def renew(engine: Engine, item: Claim, lease_seconds: int) -> bool:
    """Extend our lease on a running item; False if the item is no longer ours. Checked
    before an upload, so a worker that lost its item never writes its object."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        TRANSITIONS["renew"],
        {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now},
    )


def fail(
    engine: Engine, item: Claim, error: str, *, retry: bool, max_attempts: int
) -> ItemStatus | None:
    """Record ``error`` on an item we hold: back to queued if it may retry (``retry_error``),
    else failed (``fail``).

    Returns the new status, or None when the item is no longer ours (fenced out).
    """
    retrying = retry and item.may_retry(max_attempts)
    move = TRANSITIONS["retry_error" if retrying else "fail"]
    now = utcnow()
    values: dict[str, Any] = {
        "last_error": error[:4000],
        "lease_expires_at": None,
        "updated_at": now,
        "queued_at" if retrying else "finished_at": now,
    }
    return move.target if _fenced_update(engine, item, move, values) else None


def flag(engine: Engine, item: Claim, reason: str) -> bool:
    """running → failed with ``flagged`` set: the safety checker refused the image, which
    was not uploaded. Drawing it again with the same seed would give the same image."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        TRANSITIONS["flag"],
        {
            "flagged": True,
            "last_error": reason,
            "lease_expires_at": None,
            "finished_at": now,
            "updated_at": now,
        },
    )


def release(engine: Engine, item: Claim, reason: str) -> bool:
    """running → queued without counting the attempt against the item's cap: its device
    failed, not the item. (``attempts``, the fencing token, still grows.)"""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        TRANSITIONS["release"],
        {
            "last_error": reason,
            "lease_expires_at": None,
            "queued_at": now,
            "updated_at": now,
            "attempts_before_retry": Item.attempts_before_retry + 1,
        },
    )


def stored_hashes(
    engine: Engine, run_id: int, since: datetime | None = None
) -> tuple[list[tuple[str, int]], datetime | None]:
    """``(sku, perceptual hash)`` of the run's stored images finished after ``since`` (all
    when None), and the latest finish among them (``since`` when there is none): the
    ``duplicate`` check's index is filled from here, then topped up."""
    query = sa.select(Item.sku, Item.phash, Item.finished_at).where(
        Item.run_id == run_id,
        Item.phash.is_not(None),
        Item.status.in_((ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW)),
    )
    if since is not None:
        query = query.where(Item.finished_at > since)
    with begin(engine) as conn:
        rows = conn.execute(query).all()
    latest = max((r.finished_at for r in rows if r.finished_at is not None), default=since)
    return [(r.sku, unsigned64(int(r.phash))) for r in rows], latest
