"""The fault scenarios of the README's Reliability section: real faults against a real
fleet, invariants checked after each.

Each test prints a ``FAULTS {...}`` line with its figures. The CI runs the short version;
``python bench/faults.py`` runs the long one (SKUFLEET_FAULTS=full) and records the figures.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.services import LocalS3, wait_until
from skufleet.schemas.tables import Item, ItemStatus
from tests.faults.harness import FULL, RESULTS, FaultFleet
from tests.faults.proxy import FlakyS3Proxy
from tests.fixtures.pipelines import KILL

pytestmark = [pytest.mark.faults, pytest.mark.timeout(900 if FULL else 300)]

ITEMS = 500 if FULL else 60
BATCH = 4
SLEEP = 0.2
"""Seconds the stand-in pipeline takes per batch."""
START_UP = 20.0
"""Seconds for worker processes to start (imports, pipeline, Celery) before the first batch."""


def fault_free(items: int, workers: int) -> float:
    return items / BATCH * SLEEP / workers


def titles(n: int) -> list[str]:
    return [f"Item {i}" for i in range(n)]


@pytest.fixture
def fleet_args(tmp_path: Path, s3: LocalS3, postgres_url: str) -> dict[str, object]:
    return {"tmp_path": tmp_path, "s3": s3, "database_url": postgres_url}


@pytest.fixture
def seeded() -> random.Random:
    return random.Random(20261127)


def test_killed_workers_lose_and_duplicate_nothing(
    fleet_args: dict[str, object], seeded: random.Random
) -> None:
    """SIGKILL a worker in the middle of a batch at seeded random moments, again and again,
    and restart it: each killed batch is rendered again after its lease and one reconciler
    pass, and nothing is lost or stored twice."""
    kills_wanted = 12 if FULL else 3
    sleep = 1.0
    with FaultFleet(
        **fleet_args,
        workers=2,
        lease=4,  # type: ignore[arg-type]
        fixture=("--fixture", "standin", "--sleep", str(sleep)),
    ) as fleet:
        fleet.enqueue(titles(ITEMS), BATCH)
        state = {"kills": 0, "next": 0.0, "last": 0.0}

        def tick(elapsed: float) -> None:
            fleet.restart_dead_workers()
            if state["kills"] >= kills_wanted or elapsed < state["next"]:
                return
            busy = fleet.busy_workers()
            if busy:
                fleet.kill_worker(seeded.choice(busy))
                state.update(
                    kills=state["kills"] + 1, last=elapsed, next=elapsed + seeded.uniform(1.0, 4.0)
                )

        seconds = fleet.wait_done(600 if FULL else 240, tick)
        figures = fleet.invariants(
            "worker killed",
            budget=START_UP + 25 * kills_wanted,
            faults=int(state["kills"]),
            seconds=seconds,
            last_fault=state["last"],
            fault_free=ITEMS / BATCH * sleep / 2,
        )
    figures.report()
    assert figures.succeeded == ITEMS and figures.faults == kills_wanted


def test_a_poison_item_that_kills_its_worker_is_dead_lettered(
    fleet_args: dict[str, object],
) -> None:
    """An item whose render kills the worker every time fails after the attempt cap, with
    its error; the rest of the run is unaffected."""
    names = titles(ITEMS // 2)
    names[7] = f"{KILL} item"
    with FaultFleet(
        **fleet_args,
        workers=2,
        lease=3,
        max_attempts=3,  # type: ignore[arg-type]
        fixture=("--fixture", "kill", "--sleep", str(SLEEP)),
    ) as fleet:
        fleet.enqueue(names, BATCH)
        deaths = {"n": 0}

        def tick(elapsed: float) -> None:
            deaths["n"] += fleet.restart_dead_workers()

        seconds = fleet.wait_done(240, tick)
        figures = fleet.invariants(
            "poison item",
            budget=START_UP + 3 * 15,
            faults=deaths["n"],
            seconds=seconds,
            last_fault=seconds,
            fault_free=fault_free(len(names), 2),
            dead_lettered=1,
            max_attempts=3,
            worker_deaths=deaths["n"],
        )
        with fleet.engine.connect() as conn:
            poison = conn.execute(sa.select(Item).where(Item.sku == "S00007")).one()
    figures.report()
    assert (poison.status, poison.attempts) == (ItemStatus.FAILED, 3)
    assert "lease expired" in poison.last_error
    assert figures.failed == 1 and figures.succeeded == len(names) - 1


def test_sigterm_on_every_worker_leaves_nothing_to_expire(fleet_args: dict[str, object]) -> None:
    """SIGTERM all workers mid-run: each finishes and stores its batch (no item is left
    running for a lease to expire), unstarted messages go back to Redis, and restarted
    workers finish the run without a single render beyond one per item."""
    with FaultFleet(
        **fleet_args,
        workers=2,
        lost_after=3600,  # type: ignore[arg-type]
        fixture=("--fixture", "standin", "--sleep", "1.0"),
    ) as fleet:
        fleet.enqueue(titles(ITEMS // 2), BATCH)
        # wait for the run to be under way, then stop every worker at once
        state = {"stopped": False, "codes": [], "running_after": -1, "at": 0.0}

        def tick(elapsed: float) -> None:
            if not state["stopped"] and fleet.counts()["succeeded"] >= 2 * BATCH:
                state["codes"] = fleet.stop_workers()
                state["running_after"] = fleet.counts()["running"]
                state.update(stopped=True, at=elapsed)
                for index in fleet.workers:
                    fleet.start_worker(index)

        seconds = fleet.wait_done(300, tick)
        figures = fleet.invariants(
            "graceful stop",
            budget=2 * START_UP,
            faults=0,
            seconds=seconds,
            last_fault=float(state["at"]),
            fault_free=(ITEMS // 2) / BATCH * 1.0 / 2,
            workers_stopped=2,
            exit_codes=state["codes"],
        )
    figures.report()
    assert state["stopped"] and state["codes"] == [0, 0]
    assert state["running_after"] == 0  # nothing waits for a lease to expire
    assert figures.extra_renders == 0  # every message was restored or finished, none lost


@pytest.mark.parametrize("appendonly", [False, True], ids=["no-persistence", "append-only"])
def test_redis_restarts_lose_nothing(fleet_args: dict[str, object], appendonly: bool) -> None:
    """Kill and restart the broker twice during the run: the workers reconnect by themselves,
    and the messages an unpersisted Redis lost are recovered from the ledger."""
    restarts_wanted = 2
    sleep = 1.0
    with FaultFleet(
        **fleet_args,
        workers=2,
        appendonly=appendonly,  # type: ignore[arg-type]
        lost_after=3,
        fixture=("--fixture", "standin", "--sleep", str(sleep)),
    ) as fleet:
        fleet.enqueue(titles(ITEMS), BATCH)
        state = {"restarts": 0, "last": 0.0}

        def tick(elapsed: float) -> None:
            done = fleet.counts()["succeeded"]
            if state["restarts"] < restarts_wanted and done >= (1 + 2 * state["restarts"]) * (
                ITEMS // 5
            ):
                fleet.restart_redis()
                state.update(restarts=state["restarts"] + 1, last=elapsed)

        seconds = fleet.wait_done(300 if not FULL else 900, tick)
        republished = fleet.reconciled("republished")
        figures = fleet.invariants(
            f"redis restart ({'append-only' if appendonly else 'no persistence'})",
            budget=START_UP + 15 * restarts_wanted,
            faults=int(state["restarts"]) * 2,
            seconds=seconds,
            last_fault=float(state["last"]),
            fault_free=ITEMS / BATCH * sleep / 2,
            redis_restarts=state["restarts"],
            republished_from_ledger=republished,
        )
    figures.report()
    assert figures.succeeded == ITEMS and state["restarts"] == restarts_wanted
    if not appendonly:
        assert republished > 0  # the lost messages came back from the ledger


def test_a_batch_that_outlives_its_lease_and_visibility_timeout(
    fleet_args: dict[str, object],
) -> None:
    """Each worker's first batch takes 9 s, past its 2 s lease and Redis's 5 s visibility
    timeout: the items are rendered again elsewhere, the stale worker's late finish is
    refused by the attempt fence and it uploads nothing; one object per item."""
    with FaultFleet(
        **fleet_args,
        workers=2,
        lease=2,
        visibility=5,  # type: ignore[arg-type]
        fixture=("--fixture", "slow-first", "--first", "9", "--sleep", str(SLEEP)),
    ) as fleet:
        fleet.enqueue(titles(ITEMS // 2), BATCH)
        seconds = fleet.wait_done(240)
        figures = fleet.invariants(
            "long batch",
            budget=START_UP + 9 + 10,
            faults=2,
            seconds=seconds,
            last_fault=9.0,
            fault_free=fault_free(ITEMS // 2, 2),
        )
        logs = fleet.log("worker-0") + fleet.log("worker-1")
    figures.report()
    assert figures.succeeded == ITEMS // 2
    assert "is no longer ours" in logs  # the stale worker noticed and did not upload


def test_flaky_storage_still_stores_every_image_intact(
    fleet_args: dict[str, object], s3: LocalS3
) -> None:
    """20% of PUTs answered 503 and 5% cut off after the server got them: every item
    succeeds and every object matches its recorded sha256 (no partial or corrupt object)."""
    proxy = FlakyS3Proxy(s3.port, fail_rate=0.2, drop_rate=0.05, seed=7).start()
    try:
        # boto3 retries each PUT with backoff: the lease must cover a slow store
        with FaultFleet(
            **fleet_args,
            workers=2,
            lease=30,
            visibility=60,  # type: ignore[arg-type]
            s3_endpoint=proxy.endpoint_url,
        ) as fleet:
            fleet.enqueue(titles(ITEMS), BATCH)
            seconds = fleet.wait_done(300 if not FULL else 900)
            figures = fleet.invariants(
                "flaky storage",
                budget=START_UP + (600 if FULL else 120),
                faults=proxy.failed + proxy.dropped,
                seconds=seconds,
                last_fault=seconds,
                fault_free=fault_free(ITEMS, 2),
                puts=proxy.puts,
                answered_503=proxy.failed,
                dropped=proxy.dropped,
                failed_put_share=round((proxy.failed + proxy.dropped) / max(1, proxy.puts), 3),
            )
    finally:
        proxy.stop()
    figures.report()
    assert figures.succeeded == ITEMS and proxy.failed > 0 and proxy.dropped > 0


def test_dropped_database_connections_recover(fleet_args: dict[str, object]) -> None:
    """Terminate every connection of the workers and the reconciler, again and again during
    the run: the pools reconnect and no item stays running beyond its lease and one
    reconciler pass. (Batches draw slowly enough that every round lands mid-run.)"""
    sleep = 1.5
    rounds_wanted = 10 if FULL else 4
    with FaultFleet(
        **fleet_args,
        workers=2,
        lease=6,  # type: ignore[arg-type]
        fixture=("--fixture", "standin", "--sleep", str(sleep)),
    ) as fleet:
        fleet.enqueue(titles(ITEMS), BATCH)
        state = {"rounds": 0, "terminated": 0, "next": 0.0, "last": 0.0}

        def tick(elapsed: float) -> None:
            if (
                state["rounds"] < rounds_wanted
                and elapsed >= state["next"]
                and fleet.counts()["running"] > 0
            ):
                state["terminated"] += fleet.terminate_connections()
                state.update(rounds=state["rounds"] + 1, last=elapsed, next=elapsed + 1.0)

        seconds = fleet.wait_done(300 if not FULL else 900, tick)
        figures = fleet.invariants(
            "database drop",
            budget=START_UP + 10 * rounds_wanted,
            faults=int(state["rounds"]) * 2,
            seconds=seconds,
            last_fault=float(state["last"]),
            fault_free=ITEMS / BATCH * sleep / 2,
            connections_terminated=state["terminated"],
        )
    figures.report()
    assert figures.succeeded == ITEMS and state["rounds"] == rounds_wanted
    assert state["terminated"] > 0


@pytest.fixture
def pickle_worker(fleet_args: dict[str, object]) -> Iterator[FaultFleet]:
    with FaultFleet(**fleet_args, workers=1) as fleet:  # type: ignore[arg-type]
        yield fleet


def test_a_pickle_message_is_refused_and_keys_stay_in_the_run(
    pickle_worker: FaultFleet,
) -> None:
    """The worker accepts JSON only: a pickled message (which could carry code) is refused
    without running; SKUs that try to escape produce keys inside the run's prefix."""
    from celery import Celery

    from skufleet.schemas.names import TASK_RENDER, render_queue

    fleet = pickle_worker
    fleet.enqueue(
        ["../../etc/passwd", "a/b", ".."],
        2,
        pack='name = "p"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n',
    )
    fleet.wait_done(120)
    sender = Celery(broker=fleet.redis.url, set_as_current=False)
    sender.conf.update(task_serializer="pickle", accept_content=["pickle"])
    sender.send_task(
        TASK_RENDER,
        args=[{"run_id": 1, "model": "tiny", "item_ids": [1]}],
        queue=render_queue("skufleet", "tiny"),
        serializer="pickle",
    )
    sender.close()
    wait_until(
        lambda: "disallowed" in fleet.log("worker-0").lower(),
        30,
        "the worker to refuse the pickled message",
    )
    log = fleet.log("worker-0")
    assert "ContentDisallowed" in log or "disallowed" in log.lower()
    with fleet.engine.connect() as conn:
        keys = list(conn.execute(sa.select(Item.object_key)).scalars())
        attempts = list(conn.execute(sa.select(Item.attempts)).scalars())
    assert all(key.startswith("faults/") and key.count("/") == 2 for key in keys)
    assert attempts == [1, 1, 1]  # the refused message rendered nothing


