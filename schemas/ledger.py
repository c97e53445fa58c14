"""The ledger's state machine: every change of an item's status happens here.

Each transition is one compare-and-set UPDATE: the WHERE clause names the statuses the move
is allowed from, so two processes can never both win the same item. The attempt number is
the fencing token: a worker finishes an item only while ``attempts`` still equals the number
its claim returned, so a stale worker's late finish is refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from itertools import islice
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from schemas.errors import ConfigError, LedgerUnavailable, SchemaMissingError
from schemas.params import GenerationParams
from schemas.tables import SCHEMA_REVISION, Item, ItemStatus, Run

T = TypeVar("T")

INSERT_CHUNK = 1000
"""Rows per INSERT statement when a catalogue goes into the ledger."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def create_engine(url: str) -> Engine:
    """An engine for the ledger at ``url``, set up for many concurrent workers.

    A plain ``postgresql://`` URL is served by psycopg 3, the driver skufleet installs.
    SQLite gets WAL, a 30 s busy timeout and ``BEGIN IMMEDIATE`` transactions, so that
    several worker processes on one machine queue for the write lock instead of failing.
    """
    parsed = sa.make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    if parsed.get_backend_name() != "sqlite":
        # pre_ping replaces connections the server dropped (restart, pg_terminate_backend).
        return sa.create_engine(parsed, pool_pre_ping=True, pool_recycle=1800)

    engine = sa.create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def describe(engine: Engine) -> str:
    """The engine's URL without its password, for messages."""
    return engine.url.render_as_string(hide_password=True)


def require_schema(engine: Engine) -> None:
    """Raise a plain-spoken error unless the ledger's tables exist at this code's revision."""
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                raise SchemaMissingError(
                    f"the ledger at {describe(engine)} has no skufleet tables yet: "
                    "run `skufleet db upgrade` first"
                )
            revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    except OperationalError as exc:
        raise LedgerUnavailable(
            f"cannot reach the ledger at {describe(engine)}: {exc.orig}"
        ) from exc
    if revision != SCHEMA_REVISION:
        raise SchemaMissingError(
            f"the ledger at {describe(engine)} is at schema revision {revision}, this skufleet "
            f"needs {SCHEMA_REVISION}: run `skufleet db upgrade`"
        )


# --- producer side ------------------------------------------------------------------------


@dataclass(frozen=True)
class NewItem:
    """An item as the producer builds it from one catalogue row and shot."""

    sku: str
    shot: str
    prompt: str
    negative_prompt: str
    seed: int
    params: GenerationParams


def upsert_run(conn: Connection, name: str, model: str, seed: int, params: dict[str, Any]) -> int:
    """Create the run ``name`` or return the existing one's id.

    A run keeps its model and seed for life: the items already rendered were made with them.
    """
    now = utcnow()
    row = conn.execute(sa.select(Run.id, Run.model, Run.seed).where(Run.name == name)).first()
    if row is None:
        return int(
            conn.execute(
                sa.insert(Run)
                .values(
                    name=name,
                    model=model,
                    seed=seed,
                    params=params,
                    stats={},
                    created_at=now,
                    updated_at=now,
                )
                .returning(Run.id)
            ).scalar_one()
        )
    if row.model != model or row.seed != seed:
        raise ConfigError(
            f"run {name!r} was created with model {row.model!r} and seed {row.seed}; "
            f"it cannot continue with model {model!r} and seed {seed}: choose a new run name"
        )
    conn.execute(sa.update(Run).where(Run.id == row.id).values(params=params, updated_at=now))
    return int(row.id)


