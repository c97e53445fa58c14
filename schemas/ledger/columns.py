"""The column lists of ``items`` the ledger's statements share, each written once."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import sqlalchemy as sa

from skufleet.schemas.params import GenerationParams
from skufleet.schemas.tables import Item

ITEMS: sa.Table = Item.__table__  # type: ignore[assignment]
"""The ``items`` table, for statements written in SQLAlchemy Core."""

PARAMS = tuple(GenerationParams.model_fields)
"""How an item is drawn (width, height, steps, guidance scale, scheduler): the items of one
message share these."""

CONTENT = ("prompt", "negative_prompt", "seed", *PARAMS, "output")
"""What an item is made from; a change in any of these means rendering it again."""

CLAIMED = (
    "id",
    "run_id",
    "sku",
    "shot",
    *CONTENT,
    "object_key",
    "attempts",
    "attempts_before_retry",
    "next_roll",
)
"""What a claim returns: everything a worker needs to draw and store the item it won."""


def columns(names: Iterable[str]) -> list[sa.Column[Any]]:
    """The ``items`` columns called ``names``, in that order."""
    return [ITEMS.c[name] for name in names]
