"""What downstream systems read: the run's manifest records.

Calling convention: every function takes a Connection from the caller, opened with
``ledger.connect(engine)`` (so database failures are raised as LedgerUnavailable), and
only reads.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.ledger.columns import PARAMS, columns
from skufleet.schemas.tables import Item, ItemStatus, Run


def manifest(conn: Connection, run_name: str) -> Iterator[dict[str, Any]]:
    """One record per succeeded item of the run, in item order, streamed from the database:
    run, sku, shot, key, seed, sha256, bytes, prompt, negative_prompt, width, height, steps,
    guidance_scale, scheduler, model."""
    run = conn.execute(sa.select(Run.id, Run.model).where(Run.name == run_name)).first()
    if run is None:
        raise ConfigError(f"no run named {run_name!r} in the ledger")
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
            *columns(PARAMS),
        )
        .where(Item.run_id == run.id, Item.status == ItemStatus.SUCCEEDED)
        .order_by(Item.id)
    )
    for row in rows:
        yield {"run": run_name, **row._asdict(), "model": run.model}