def _chunks(values: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(values)
    while chunk := list(islice(iterator, size)):
        yield chunk


def _insert_new(conn: Connection) -> Any:
    """``INSERT … ON CONFLICT (run_id, sku, shot) DO NOTHING`` in the connection's dialect."""
    unique = ["run_id", "sku", "shot"]
    if conn.dialect.name == "postgresql":
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(Item).on_conflict_do_nothing(index_elements=unique)
    from sqlalchemy.dialects import sqlite

    return sqlite.insert(Item).on_conflict_do_nothing(index_elements=unique)


def insert_items(conn: Connection, run_id: int, items: Iterable[NewItem]) -> int:
    """Insert items in statements of ``INSERT_CHUNK`` rows; existing (sku, shot) rows are kept.

    Returns how many rows were new.
    """
    statement = _insert_new(conn).returning(Item.id)
    inserted = 0
    now = utcnow()
    for chunk in _chunks(items, INSERT_CHUNK):
        rows = [
            {
                "run_id": run_id,
                "sku": item.sku,
                "shot": item.shot,
                "prompt": item.prompt,
                "negative_prompt": item.negative_prompt,
                "seed": item.seed,
                "width": item.params.width,
                "height": item.params.height,
                "steps": item.params.steps,
                "guidance_scale": item.params.guidance_scale,
                "status": ItemStatus.PENDING,
                "attempts": 0,
                "created_at": now,
                "updated_at": now,
            }
            for item in chunk
        ]
        inserted += len(conn.execute(statement, rows).all())
    return inserted


def pending_batches(conn: Connection, run_id: int, batch_size: int) -> list[list[int]]:
    """The run's pending item ids, grouped so that a batch shares its generation parameters."""
    rows = conn.execute(
        sa.select(Item.id, Item.width, Item.height, Item.steps, Item.guidance_scale)
        .where(Item.run_id == run_id, Item.status == ItemStatus.PENDING)
        .order_by(Item.width, Item.height, Item.steps, Item.guidance_scale, Item.id)
    ).all()
    batches: list[list[int]] = []
    group: tuple[Any, ...] | None = None
    for row in rows:
        key = tuple(row[1:])
        if key != group or len(batches[-1]) >= batch_size:
            batches.append([])
            group = key
        batches[-1].append(int(row.id))
    return batches


def mark_queued(conn: Connection, item_ids: Sequence[int]) -> list[int]:
    """pending → queued for the given items; returns the ids that moved."""
    now = utcnow()
    result = conn.execute(
        sa.update(Item)
        .where(Item.id.in_(item_ids), Item.status == ItemStatus.PENDING)
        .values(status=ItemStatus.QUEUED, queued_at=now, updated_at=now)
        .returning(Item.id)
    )
    return [int(i) for i in result.scalars()]


def unmark_queued(conn: Connection, item_ids: Sequence[int]) -> None:
    """queued → pending for items whose message could not be published."""
    conn.execute(
        sa.update(Item)
        .where(Item.id.in_(item_ids), Item.status == ItemStatus.QUEUED)
        .values(status=ItemStatus.PENDING, queued_at=None, updated_at=utcnow())
    )


def record_enqueue(conn: Connection, run_id: int, stats: dict[str, Any]) -> None:
    conn.execute(sa.update(Run).where(Run.id == run_id).values(stats=stats, updated_at=utcnow()))


# --- worker side --------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    """An item a worker won: everything needed to render it, and its fencing token."""

    id: int
    sku: str
    shot: str
    prompt: str
    negative_prompt: str
    seed: int
    params: GenerationParams
    attempt: int


def _translate(exc: DBAPIError, engine: Engine) -> LedgerUnavailable:
    return LedgerUnavailable(f"ledger at {describe(engine)} failed: {exc.orig!r}")


def run_name(engine: Engine, run_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar()


def claim(
    engine: Engine, item_ids: Sequence[int], worker: str, device: str, lease_seconds: int
) -> list[Claim]:
    """queued → running for those of ``item_ids`` that are still queued; one UPDATE.

    Items already running elsewhere, succeeded or failed are not returned: the caller renders
    only what it won, so a duplicate message is harmless.
    """
    now = utcnow()
    statement = (
        sa.update(Item)
        .where(Item.id.in_(item_ids), Item.status == ItemStatus.QUEUED)
        .values(
            status=ItemStatus.RUNNING,
            attempts=Item.attempts + 1,
            worker=worker,
            device=device,
            started_at=now,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            updated_at=now,
        )
        .returning(
            Item.id,
            Item.sku,
            Item.shot,
            Item.prompt,
            Item.negative_prompt,
            Item.seed,
            Item.width,
            Item.height,
            Item.steps,
            Item.guidance_scale,
            Item.attempts,
        )
    )
    try:
        with engine.begin() as conn:
            rows = conn.execute(statement).all()
    except DBAPIError as exc:
        raise _translate(exc, engine) from exc
    claims = [
        Claim(
            id=int(r.id),
            sku=r.sku,
            shot=r.shot,
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            seed=int(r.seed),
            params=GenerationParams(
                width=r.width, height=r.height, steps=r.steps, guidance_scale=r.guidance_scale
            ),
            attempt=int(r.attempts),
        )
        for r in rows
    ]
    return sorted(claims, key=lambda c: c.id)


def _fenced_update(engine: Engine, item: Claim, values: dict[str, Any]) -> bool:
    """Apply ``values`` to a running item only while ``attempts`` is still the claim's."""
    try:
        with engine.begin() as conn:
            result = conn.execute(
                sa.update(Item)
                .where(
                    Item.id == item.id,
                    Item.attempts == item.attempt,
                    Item.status == ItemStatus.RUNNING,
                )
                .values(**values)
            )
    except DBAPIError as exc:
        raise _translate(exc, engine) from exc
    return result.rowcount == 1


def finish(
    engine: Engine, item: Claim, key: str, byte_size: int, sha256: str, render_seconds: float
) -> bool:
    """running → succeeded, only while the item is still ours (attempt fence)."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        {
            "status": ItemStatus.SUCCEEDED,
            "object_key": key,
            "byte_size": byte_size,
            "sha256": sha256,
            "render_seconds": render_seconds,
            "last_error": None,
            "finished_at": now,
            "lease_expires_at": None,
            "updated_at": now,
        },
    )


def fail(
    engine: Engine, item: Claim, error: str, *, retry: bool, max_attempts: int
) -> ItemStatus | None:
    """Record ``error`` on an item we hold: back to queued if it may retry, else failed.

    Returns the new status, or None when the item is no longer ours (fenced out).
    """
    status = ItemStatus.QUEUED if retry and item.attempt < max_attempts else ItemStatus.FAILED
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "last_error": error[:4000],
        "lease_expires_at": None,
        "updated_at": now,
        "queued_at" if status is ItemStatus.QUEUED else "finished_at": now,
    }
    return status if _fenced_update(engine, item, values) else None


# --- reading ------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunStatus:
    run: str
    counts: dict[str, int]
    attempts: int

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "counts": self.counts, "attempts": self.attempts}


def run_status(conn: Connection, name: str) -> RunStatus:
    """Items of run ``name`` counted by status, and the renders they started in all."""
    run_id = conn.execute(sa.select(Run.id).where(Run.name == name)).scalar()
    if run_id is None:
        raise ConfigError(f"no run named {name!r} in the ledger")
    counts = {status.value: 0 for status in ItemStatus}
    rows = conn.execute(
        sa.select(Item.status, sa.func.count(), sa.func.coalesce(sa.func.sum(Item.attempts), 0))
        .where(Item.run_id == run_id)
        .group_by(Item.status)
    ).all()
    attempts = 0
    for status, count, started in rows:
        counts[ItemStatus(status).value] = int(count)
        attempts += int(started)
    return RunStatus(run=name, counts=counts, attempts=attempts)
