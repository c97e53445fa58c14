"""The producer's side of a run: creating it and merging a catalogue's items into it.

Calling convention: every function takes a Connection from the caller, opened with
``ledger.begin(engine)`` (so database failures are raised as LedgerUnavailable), and the
caller's transaction decides what is committed together: a whole catalogue is staged and
merged in one.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.key import object_key
from skufleet.schemas.ledger.columns import CONTENT, ITEMS
from skufleet.schemas.ledger.engine import utcnow
from skufleet.schemas.ledger.transitions import INITIAL, TRANSITIONS
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.tables import ItemStatus, Run

MISSING_SAMPLE = 10
"""SKUs named in a :class:`Retirement`; the rest are counted."""


def upsert_run(
    conn: Connection, run_name: str, model: str, seed: int, template: str, params: dict[str, Any]
) -> int:
    """Create the run ``run_name`` or return the existing one's id.

    A run keeps its model and seed for life: the items already rendered were made with them.
    """
    now = utcnow()
    row = conn.execute(sa.select(Run.id, Run.model, Run.seed).where(Run.name == run_name)).first()
    if row is None:
        return int(
            conn.execute(
                sa.insert(Run)
                .values(
                    name=run_name,
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
            f"run {run_name!r} was created with model {row.model!r} and seed {row.seed}; "
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


def record_enqueue(conn: Connection, run_id: int, stats: dict[str, Any]) -> None:
    """Keep the latest enqueue's summary with the run."""
    conn.execute(sa.update(Run).where(Run.id == run_id).values(stats=stats, updated_at=utcnow()))


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


@dataclass(frozen=True)
class Retirement:
    """What :meth:`ItemStaging.retire_missing` found and did."""

    missing: int
    """SKUs of the run (not retired before) that the catalogue no longer has."""
    sample: list[str]
    """The first of them, in item order, at most :data:`MISSING_SAMPLE`."""
    retired: int
    """Their items moved to retired."""
    in_flight: int
    """Their items a worker renders now: left to finish; enqueue again to retire them."""


