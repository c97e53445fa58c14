"""The ledger's state machine: every change of an item's status happens here.

Each transition is one compare-and-set UPDATE: the WHERE clause names the statuses the move
is allowed from, so two processes can never both win the same item. The attempt number is
the fencing token: a worker finishes an item only while ``attempts`` still equals the number
its claim returned, so a stale worker's late finish is refused.
"""

from __future__ import annotations

import functools
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError, OperationalError

from schemas.errors import ConfigError, LedgerUnavailable, SchemaMissingError
from schemas.key import object_key
from schemas.output import OutputSpec
from schemas.params import GenerationParams
from schemas.tables import SCHEMA_REVISION, Item, ItemStatus, Run


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


def upsert_run(
    conn: Connection, name: str, model: str, seed: int, template: str, params: dict[str, Any]
) -> int:
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
                    template=template,
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
    conn.execute(
        sa.update(Run)
        .where(Run.id == row.id)
        .values(
            template=template, params=params, cancelled_at=None, completed_at=None, updated_at=now
        )
    )
    return int(row.id)


CONTENT = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "scheduler",
    "output",
)
"""What an item is made from; a change in any of these means rendering it again."""


@functools.lru_cache(maxsize=1024)
def _extension(output: str) -> str:
    """The object key extension of an item's output spec (JSON); a catalogue has few."""
    return OutputSpec.from_json(output).extension


@dataclass(frozen=True)
class KeyCollision:
    """A staged record one of whose items would be stored at a key another item has."""

    record: int
    """The record's number in the catalogue (or the staged row's position)."""
    line: int | None
    sku: str
    shot: str
    key: str
    other_sku: str
    other_shot: str
    other_record: int | None
    """The other item's record in this catalogue; None: an item already in the run."""


