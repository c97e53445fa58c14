"""The ledger's tables: ``runs`` and ``items`` (the source of truth), the ``candidates``
each item's renders drew, reviewers' ``reviews``, and the webhook's ``events``.

Redis carries messages and may lose them; every item's seed, status, attempts and object
live here. Statuses are stored as readable strings.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_REVISION = "0007"
"""The Alembic revision this code expects; ``skufleet db upgrade`` brings a database to it."""

# SQLite only auto-increments an INTEGER PRIMARY KEY; PostgreSQL gets a 64-bit identity.
BigId = BigInteger().with_variant(Integer, "sqlite")


class ItemStatus(enum.StrEnum):
    """Where an item stands. Only ``schemas.ledger`` moves an item between these, and only
    by the named moves of its table, ``schemas.ledger.transitions.TRANSITIONS``, which this
    list repeats (``tests/test_transitions.py`` keeps the two in step)::

        queue          pending → queued                            enqueue, retry
        unqueue        queued → pending                            its message not published
        claim          queued → running                            a worker won it
        renew          running → running                           its worker, lease extended
        finish         running → succeeded | needs_review          its image stored
        retry_error    running → queued                            a retryable error
        fail           running → failed                            a permanent error, the cap
        flag           running → failed                            the safety checker
        release        running → queued                            its device failed
        expire         running → queued | failed                   its lease ran out
        republish      queued → queued                             its message presumed lost
        cancel         pending | queued → cancelled                skufleet cancel
        retry_run      failed | cancelled → pending                skufleet retry
        change  pending | succeeded | needs_review | failed | cancelled | retired → pending  changed
        change_queued  queued → queued                             the same, message waiting
        retire  pending | queued | succeeded | needs_review | failed | cancelled → retired  gone
        revive         retired → succeeded | needs_review | pending   its SKU is back
        approve        needs_review → succeeded                    a reviewer approved it
        reject         succeeded | needs_review → pending          a reviewer rejected it

    ``finish`` leaves ``needs_review`` when the stored image, the best of its rolls, still
    fails a quality check (``worker.quality``); ``reject`` draws the item again with its
    next seed variant.

    ``change``: an enqueue changed the item's content; ``retire``: an enqueue whose catalogue
    no longer has its SKU (running items finish first). A new item is pending. Succeeded,
    failed, cancelled and retired are left only by an explicit command: ``skufleet retry``,
    or an enqueue that changes, retires or revives the item; ``needs_review`` by a review
    (``skufleet review``, ``skufleet reroll``).
    """

    PENDING = "pending"
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    NEEDS_REVIEW = "needs_review"
    """Stored, but its best image failed a quality check: out of the manifest until a
    reviewer approves it (or rejects it, and it is drawn again)."""
    FAILED = "failed"
    CANCELLED = "cancelled"
    RETIRED = "retired"
    """Its SKU left the catalogue: out of the manifest; its object is kept unless pruned."""


class Base(DeclarativeBase):
    pass


class Run(Base):
    """One named run over a catalogue: its model, run seed and default parameters."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    model: Mapped[str] = mapped_column(String(512))
    seed: Mapped[int] = mapped_column(BigInteger)
    template: Mapped[str] = mapped_column(String(256), default="ecommerce")
    """Template pack of the latest enqueue."""
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """Parameter overrides and batch size of the latest enqueue."""
    stats: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    """The latest enqueue's summary: records read, accepted, rejected, duplicates, enqueued."""
    cancelled_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    completed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When the last open item was done (then the manifest is written and the webhook called)."""
    completions: Mapped[int] = mapped_column(Integer, server_default="0")
    """Completions that published a manifest: 1 sent ``run.completed``, later ones
    ``run.updated``."""
    manifest_digest: Mapped[str | None] = mapped_column(String(64))
    """SHA-256 over the last published manifest's lines and counts: a completion that changes
    neither publishes no event."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Item(Base):
    """One image to make: a (run, sku, shot) with its prompt, seed, parameters and fate."""

    __tablename__ = "items"
    __table_args__ = (
        UniqueConstraint("run_id", "sku", "shot", name="uq_items_run_sku_shot"),
        # no two items of a run may ever write the same object (see schemas.key)
        UniqueConstraint("run_id", "object_key", name="uq_items_run_object_key"),
        # (run_id, status, id): counts by status, and pending items of a run in id order
        Index("ix_items_run_status", "run_id", "status", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    sku: Mapped[str] = mapped_column(String(256))
    shot: Mapped[str] = mapped_column(String(64))
    prompt: Mapped[str] = mapped_column(Text)
    negative_prompt: Mapped[str] = mapped_column(Text, default="")
    seed: Mapped[int] = mapped_column(BigInteger)
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    guidance_scale: Mapped[float] = mapped_column(Float)
    scheduler: Mapped[str] = mapped_column(String(32), default="default", server_default="default")
    output: Mapped[str] = mapped_column(Text, default="{}", server_default="{}")
    """How the image is stored (``schemas.output.OutputSpec`` as canonical JSON)."""
    flagged: Mapped[bool] = mapped_column(Boolean, default=False, server_default=sa.false())
    """The safety checker flagged the image; it was not uploaded and the item failed."""
    status: Mapped[ItemStatus] = mapped_column(
        Enum(
            ItemStatus,
            native_enum=False,
            length=16,
            values_callable=lambda members: [m.value for m in members],
        ),
        default=ItemStatus.PENDING,
    )
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    """Renders started, ever; also the fencing token of the current claim (never decreases)."""
    attempts_before_retry: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    """``attempts`` when the item was last retried or changed; the cap counts from here."""
    last_error: Mapped[str | None] = mapped_column(Text)
    worker: Mapped[str | None] = mapped_column(String(255))
    device: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    queued_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    render_seconds: Mapped[float | None] = mapped_column(Float)
    """Wall time of the batch this item was rendered in, divided by the batch's size."""
    object_key: Mapped[str | None] = mapped_column(String(1024))
    """Where the item's image is stored, fixed when the item is enqueued (``schemas.key``)."""
    fields: Mapped[str] = mapped_column(Text, server_default="{}")
    """The catalogue's fields the manifest carries, as canonical JSON: ``{"title",
    "category", "fields": {the pack's manifest_columns}}``; ``{}`` before revision 0006."""
    byte_size: Mapped[int | None] = mapped_column(BigInteger)
    sha256: Mapped[str | None] = mapped_column(String(64))
    """With ``byte_size`` and ``image_*``: the stored object, recorded by the worker at finish
    (kept while a retired item's object is kept, cleared when it is pruned)."""
    image_width: Mapped[int | None] = mapped_column(Integer)
    """Pixels of the stored image (labels and thumbnails make it differ from ``width``)."""
    image_height: Mapped[int | None] = mapped_column(Integer)
    image_format: Mapped[str | None] = mapped_column(String(8))
    """``png``, ``webp`` or ``jpeg``."""
    image_seed: Mapped[int | None] = mapped_column(BigInteger)
    """The seed of the stored image: ``seed`` for roll 0, else its roll's seed variant
    (``worker.quality.seed_variant``)."""
    roll: Mapped[int | None] = mapped_column(Integer)
    """The roll of the stored image (0: the item's own seed)."""
    next_roll: Mapped[int] = mapped_column(Integer, server_default="0")
    """The first roll the next render draws: past every roll drawn and stored, so a rejected
    item is drawn with a seed it has not had."""
    renders: Mapped[int] = mapped_column(Integer, server_default="0")
    """Candidate images drawn for the item, ever (best-of-N and re-rolls included)."""
    rerolls: Mapped[int] = mapped_column(Integer, server_default="0")
    """Of those, the ones drawn again because every candidate before failed a check."""
    verdict: Mapped[str | None] = mapped_column(String(16))
    """The quality gate on the stored image: ``passed``, ``failed`` (needs review) or
    ``approved`` (failed, then approved by a reviewer); None before the gate or when off."""
    quality: Mapped[str] = mapped_column(Text, server_default="{}")
    """The stored image's checks as canonical JSON, ``{check: {score, threshold, passed}}``."""
    phash: Mapped[int | None] = mapped_column(BigInteger)
    """The stored image's 64-bit perceptual hash, as a signed 64-bit integer (the
    ``duplicate`` check compares a run's images with it)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Candidate(Base):
    """One image drawn for an item, kept or not: its roll, seed and the gate's scores."""

    __tablename__ = "candidates"
    __table_args__ = (Index("ix_candidates_item", "item_id", "roll"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    attempt: Mapped[int] = mapped_column(Integer)
    roll: Mapped[int] = mapped_column(Integer)
    seed: Mapped[int] = mapped_column(BigInteger)
    scores: Mapped[str] = mapped_column(Text, default="{}")
    """``{check: {score, threshold, passed}}`` as canonical JSON."""
    passed: Mapped[bool] = mapped_column(Boolean)
    kept: Mapped[bool] = mapped_column(Boolean)
    """The candidate stored as the item's image."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Review(Base):
    """A reviewer's decision on an item's stored image: who, when, which image."""

    __tablename__ = "reviews"
    __table_args__ = (Index("ix_reviews_run", "run_id", "item_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id", ondelete="CASCADE"))
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    decision: Mapped[str] = mapped_column(String(16))
    """``approved`` or ``rejected``."""
    reviewer: Mapped[str] = mapped_column(String(255))
    seed: Mapped[int | None] = mapped_column(BigInteger)
    """The seed of the image decided on."""
    sha256: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Event(Base):
    """An outbox of events for the webhook: written in the ledger first, delivered after.

    A run's completion writes its event here; delivery (the webhook POST) is retried with
    backoff until it is answered, so an event is never lost to a webhook that is down.
    """

    __tablename__ = "events"
    __table_args__ = (Index("ix_events_pending", "delivered_at", "next_attempt_at"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(String(64), unique=True)
    """Sent to the receiver (``X-Skufleet-Event-Id`` and in the body), so it can deduplicate."""
    run_id: Mapped[int | None] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(32))
    """``run.completed`` or ``run.updated``."""
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
