"""Outages of the fleet's own services: the workers pause and resume, and spend nothing.

The ledger and the bucket are reached through :class:`~tests.faults.outage.Outage`, a
forwarder that can refuse and cut connections as a stopped server does, so the shared
PostgreSQL and the session's S3 server keep serving every other test. Each test prints a
``FAULTS {...}`` line, collected by ``python bench/faults.py``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.services import LocalS3
from skufleet.schemas.tables import Item
from tests.faults.harness import FULL, FaultFleet
from tests.faults.outage import Outage

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900 if FULL else 300)]

BATCH = 4
SLEEP = 0.2
"""Seconds the stand-in pipeline takes per batch."""


def titles(n: int) -> list[str]:
    return [f"Item {i}" for i in range(n)]


def max_attempts(fleet: FaultFleet) -> int:
    with fleet.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.max(Item.attempts))).scalar_one())


def test_messages_that_arrive_while_the_ledger_is_unreachable_are_not_lost(
    tmp_path: Path, s3: LocalS3, postgres_url: str
) -> None:
    """The workers' database is unreachable (refused, not just dropped connections) when the
    run's messages arrive: no message is acknowledged and forgotten. With no reconciler to
    recover lost messages, every item still succeeds once the database answers, each drawn
    once."""
    items, down_for = (120, 30.0) if FULL else (24, 8.0)
    with Outage(sa.make_url(postgres_url).port or 5432) as database:
        through = sa.make_url(postgres_url).set(host="127.0.0.1", port=database.port)
        with FaultFleet(
            tmp_path,
            s3,
            postgres_url,
            workers=2,
            lease=60,
            visibility=120,
            worker_database_url=through.render_as_string(hide_password=False),
            reconciler=False,
            fixture=("--fixture", "standin", "--sleep", str(SLEEP)),
        ) as fleet:
            fleet.wait_ready()
            database.down()
            fleet.enqueue(titles(items), BATCH)  # the producer reaches the database directly
            enqueued = time.monotonic()
            time.sleep(down_for)
            database.up()
            fleet.wait_done(120)
            seconds = time.monotonic() - enqueued
            figures = fleet.invariants(
                "ledger unreachable at message arrival",
                budget=30,
                faults=1,
                seconds=seconds,
                last_fault=down_for,
                fault_free=items / BATCH * SLEEP / 2 + down_for,
                down_seconds=down_for,
                max_attempts_per_item=max_attempts(fleet),
            )
            logs = fleet.log("worker-0") + fleet.log("worker-1")
    figures.report()
    assert figures.succeeded == items and figures.failed == 0
    assert figures.extra_renders == 0, "an item was drawn twice for the ledger's outage"
    assert "ledger unavailable" in logs and "resuming" in logs


def test_storage_stopped_mid_run_pauses_the_workers_and_spends_no_attempt(
    tmp_path: Path, s3: LocalS3, postgres_url: str
) -> None:
    """The S3 server stops for a while in the middle of a run: the workers stop taking
    messages and keep the images they drew, then store them when it answers. No item fails,
    no attempt is spent on the outage, and renders stay within the items plus two batches."""
    items, down_for = (500, 240.0) if FULL else (60, 15.0)
    sleep = 1.0  # slow enough that the outage lands mid-run even when the host is busy
    with (
        Outage(s3.port) as storage,
        FaultFleet(
            tmp_path,
            s3,
            postgres_url,
            workers=2,
            lease=6,  # shorter than the outage: held items must keep their leases
            visibility=60,
            s3_endpoint=f"http://127.0.0.1:{storage.port}",
            fixture=("--fixture", "standin", "--sleep", str(sleep)),
        ) as fleet,
    ):
        fleet.enqueue(titles(items), BATCH)
        state = {"down_at": 0.0, "up_at": 0.0}

        def tick(elapsed: float) -> None:
            if not state["down_at"] and fleet.counts()["succeeded"] >= items // 5:
                storage.down()
                state["down_at"] = elapsed
            elif state["down_at"] and not state["up_at"] and elapsed - state["down_at"] >= down_for:
                storage.up()
                state["up_at"] = elapsed

        seconds = fleet.wait_done(600 if FULL else 240, tick)
        attempts = max_attempts(fleet)
        figures = fleet.invariants(
            "storage outage",
            budget=20 + down_for,
            faults=1,
            seconds=seconds,
            last_fault=state["up_at"],
            fault_free=items / BATCH * sleep / 2,
            down_seconds=down_for,
            max_attempts_per_item=attempts,
        )
    figures.report()
    assert state["up_at"] > state["down_at"] > 0, "the outage did not happen during the run"
    assert figures.succeeded == items and figures.failed == 0
    assert figures.extra_renders <= 2 * BATCH
    assert attempts <= 2