class ItemStaging:
    """A temporary table the producer fills with a catalogue's items, then merges into a run.

    Rows are dicts with ``sku``, ``shot`` and the :data:`CONTENT` columns, and optionally
    the ``record`` and ``line`` they come from (for reports; the items of one record are
    accepted or rejected together). Each row's object key is computed here, from the run's
    name and the row's output spec, so every producer stores the same key for an item.
    Merging is a few set-based statements, so a catalogue of any size needs no memory in the
    producer.
    """

    def __init__(self, conn: Connection, run_id: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.run = str(conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar_one())
        self.table = sa.Table(
            f"skufleet_staging_{secrets.token_hex(4)}",
            sa.MetaData(),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("record", sa.Integer, nullable=False),
            sa.Column("line", sa.Integer, nullable=True),
            sa.Column("sku", sa.String(256), nullable=False),
            sa.Column("shot", sa.String(64), nullable=False),
            sa.Column("object_key", Item.__table__.c.object_key.type, nullable=False),
            *(sa.Column(name, Item.__table__.c[name].type, nullable=False) for name in CONTENT),
            prefixes=["TEMPORARY"],
        )
        self.table.create(conn)
        self.rows = 0

    def add(self, rows: list[dict[str, Any]]) -> None:
        """Stage rows; their order is kept, so new items get ids (and render) in that order.

        PostgreSQL takes them with COPY, several times faster than multi-row INSERTs.
        """
        if not rows:
            return
        for position, row in enumerate(rows, self.rows):
            row["position"] = position
            row.setdefault("record", position)
            row.setdefault("line", None)
            row["object_key"] = object_key(
                self.run, row["sku"], row["shot"], _extension(row["output"])
            )
        self.rows += len(rows)
        if self.conn.dialect.name != "postgresql":
            self.conn.execute(self.table.insert(), rows)
            return
        names = [column.name for column in self.table.columns]
        cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        with cursor, cursor.copy(f"COPY {self.table.name} ({', '.join(names)}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row([row[name] for name in names])

    def drop_collisions(self) -> tuple[list[KeyCollision], int]:
        """Unstage every record with an item whose object key another item of the run has
        (an earlier staged item or one already in the run, of another sku or shot):
        ``(one collision per dropped record, staged rows dropped)``.

        The key scheme is injective, so this finds nothing unless two SKUs' hashes collide
        or an item kept a key of an older scheme; the unique (run, key) constraint would
        otherwise refuse the whole merge.
        """
        items: sa.Table = Item.__table__  # type: ignore[assignment]
        staged, earlier = self.table.alias("staged"), self.table.alias("earlier")
        # keys staged twice, found by one aggregate: almost always none, so the self-join
        # below has almost nothing to join
        twice = (
            sa.select(self.table.c.object_key)
            .group_by(self.table.c.object_key)
            .having(sa.func.count() > 1)
        )
        mine = (
            staged.c.position,
            staged.c.record,
            staged.c.line,
            staged.c.sku,
            staged.c.shot,
            staged.c.object_key,
        )
        other_item = sa.or_(items.c.sku != staged.c.sku, items.c.shot != staged.c.shot)
        other_row = sa.or_(earlier.c.sku != staged.c.sku, earlier.c.shot != staged.c.shot)
        found = self.conn.execute(
            sa.union_all(
                sa.select(*mine, earlier.c.sku, earlier.c.shot, earlier.c.record)
                .join(
                    earlier,
                    sa.and_(
                        earlier.c.object_key == staged.c.object_key,
                        earlier.c.position < staged.c.position,
                        other_row,
                    ),
                )
                .where(staged.c.object_key.in_(twice)),
                sa.select(*mine, items.c.sku, items.c.shot, sa.null()).join(
                    items,
                    sa.and_(
                        items.c.run_id == self.run_id,
                        items.c.object_key == staged.c.object_key,
                        other_item,
                    ),
                ),
            ).order_by(sa.literal_column("position"))
        ).all()
        collisions: dict[int, KeyCollision] = {}
        for row in found:
            if row.record not in collisions:
                collisions[row.record] = KeyCollision(
                    record=int(row.record),
                    line=row.line,
                    sku=row.sku,
                    shot=row.shot,
                    key=row.object_key,
                    other_sku=row[6],
                    other_shot=row[7],
                    other_record=row[8],
                )
        dropped = 0
        records = list(collisions)
        for start in range(0, len(records), 1000):
            dropped += self.conn.execute(
                self.table.delete().where(self.table.c.record.in_(records[start : start + 1000]))
            ).rowcount
        return list(collisions.values()), dropped

    def merge(self) -> tuple[int, int, int]:
        """Merge into the run and drop the table: ``(new, changed, in_flight)``.

        New (sku, shot) pairs are inserted as pending, with their object key. Items whose
        content differs are updated (their key too: a new format has a new extension) and go
        back to pending (queued ones stay queued: their message renders the new content),
        with the attempt cap counted afresh. Changed items a worker holds right now
        (running) are left alone and counted as in flight. An item without a key gets its
        key. Call :meth:`drop_collisions` first: a key taken twice fails the merge.
        """
        items: sa.Table = Item.__table__  # type: ignore[assignment]
        staging, now, run_id = self.table, utcnow(), self.run_id
        same_item = sa.and_(
            items.c.run_id == run_id, items.c.sku == staging.c.sku, items.c.shot == staging.c.shot
        )
        differs = sa.or_(*(items.c[name] != staging.c[name] for name in CONTENT))
        stamp = sa.literal(now, sa.DateTime(timezone=True))
        new = self.conn.execute(
            items.insert().from_select(
                [
                    "run_id",
                    "sku",
                    "shot",
                    "object_key",
                    *CONTENT,
                    "status",
                    "attempts",
                    "attempts_before_retry",
                    "created_at",
                    "updated_at",
                ],
                sa.select(
                    sa.literal(run_id),
                    staging.c.sku,
                    staging.c.shot,
                    staging.c.object_key,
                    *(staging.c[name] for name in CONTENT),
                    sa.literal(ItemStatus.PENDING.value),
                    sa.literal(0),
                    sa.literal(0),
                    stamp,
                    stamp,
                )
                .where(~sa.select(1).where(same_item).exists())
                .order_by(staging.c.position),
            ),
            execution_options={"preserve_rowcount": True},
        ).rowcount
        changed = self.conn.execute(
            items.update()
            .where(same_item, differs, items.c.status != ItemStatus.RUNNING.value)
            .values(
                **{name: staging.c[name] for name in CONTENT},
                object_key=staging.c.object_key,
                status=sa.case(
                    (items.c.status == ItemStatus.QUEUED.value, ItemStatus.QUEUED.value),
                    else_=ItemStatus.PENDING.value,
                ),
                attempts_before_retry=items.c.attempts,
                last_error=None,
                byte_size=None,
                sha256=None,
                finished_at=None,
                updated_at=now,
            )
        ).rowcount
        self.conn.execute(
            items.update()
            .where(same_item, items.c.object_key.is_(None))
            .values(object_key=staging.c.object_key, updated_at=now)
        )
        in_flight = self.conn.execute(
            sa.select(sa.func.count())
            .select_from(items.join(staging, same_item))
            .where(items.c.status == ItemStatus.RUNNING.value, differs)
        ).scalar_one()
        self.table.drop(self.conn)
        return int(new), int(changed), int(in_flight)


def queue_pending(
    engine: Engine, run_id: int, batch_size: int, chunk_items: int = 2000
) -> Iterator[list[list[int]]]:
    """pending → queued for the run, a chunk at a time, each committed before it is yielded
    as batches that share their generation parameters, in item order.

    Memory stays constant at any run size: a chunk is at most ``chunk_items`` ids.
    """
    content = (Item.width, Item.height, Item.steps, Item.guidance_scale, Item.scheduler)
    per_chunk = max(batch_size, chunk_items // batch_size * batch_size)
    with engine.connect() as conn:
        groups = conn.execute(
            sa.select(*content)
            .where(Item.run_id == run_id, Item.status == ItemStatus.PENDING)
            .distinct()
        ).all()
    for group in groups:
        same = [column == value for column, value in zip(content, group, strict=True)]
        last = 0  # keyset: each chunk starts after the previous one's last id
        while True:
            now = utcnow()
            oldest = (
                sa.select(Item.id)
                .where(
                    Item.run_id == run_id, Item.status == ItemStatus.PENDING, *same, Item.id > last
                )
                .order_by(Item.id)
                .limit(per_chunk)
                .scalar_subquery()
            )
            with engine.begin() as conn:
                ids = sorted(
                    conn.execute(
                        sa.update(Item)
                        .where(Item.id.in_(oldest), Item.status == ItemStatus.PENDING)
                        .values(status=ItemStatus.QUEUED, queued_at=now, updated_at=now)
                        .returning(Item.id)
                    ).scalars()
                )
            if not ids:
                break
            last = ids[-1]
            yield [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]


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


def unavailable(exc: DBAPIError, engine: Engine) -> LedgerUnavailable:
    """The retryable error for a database failure, naming the database but not its password."""
    return LedgerUnavailable(f"ledger at {describe(engine)} failed: {exc.orig!r}")


def run_name(engine: Engine, run_id: int) -> str | None:
    with engine.connect() as conn:
        return conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar()


def _refusal(
    conn: Connection, run_id: int, model: str, item_ids: Sequence[int]
) -> tuple[str | None, str | None]:
    """``(run name, reason)``: the reason is None when every item of the message is an item
    of run ``run_id`` and that run is drawn with ``model``."""
    wanted = sorted(set(item_ids))
    ours = (
        sa.select(sa.func.count())
        .where(Item.id.in_(wanted), Item.run_id == run_id)
        .scalar_subquery()
    )
    run = conn.execute(sa.select(Run.name, Run.model, ours).where(Run.id == run_id)).first()
    if run is None:
        return None, f"no run with id {run_id}"
    name, run_model, found = run
    if run_model != model:
        return name, f"run {name} is for model {run_model!r}, not {model!r}"
    if found != len(wanted):
        return name, f"{len(wanted) - found} of the message's items are not items of run {name}"
    return name, None


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
    now = utcnow()
    statement = (
        sa.update(Item)
        .where(
            Item.id.in_(item_ids),
            Item.run_id == run_id,
            Item.run_id.in_(sa.select(Run.id).where(Run.id == run_id, Run.model == model)),
            Item.status == ItemStatus.QUEUED,
        )
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
            Item.run_id,
            Item.sku,
            Item.shot,
            Item.prompt,
            Item.negative_prompt,
            Item.seed,
            Item.width,
            Item.height,
            Item.steps,
            Item.guidance_scale,
            Item.scheduler,
            Item.output,
            Item.object_key,
            Item.attempts,
            Item.attempts_before_retry,
        )
    )
    try:
        with engine.begin() as conn:
            name, refused = _refusal(conn, run_id, model, item_ids)
            if name is None or refused is not None:
                return ClaimResult(name, refused, [])
            rows = conn.execute(statement).all()
    except DBAPIError as exc:
        raise unavailable(exc, engine) from exc
    claims = [
        Claim(
            id=int(r.id),
            run_id=int(r.run_id),
            run_name=name,
            sku=r.sku,
            shot=r.shot,
            prompt=r.prompt,
            negative_prompt=r.negative_prompt,
            seed=int(r.seed),
            params=GenerationParams(
                width=r.width,
                height=r.height,
                steps=r.steps,
                guidance_scale=r.guidance_scale,
                scheduler=r.scheduler,
            ),
            output=r.output,
            object_key=r.object_key,
            attempt=int(r.attempts),
            attempts_before_retry=int(r.attempts_before_retry),
        )
        for r in rows
    ]
    return ClaimResult(name, None, sorted(claims, key=lambda c: c.id))


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
        raise unavailable(exc, engine) from exc
    return result.rowcount == 1


def finish(engine: Engine, item: Claim, byte_size: int, sha256: str, render_seconds: float) -> bool:
    """running → succeeded, only while the item is still ours (attempt fence). The object
    is the one at the item's key, fixed at enqueue."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        {
            "status": ItemStatus.SUCCEEDED,
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
    status = ItemStatus.QUEUED if retry and item.may_retry(max_attempts) else ItemStatus.FAILED
    now = utcnow()
    values: dict[str, Any] = {
        "status": status,
        "last_error": error[:4000],
        "lease_expires_at": None,
        "updated_at": now,
        "queued_at" if status is ItemStatus.QUEUED else "finished_at": now,
    }
    return status if _fenced_update(engine, item, values) else None


def flag(engine: Engine, item: Claim, reason: str) -> bool:
    """running → failed with ``flagged`` set: the safety checker refused the image, which
    was not uploaded. Drawing it again with the same seed would give the same image."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        {
            "status": ItemStatus.FAILED,
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
        {
            "status": ItemStatus.QUEUED,
            "last_error": reason,
            "lease_expires_at": None,
            "queued_at": now,
            "updated_at": now,
            "attempts_before_retry": Item.attempts_before_retry + 1,
        },
    )


# --- operations ---------------------------------------------------------------------------


def run_id(conn: Connection, name: str) -> int:
    found = conn.execute(sa.select(Run.id).where(Run.name == name)).scalar()
    if found is None:
        raise ConfigError(f"no run named {name!r} in the ledger")
    return int(found)


def run_settings(conn: Connection, run: int) -> tuple[str, int]:
    """The run's model and the batch size of its latest enqueue."""
    model, params = conn.execute(sa.select(Run.model, Run.params).where(Run.id == run)).one()
    return str(model), int(params.get("batch_size", 8))


def cancel_run(conn: Connection, run: int) -> int:
    """pending | queued → cancelled for the whole run; returns how many items it stopped.

    Workers skip cancelled items when their message arrives; running items finish.
    """
    now = utcnow()
    cancelled = conn.execute(
        sa.update(Item)
        .where(Item.run_id == run, Item.status.in_([ItemStatus.PENDING, ItemStatus.QUEUED]))
        .values(status=ItemStatus.CANCELLED, queued_at=None, updated_at=now)
    ).rowcount
    conn.execute(sa.update(Run).where(Run.id == run).values(cancelled_at=now, updated_at=now))
    return int(cancelled)


def retry_run(conn: Connection, run: int, *, failed_only: bool) -> int:
    """failed (and cancelled, unless ``failed_only``) → pending, with a fresh attempt budget.

    ``attempts`` keeps growing (it is the fencing token); the cap counts from here.
    """
    statuses = [ItemStatus.FAILED] if failed_only else [ItemStatus.FAILED, ItemStatus.CANCELLED]
    now = utcnow()
    retried = conn.execute(
        sa.update(Item)
        .where(Item.run_id == run, Item.status.in_(statuses))
        .values(
            status=ItemStatus.PENDING,
            attempts_before_retry=Item.attempts,
            finished_at=None,
            updated_at=now,
        )
    ).rowcount
    conn.execute(
        sa.update(Run)
        .where(Run.id == run)
        .values(cancelled_at=None, completed_at=None, updated_at=now)
    )
    return int(retried)


def complete_run(engine: Engine, run_id: int) -> bool:
    """Mark the run completed if it has no open item left; True for exactly one caller.

    Workers call this when they finish a batch; the one that wins writes the manifest and
    calls the webhook. New work for the run (an enqueue, a retry) clears the mark.
    """
    open_items = sa.select(Item.id).where(
        Item.run_id == run_id,
        Item.status.in_([ItemStatus.PENDING, ItemStatus.QUEUED, ItemStatus.RUNNING]),
    )
    now = utcnow()
    try:
        with engine.begin() as conn:
            won = conn.execute(
                sa.update(Run)
                .where(Run.id == run_id, Run.completed_at.is_(None), ~open_items.exists())
                .values(completed_at=now, updated_at=now)
                .returning(Run.id)
            ).first()
    except DBAPIError as exc:
        raise unavailable(exc, engine) from exc
    return won is not None


def reopen_run(engine: Engine, run_id: int) -> None:
    """Undo :func:`complete_run` when its follow-up (the manifest) could not be written."""
    with engine.begin() as conn:
        conn.execute(sa.update(Run).where(Run.id == run_id).values(completed_at=None))


def finished_runs(conn: Connection) -> list[int]:
    """Runs with items, none of them open, not yet marked completed."""
    open_items = sa.select(Item.id).where(
        Item.run_id == Run.id,
        Item.status.in_([ItemStatus.PENDING, ItemStatus.QUEUED, ItemStatus.RUNNING]),
    )
    any_item = sa.select(Item.id).where(Item.run_id == Run.id)
    return list(
        conn.execute(
            sa.select(Run.id).where(
                Run.completed_at.is_(None), any_item.exists(), ~open_items.exists()
            )
        ).scalars()
    )


# --- reconciling -------------------------------------------------------------------------


@dataclass(frozen=True)
class Stranded:
    """Items of one run and model that need a message: their ids in batches."""

    run_id: int
    model: str
    batches: list[list[int]]


def _batched(rows: Sequence[Any], batch_size: int) -> list[Stranded]:
    """Rows of (id, run_id, model, width, height, steps, guidance, scheduler), grouped per
    run and parameters into batches of at most ``batch_size``, in id order."""
    found: dict[tuple[Any, ...], list[int]] = {}
    for row in sorted(rows, key=lambda r: (*r[1:], r[0])):
        found.setdefault(tuple(row[1:]), []).append(int(row[0]))
    return [
        Stranded(key[0], key[1], [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)])
        for key, ids in found.items()
    ]


