"""What downstream systems read: the run's manifest records, and the JSON Schemas they keep.

A manifest is two objects in the bucket (written by ``producer.downstream``):
``<run>/manifest.jsonl``, one :func:`manifest` record per succeeded item (an item waiting
for review is in none until approved), and ``<run>/manifest.json``, its summary (whether
the run is complete, its items counted by status, needs_review included). Both carry
:data:`SCHEMA_VERSION`, and each is described by a JSON Schema shipped with skufleet, named
with that version (:func:`json_schema`). A version changes only when a field is removed or
changes meaning; new fields may appear within a version.

Calling convention: every function takes a Connection from the caller, opened with
``ledger.connect(engine)`` (so database failures are raised as LedgerUnavailable), and
only reads.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from importlib import resources
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.tables import Item, ItemStatus, Run

SCHEMA_VERSION = 1
"""The ``schema_version`` of every manifest line and summary this code writes."""


def schema_name(kind: Literal["line", "summary"]) -> str:
    """The file of the JSON Schema of a manifest line or summary, in ``skufleet.schemas``."""
    return f"manifest-{kind}.v{SCHEMA_VERSION}.schema.json"


def json_schema(kind: Literal["line", "summary"]) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of a manifest line or of the summary."""
    text = resources.files("skufleet.schemas").joinpath(schema_name(kind)).read_text("utf-8")
    return dict(json.loads(text))


def catalogue_fields(title: str, category: str | None, fields: dict[str, str | None]) -> str:
    """An item's ``fields`` column: what its manifest line says of the catalogue row, as
    canonical JSON (so an enqueue can tell when it changed)."""
    return json.dumps(
        {"title": title, "category": category, "fields": fields},
        ensure_ascii=False,
        sort_keys=True,
    )


def manifest(conn: Connection, run_name: str) -> Iterator[dict[str, Any]]:
    """One record per succeeded item of the run, in item order, streamed from the database
    (``manifest-line.v1.schema.json``): schema_version, run, sku, shot, key; the stored
    image's format, width, height, bytes and sha256; the catalogue's title, category and the
    pack's ``manifest_columns`` (fields); seed, prompt, negative_prompt, model and how it was
    drawn (drawn_width, drawn_height, steps, guidance_scale, scheduler); what the quality
    gate made of it (roll, quality, verdict).

    ``seed`` is the stored image's (``image_seed``: the item's own for roll 0, else its
    roll's seed variant), the item's seed for images stored before ledger revision 0007;
    ``quality`` is ``{check: {score, threshold, passed}}``, ``{}`` when nothing was checked.
    Items waiting for review (``needs_review``) are in no line until a reviewer approves
    them."""
    run = conn.execute(sa.select(Run.id, Run.model).where(Run.name == run_name)).first()
    if run is None:
        raise ConfigError(f"no run named {run_name!r} in the ledger")
    rows = conn.execution_options(yield_per=1000).execute(
        sa.select(
            Item.sku,
            Item.shot,
            Item.object_key,
            Item.image_format,
            Item.image_width,
            Item.image_height,
            Item.byte_size,
            Item.sha256,
            Item.fields,
            Item.seed,
            Item.image_seed,
            Item.roll,
            Item.quality,
            Item.verdict,
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
        catalogue = json.loads(row.fields or "{}")
        yield {
            "schema_version": SCHEMA_VERSION,
            "run": run_name,
            "sku": row.sku,
            "shot": row.shot,
            "key": row.object_key,
            "format": row.image_format,
            "width": row.image_width,
            "height": row.image_height,
            "bytes": row.byte_size,
            "sha256": row.sha256,
            "title": catalogue.get("title"),
            "category": catalogue.get("category"),
            "fields": catalogue.get("fields", {}),
            "seed": row.seed if row.image_seed is None else row.image_seed,
            "roll": row.roll,
            "quality": json.loads(row.quality or "{}"),
            "verdict": row.verdict,
            "prompt": row.prompt,
            "negative_prompt": row.negative_prompt,
            "model": run.model,
            "drawn_width": row.width,
            "drawn_height": row.height,
            "steps": row.steps,
            "guidance_scale": row.guidance_scale,
            "scheduler": row.scheduler,
        }