def test_a_large_bad_catalogue_is_accounted_record_by_record(tmp_path: Path) -> None:
    """Malformed records of every kind, scattered through a large file: each is reported
    with its record number, line and reason, and accepted + rejected + duplicate = read."""
    from skufleet.producer.catalogue import Catalogue, Record, Reject, Tally

    rng = random.Random(5)
    bad = {
        "ragged": lambda i: f"B{i},too,many",
        "invalid_sku": lambda i: f" ,no sku {i}",
        "encoding": lambda i: f"E{i},bad \udcff byte",
        "nul_byte": lambda i: f"N{i},nul \x00 here",
        "too_long": lambda i: f"L{i}," + "x" * 4001,
        "malformed_quotes": lambda i: f'Q{i},"x"y',
        "duplicate": lambda i: "G0,first sku again",
    }
    records = 200_000 if FULL else 5_000
    lines, expected = ["G0,good zero"], []
    for i in range(1, records):
        if rng.random() < 0.2:
            reason = rng.choice(sorted(bad))
            lines.append(bad[reason](i))
            expected.append((i + 1, i + 2, reason))
        else:
            lines.append(f"G{i},good {i}")
    path = tmp_path / "bad.csv"
    path.write_bytes(("sku,title\n" + "\n".join(lines) + "\n").encode("utf-8", "surrogateescape"))
    tally = Tally()
    rejects = []
    with Catalogue(path) as catalogue:
        for outcome in catalogue:
            tally.count(outcome)
            if isinstance(outcome, Reject):
                rejects.append((outcome.record, outcome.line, outcome.reason))
            else:
                assert isinstance(outcome, Record)
    assert rejects == expected
    assert tally.read == records
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read
    figures = {
        "scenario": "bad catalogue",
        "read": tally.read,
        "accepted": tally.accepted,
        "rejected": tally.rejected,
        "duplicates": tally.duplicates,
        "reasons": tally.reasons,
    }
    RESULTS.append(figures)
    print(f"\nFAULTS-CATALOGUE {json.dumps(figures)}")