def expire_leases(
    conn: Connection, max_attempts: int, batch_size: int, run: int | None = None
) -> tuple[list[Stranded], int]:
    """running → queued for items whose lease expired (their worker died, hung or was cut
    off), or → failed when that was their last allowed attempt.

    Returns the requeued items, to publish, and how many were failed.
    """
    now = utcnow()
    spent = (Item.attempts - Item.attempts_before_retry) >= max_attempts
    reason = sa.literal("lease expired before its worker finished: ") + sa.func.coalesce(
        Item.worker, "unknown worker"
    )
    rows = conn.execute(
        sa.update(Item)
        .where(
            Item.status == ItemStatus.RUNNING,
            Item.lease_expires_at < now,
            *([Item.run_id == run] if run is not None else []),
        )
        .values(
            status=sa.case((spent, ItemStatus.FAILED.value), else_=ItemStatus.QUEUED.value),
            last_error=reason,
            queued_at=sa.case((spent, None), else_=now),
            finished_at=sa.case((spent, now), else_=None),
            lease_expires_at=None,
            updated_at=now,
        )
        .returning(Item.id, Item.status)
    ).all()
    requeued = [int(r.id) for r in rows if r.status == ItemStatus.QUEUED.value]
    return stranded(conn, requeued, batch_size), len(rows) - len(requeued)