class ItemStaging:
    """A temporary table the producer fills with a catalogue's items, then merges into a run.

    Rows are dicts with ``sku``, ``shot`` and the :data:`CONTENT` columns, optionally
    ``fields`` (the catalogue fields of the manifest, canonical JSON) and the ``record`` and
    ``line`` they come from (for reports; the items of one record are accepted or rejected
    together). Each row's object key is computed here, from the run's name and the row's
    output spec, so every producer stores the same key for an item. Merging is a few
    set-based statements, so a catalogue of any size needs no memory in the producer.
    """

    def __init__(self, conn: Connection, run_id: int) -> None:
        self.conn = conn
        self.run_id = run_id
        self.run_name = str(conn.execute(sa.select(Run.name).where(Run.id == run_id)).scalar_one())
        self.table = sa.Table(
            f"skufleet_staging_{secrets.token_hex(4)}",
            sa.MetaData(),
            sa.Column("position", sa.Integer, nullable=False),
            sa.Column("record", sa.Integer, nullable=False),
            sa.Column("line", sa.Integer, nullable=True),
            sa.Column("sku", sa.String(256), nullable=False),
            sa.Column("shot", sa.String(64), nullable=False),
            sa.Column("object_key", ITEMS.c.object_key.type, nullable=False),
            sa.Column("fields", ITEMS.c.fields.type, nullable=False),
            *(sa.Column(name, ITEMS.c[name].type, nullable=False) for name in CONTENT),
            prefixes=["TEMPORARY"],
        )
        self.table.create(conn)
        self.kept = sa.Table(
            f"{self.table.name}_kept",
            sa.MetaData(),
            sa.Column("sku", sa.String(256), nullable=False),
            prefixes=["TEMPORARY"],
        )
        self.kept.create(conn)
        self.rows = 0
        self.revived = 0
        """Retired items :meth:`merge` brought back unchanged (``revive``); a changed one
        counts as changed."""

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
            row.setdefault("fields", "{}")
            row["object_key"] = object_key(
                self.run_name, row["sku"], row["shot"], _extension(row["output"])
            )
        self.rows += len(rows)
        if self.conn.dialect.name != "postgresql":
            self.conn.execute(self.table.insert(), rows)
            return
        names = [column.name for column in self.table.columns]
        statement = f"COPY {self.table.name} ({', '.join(names)}) FROM STDIN"
        driver = self.conn.dialect.loaded_dbapi
        cursor = self.conn.connection.driver_connection.cursor()  # type: ignore[union-attr]
        try:
            with cursor, cursor.copy(statement) as copy:
                for row in rows:
                    copy.write_row([row[name] for name in names])
        except driver.Error as exc:
            # the driver's own error, as SQLAlchemy would have wrapped it: the caller's
            # ledger.begin() translates it with the rest
            raise DBAPIError.instance(statement, None, exc, driver.Error) from exc

    def keep(self, skus: list[str]) -> None:
        """SKUs the catalogue has but whose records were rejected (a template error, a key
        collision): :meth:`retire_missing` leaves their items as they are."""
        if skus:
            self.conn.execute(self.kept.insert(), [{"sku": sku} for sku in skus])

    def drop_collisions(self) -> tuple[list[KeyCollision], int]:
        """Unstage every record with an item whose object key another item of the run has
        (an earlier staged item or one already in the run, of another sku or shot):
        ``(one collision per dropped record, staged rows dropped)``.

        The key scheme is injective, so this finds nothing unless two SKUs' hashes collide
        or an item kept a key of an older scheme; the unique (run, key) constraint would
        otherwise refuse the whole merge.
        """
        items = ITEMS
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
        self.keep([found.sku for found in collisions.values()])
        dropped = 0
        records = list(collisions)
        for start in range(0, len(records), 1000):
            dropped += self.conn.execute(
                self.table.delete().where(self.table.c.record.in_(records[start : start + 1000]))
            ).rowcount
        return list(collisions.values()), dropped

    def retire_missing(self) -> Retirement:
        """The ``retire`` move for every item of the run whose SKU nothing staged or kept
        has: the catalogue no longer lists it. Running items are left to finish (counted in
        flight); items already retired are not counted again. Call it after staging the
        whole catalogue and before :meth:`merge`.
        """
        items, retire, now = ITEMS, TRANSITIONS["retire"], utcnow()
        if not self.conn.execute(
            sa.select(sa.select(1).where(items.c.run_id == self.run_id).exists())
        ).scalar():
            return Retirement(0, [], 0, 0)  # a new run: nothing to retire
        sa.Index(f"{self.table.name}_sku", self.table.c.sku, self.table.c.shot).create(self.conn)
        missing = sa.and_(
            items.c.run_id == self.run_id,
            items.c.status != ItemStatus.RETIRED.value,
            ~sa.select(1).where(self.table.c.sku == items.c.sku).exists(),
            ~sa.select(1).where(self.kept.c.sku == items.c.sku).exists(),
        )
        count = self.conn.execute(
            sa.select(sa.func.count(sa.distinct(items.c.sku))).where(missing)
        ).scalar_one()
        if not count:
            return Retirement(0, [], 0, 0)
        sample = list(
            self.conn.execute(
                sa.select(items.c.sku)
                .where(missing)
                .group_by(items.c.sku)
                .order_by(sa.func.min(items.c.id))
                .limit(MISSING_SAMPLE)
            ).scalars()
        )
        retired = self.conn.execute(
            items.update()
            .where(missing, items.c.status.in_(retire.sources))
            .values(status=retire.target.value, queued_at=None, updated_at=now)
        ).rowcount
        in_flight = self.conn.execute(sa.select(sa.func.count()).where(missing)).scalar_one()
        return Retirement(int(count), sample, int(retired), int(in_flight))

    def merge(self) -> tuple[int, int, int]:
        """Merge into the run and drop the table: ``(new, changed, in_flight)``.

        New (sku, shot) pairs are inserted as pending, with their object key. Items whose
        content differs are updated (their key too: a new format has a new extension) and go
        back to pending (queued ones stay queued: their message renders the new content),
        with the attempt cap counted afresh: the moves ``change`` and ``change_queued``.
        Changed items a worker holds right now (running) are left alone and counted as in
        flight. A retired item whose SKU is back is changed if its content differs, else
        revived (:attr:`revived`): succeeded while the ledger holds its object (needs review
        if that image failed the quality gate and no reviewer approved it), pending (drawn
        again) if it was pruned or never stored. Every item's catalogue ``fields`` are
        brought up to date, whatever its status. An item without a key gets its key. Call
        :meth:`drop_collisions` first: a key taken twice fails the merge.
        """
        items, staging, now, run_id = ITEMS, self.table, utcnow(), self.run_id
        change, change_queued = TRANSITIONS["change"], TRANSITIONS["change_queued"]
        revive = TRANSITIONS["revive"]
        changeable = change.sources + change_queued.sources
        same_item = sa.and_(
            items.c.run_id == run_id, items.c.sku == staging.c.sku, items.c.shot == staging.c.shot
        )
        differs = sa.or_(*(items.c[name] != staging.c[name] for name in CONTENT))
        stamp = sa.literal(now, sa.DateTime(timezone=True))
        # catalogue fields that changed without the content (a price, a brand): the
        # manifest's next lines carry them, nothing is drawn again (before the insert, so
        # that a new run's items are not compared with themselves)
        self.conn.execute(
            items.update()
            .where(same_item, items.c.fields != staging.c.fields)
            .values(fields=staging.c.fields)
        )
        new = self.conn.execute(
            items.insert().from_select(
                [
                    "run_id",
                    "sku",
                    "shot",
                    "object_key",
                    "fields",
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
                    staging.c.fields,
                    *(staging.c[name] for name in CONTENT),
                    sa.literal(INITIAL.value),
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
            .where(same_item, differs, items.c.status.in_(changeable))
            .values(
                **{name: staging.c[name] for name in CONTENT},
                object_key=staging.c.object_key,
                fields=staging.c.fields,
                status=sa.case(
                    (items.c.status.in_(change_queued.sources), change_queued.target.value),
                    else_=change.target.value,
                ),
                attempts_before_retry=items.c.attempts,
                last_error=None,
                byte_size=None,
                sha256=None,
                image_width=None,
                image_height=None,
                image_format=None,
                image_seed=None,
                roll=None,
                verdict=None,
                quality="{}",
                phash=None,
                finished_at=None,
                updated_at=now,
            )
        ).rowcount
        stored = items.c.sha256.is_not(None)
        unreviewed = sa.and_(stored, items.c.verdict == "failed")
        self.revived = self.conn.execute(
            items.update()
            .where(same_item, ~differs, items.c.status.in_(revive.sources))
            .values(
                status=sa.case(
                    (unreviewed, revive.to(ItemStatus.NEEDS_REVIEW).value),
                    (stored, revive.to(ItemStatus.SUCCEEDED).value),
                    else_=revive.to(ItemStatus.PENDING).value,
                ),
                attempts_before_retry=items.c.attempts,
                last_error=sa.case((stored, items.c.last_error), else_=None),
                finished_at=sa.case((stored, items.c.finished_at), else_=None),
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
            .where(items.c.status.not_in(changeable), differs)
        ).scalar_one()
        self.table.drop(self.conn)
        self.kept.drop(self.conn)
        return int(new), int(changed), int(in_flight)
