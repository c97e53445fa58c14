"""Waiting for a run (``skufleet generate``, ``skufleet demo``), on a real ledger."""

from __future__ import annotations

import time

import pytest
import sqlalchemy as sa

from skufleet.producer.progress import wait_for_run
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from tests.test_ledger import add_run, claim


def test_a_run_whose_other_items_were_cancelled_is_done(engine: sa.Engine) -> None:
    """A run with one item drawn and the rest cancelled is done: cancelled items are never
    drawn, so the wait returns their counts instead of running into its deadline."""
    ids = add_run(engine, 3)
    drawn = claim(engine, ids[:1], "w")[0]
    assert (
        ledger.finish(engine, drawn, 1, "0" * 64, 0.1, width=64, height=64, image_format="png")
        is True
    )
    seen: list[int] = []
    with pytest.raises(ConfigError, match="still waiting"):
        wait_for_run(engine, "r1", 3, deadline=time.monotonic(), late="still waiting")
    with ledger.begin(engine) as conn:
        assert ledger.cancel_run(conn, ledger.find_run_id(conn, "r1")) == 2

    counts = wait_for_run(
        engine, "r1", 3, deadline=time.monotonic() + 30, late="never", on_progress=seen.append
    )
    assert (counts["succeeded"], counts["cancelled"]) == (1, 2)
    assert seen == [3]