def stranded(conn: Connection, item_ids: Sequence[int], batch_size: int) -> list[Stranded]:
    """The given items' batches, with what a message needs."""
    rows: list[Any] = []
    for start in range(0, len(item_ids), 5000):
        rows += conn.execute(
            sa.select(
                Item.id,
                Item.run_id,
                Run.model,
                Item.width,
                Item.height,
                Item.steps,
                Item.guidance_scale,
                Item.scheduler,
            )
            .join(Run, Run.id == Item.run_id)
            .where(Item.id.in_(item_ids[start : start + 5000]))
        ).all()
    return _batched(rows, batch_size)


def queued_models(conn: Connection, older_than: datetime, run: int | None = None) -> list[str]:
    """Models with items queued since before ``older_than``: candidates for lost messages."""
    return list(
        conn.execute(
            sa.select(Run.model)
            .distinct()
            .join(Item, Item.run_id == Run.id)
            .where(
                Item.status == ItemStatus.QUEUED,
                Item.queued_at < older_than,
                *([Item.run_id == run] if run is not None else []),
            )
        ).scalars()
    )


def requeue_stale(
    conn: Connection, model: str, older_than: datetime, batch_size: int, run: int | None = None
) -> list[Stranded]:
    """Queued items of ``model`` waiting since before ``older_than`` (their message is
    presumed lost): stamped queued now, so the next pass leaves them alone, and returned to
    be published again. A duplicate message is harmless: the claim takes each item once."""
    now = utcnow()
    runs = sa.select(Run.id).where(Run.model == model)
    ids = list(
        conn.execute(
            sa.update(Item)
            .where(
                Item.status == ItemStatus.QUEUED,
                Item.queued_at < older_than,
                Item.run_id.in_(runs),
                *([Item.run_id == run] if run is not None else []),
            )
            .values(queued_at=now, updated_at=now)
            .returning(Item.id)
        ).scalars()
    )
    return stranded(conn, ids, batch_size)


def renew(engine: Engine, item: Claim, lease_seconds: int) -> bool:
    """Extend our lease on a running item; False if the item is no longer ours. Checked
    before an upload, so a worker that lost its item never writes its object."""
    now = utcnow()
    return _fenced_update(
        engine,
        item,
        {"lease_expires_at": now + timedelta(seconds=lease_seconds), "updated_at": now},
    )


# --- reading ------------------------------------------------------------------------------


TERMINAL = (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED)


@dataclass(frozen=True)
class RunStatus:
    run: str
    counts: dict[str, int]
    attempts: int

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        return sum(self.counts[status.value] for status in TERMINAL)

    def as_dict(self) -> dict[str, Any]:
        return {"run": self.run, "counts": self.counts, "attempts": self.attempts}


def _counts(conn: Connection, run_ids: list[int]) -> dict[int, tuple[dict[str, int], int]]:
    found: dict[int, tuple[dict[str, int], int]] = {
        run: ({status.value: 0 for status in ItemStatus}, 0) for run in run_ids
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
    for run, status, count, started in rows:
        counts, attempts = found[run]
        counts[ItemStatus(status).value] = int(count)
        found[run] = (counts, attempts + int(started))
    return found


def run_status(conn: Connection, name: str) -> RunStatus:
    """Items of run ``name`` counted by status, and the renders they started in all."""
    counts, attempts = _counts(conn, [run_id(conn, name)]).popitem()[1]
    return RunStatus(run=name, counts=counts, attempts=attempts)


@dataclass(frozen=True)
class RunSummary:
    name: str
    model: str
    template: str
    created_at: datetime
    cancelled: bool
    status: RunStatus


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


def finished_since(conn: Connection, name: str, since: datetime) -> int:
    """Items of the run that reached succeeded or failed after ``since`` (for items/s)."""
    return int(
        conn.execute(
            sa.select(sa.func.count()).where(
                Item.run_id == run_id(conn, name),
                Item.status.in_([ItemStatus.SUCCEEDED, ItemStatus.FAILED]),
                Item.finished_at >= since,
            )
        ).scalar_one()
    )


def failure_reasons(conn: Connection, name: str, limit: int = 10) -> list[tuple[str, int]]:
    """The run's failed items grouped by the first line of their last error, commonest first."""
    reasons: dict[str, int] = {}
    errors = conn.execute(
        sa.select(Item.last_error).where(
            Item.run_id == run_id(conn, name), Item.status == ItemStatus.FAILED
        )
    ).scalars()
    for error in errors:
        reason = (error or "no error recorded").splitlines()[0][:160]
        reasons[reason] = reasons.get(reason, 0) + 1
    return sorted(reasons.items(), key=lambda pair: (-pair[1], pair[0]))[:limit]


def manifest(conn: Connection, name: str) -> Iterator[dict[str, Any]]:
    """One record per succeeded item of the run, in item order, streamed from the database:
    run, sku, shot, key, seed, sha256, bytes, prompt, negative_prompt, model, width, height,
    steps, guidance_scale, scheduler."""
    run = conn.execute(sa.select(Run.id, Run.model).where(Run.name == name)).first()
    if run is None:
        raise ConfigError(f"no run named {name!r} in the ledger")
    rows = conn.execution_options(yield_per=1000).execute(
        sa.select(
            Item.sku,
            Item.shot,
            Item.object_key.label("key"),
            Item.seed,
            Item.sha256,
            Item.byte_size.label("bytes"),
            Item.prompt,
            Item.negative_prompt,
            Item.width,
            Item.height,
            Item.steps,
            Item.guidance_scale,
            Item.scheduler,
        )
        .where(Item.run_id == run.id, Item.status == ItemStatus.SUCCEEDED)
        .order_by(Item.id)
    )
    for row in rows:
        yield {"run": name, **row._asdict(), "model": run.model}
