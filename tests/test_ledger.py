"""The ledger's state machine on PostgreSQL and SQLite: compare-and-set claims and fences."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError, SchemaMissingError
from skufleet.schemas.key import object_key
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import GenerationParams
from skufleet.schemas.tables import Item, ItemStatus


def item(sku: str, prompt: str = "p", params: GenerationParams | None = None) -> dict[str, Any]:
    """A staged item row, as the producer builds it."""
    return {
        "sku": sku,
        "shot": "main",
        "prompt": prompt,
        "negative_prompt": "",
        "output": "{}",
        "seed": 1,
        **(params or GenerationParams()).model_dump(),
    }


def merge(engine: sa.Engine, rows: list[dict[str, Any]], run_name: str = "r1") -> tuple[int, ...]:
    """Stage ``rows`` and merge them into run ``run_name``: (run id, new, changed, in flight)."""
    with ledger.begin(engine) as conn:
        run_id = ledger.upsert_run(conn, run_name, "tiny", 1, "ecommerce", {})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        return (run_id, *staging.merge())


def add_run(engine: sa.Engine, n: int = 4, run_name: str = "r1") -> list[int]:
    """A run with ``n`` items, all marked queued; returns their ids."""
    rows = [item(f"SKU-{i}", f"prompt {i}") for i in range(n)]
    run_id, new, _, _ = merge(engine, rows, run_name)
    assert new == n
    ids = [i for chunk in ledger.queue_pending(engine, run_id, 100) for b in chunk for i in b]
    assert len(ids) == n and list(ledger.queue_pending(engine, run_id, 100)) == []
    return ids


def claim(
    engine: sa.Engine, ids: list[int], worker: str, run_name: str = "r1"
) -> list[ledger.Claim]:
    """Claim ``ids`` for run ``run_name`` as a worker of model tiny; the message must match."""
    with ledger.connect(engine) as conn:
        run_id = ledger.find_run_id(conn, run_name)
    result = ledger.claim(engine, run_id, "tiny", ids, worker, "cpu", 60)
    assert result.refused is None and result.run_name == run_name
    return result.claims


def finish(engine: sa.Engine, held: ledger.Claim, gated: ledger.Gated | None = None) -> bool:
    """Finish ``held`` as its worker would, with a 64×64 PNG of 1 byte."""
    return ledger.finish(
        engine, held, 1, "0" * 64, 0.1, width=64, height=64, image_format="png", gated=gated
    )


def statuses(engine: sa.Engine) -> dict[int, str]:
    with engine.connect() as conn:
        return {row.id: row.status for row in conn.execute(sa.select(Item.id, Item.status))}


def test_an_item_is_won_by_one_claim_only(engine: sa.Engine) -> None:
    """Two workers claiming the same ids: the second gets nothing."""
    ids = add_run(engine)
    first = claim(engine, ids, "w1")
    second = claim(engine, ids, "w2")
    assert [c.id for c in first] == sorted(ids)
    assert second == []
    assert all(c.attempt == 1 for c in first)


def test_a_stale_attempt_cannot_finish_or_fail(engine: sa.Engine) -> None:
    """The attempt number fences completion: an old claim's finish is refused."""
    item_id = add_run(engine, 1)[0]
    stale = claim(engine, [item_id], "w1")[0]
    # the item goes back to queued (as after a retry) and is claimed again
    assert ledger.fail(engine, stale, "boom", retry=True, max_attempts=3) is ItemStatus.QUEUED
    fresh = claim(engine, [item_id], "w2")[0]
    assert fresh.attempt == 2
    assert finish(engine, stale) is False
    assert ledger.fail(engine, stale, "late", retry=True, max_attempts=3) is None
    assert finish(engine, fresh) is True
    assert statuses(engine)[item_id] == "succeeded"


def test_failures_retry_until_the_cap_then_fail_with_the_reason(engine: sa.Engine) -> None:
    """Each failed attempt under the cap requeues; the last one fails the item for good."""
    item_id = add_run(engine, 1)[0]
    results = []
    for _ in range(3):
        claimed = claim(engine, [item_id], "w")[0]
        results.append(
            ledger.fail(engine, claimed, f"boom {claimed.attempt}", retry=True, max_attempts=3)
        )
    assert results == [ItemStatus.QUEUED, ItemStatus.QUEUED, ItemStatus.FAILED]
    with engine.connect() as conn:
        row = conn.execute(sa.select(Item).where(Item.id == item_id)).one()
    assert (row.status, row.attempts, row.last_error) == ("failed", 3, "boom 3")
    assert claim(engine, [item_id], "w") == []


def test_a_permanent_error_fails_the_item_at_once(engine: sa.Engine) -> None:
    """Errors that retrying cannot fix do not use up the remaining attempts."""
    item_id = add_run(engine, 1)[0]
    claimed = claim(engine, [item_id], "w")[0]
    assert ledger.fail(engine, claimed, "bad", retry=False, max_attempts=3) is ItemStatus.FAILED


def test_merging_a_catalogue_again_inserts_new_and_resets_changed_items(
    engine: sa.Engine,
) -> None:
    """New (sku, shot) rows are inserted, changed ones go back to pending, the rest stay."""
    ids = add_run(engine, 4)  # SKU-0..3, prompts "prompt i", all queued
    done = claim(engine, ids[:2], "w")
    for claimed in done:
        finish(engine, claimed)
    running = claim(engine, ids[2:3], "w")[0]
    rows = [item(f"SKU-{i}", f"prompt {i}") for i in range(6)]
    rows[1]["prompt"] = "a new prompt"  # succeeded, changed → pending
    rows[2]["steps"] = 5  # running, changed → left alone (in flight)
    rows[3]["seed"] = 9  # queued, changed → stays queued with the new seed
    _, new, changed, in_flight = merge(engine, rows)
    assert (new, changed, in_flight) == (2, 2, 1)
    with engine.connect() as conn:
        found = {r.sku: r for r in conn.execute(sa.select(Item))}
    assert [found[f"SKU-{i}"].status for i in range(6)] == [
        "succeeded",
        "pending",
        "running",
        "queued",
        "pending",
        "pending",
    ]
    assert found["SKU-1"].prompt == "a new prompt" and found["SKU-1"].sha256 is None
    assert found["SKU-1"].attempts_before_retry == 1  # the cap counts afresh
    assert (found["SKU-2"].steps, found["SKU-3"].seed) == (30, 9)
    assert finish(engine, running)  # its claim still holds


def test_merging_stores_each_items_key_and_a_new_format_moves_it(engine: sa.Engine) -> None:
    """The object key is fixed when an item is staged: from the run, sku, shot and output
    format; an enqueue that changes the format changes the key, and a missing key is filled."""
    merge(engine, [item("A/B"), item("SHOE-1")])
    with engine.begin() as conn:
        conn.execute(sa.update(Item).where(Item.sku == "SHOE-1").values(object_key=None))
    rows = [item("A/B"), item("SHOE-1")]
    rows[0]["output"] = OutputSpec(format="webp").to_json()
    assert merge(engine, rows)[1:] == (0, 1, 0)
    with engine.connect() as conn:
        keys = dict(conn.execute(sa.select(Item.sku, Item.object_key)).all())
    assert keys == {
        "A/B": object_key("r1", "A/B", "main", "webp"),
        "SHOE-1": "r1/SHOE-1/main.png",
    }


def test_a_claim_takes_nothing_from_a_message_that_does_not_match_the_ledger(
    engine: sa.Engine,
) -> None:
    """Another run's item, a run of another model, or no such run: the claim is refused
    with the reason, and every item named stays queued."""
    mine, theirs = add_run(engine, 2, "r1"), add_run(engine, 1, "r2")
    with engine.begin() as conn:
        r1, r2 = ledger.find_run_id(conn, "r1"), ledger.find_run_id(conn, "r2")
    foreign = ledger.claim(engine, r1, "tiny", [mine[0], theirs[0]], "w", "cpu", 60)
    assert foreign == ledger.ClaimResult(
        "r1", "1 of the message's items are not items of run r1", []
    )
    other_model = ledger.claim(engine, r2, "big/model", theirs, "w", "cpu", 60)
    assert other_model.refused == "run r2 is for model 'tiny', not 'big/model'"
    missing = ledger.claim(engine, r2 + 100, "tiny", theirs, "w", "cpu", 60)
    assert (missing.run_name, missing.refused) == (None, f"no run with id {r2 + 100}")
    assert set(statuses(engine).values()) == {"queued"}
    (won,) = ledger.claim(engine, r2, "tiny", theirs, "w", "cpu", 60).claims
    assert (won.run_id, won.run_name, won.object_key) == (r2, "r2", "r2/SKU-0/main.png")


def test_batches_group_items_with_the_same_parameters(engine: sa.Engine) -> None:
    """A message never mixes image sizes or step counts, and respects the batch size."""
    small, large = GenerationParams(width=64, height=64), GenerationParams()
    run_id, *_ = merge(engine, [item(f"S{i}", params=small if i % 2 else large) for i in range(7)])
    batches = [batch for chunk in ledger.queue_pending(engine, run_id, 2) for batch in chunk]
    with engine.begin() as conn:
        sizes = {row.id: row.width for row in conn.execute(sa.select(Item.id, Item.width))}
    assert sorted(len(b) for b in batches) == [1, 2, 2, 2]  # 3 small, 4 large
    assert all(len({sizes[i] for i in batch}) == 1 for batch in batches)


def test_a_run_keeps_its_model_and_seed(engine: sa.Engine) -> None:
    """Continuing a run with another model or seed is refused, naming both."""
    add_run(engine, 1)
    with engine.begin() as conn, pytest.raises(ConfigError, match="created with model 'tiny'"):
        ledger.upsert_run(conn, "r1", "other", 1, "ecommerce", {})


def test_cancel_stops_open_items_and_retry_brings_back_failed_and_cancelled(
    engine: sa.Engine,
) -> None:
    """Cancel: pending/queued → cancelled (running ones finish). Retry: failed and cancelled
    → pending with a fresh attempt budget, while the fencing token keeps growing."""
    ids = add_run(engine, 4)
    failing = claim(engine, ids[:1], "w")[0]
    ledger.fail(engine, failing, "bad", retry=False, max_attempts=3)
    running = claim(engine, ids[1:2], "w")[0]
    with engine.begin() as conn:
        run_id = ledger.find_run_id(conn, "r1")
        assert ledger.cancel_run(conn, run_id) == 2
    assert claim(engine, ids, "w") == []  # cancelled items are skipped
    assert finish(engine, running)
    with engine.begin() as conn:
        assert ledger.retry_run(conn, run_id, failed_only=True) == 1
        assert ledger.retry_run(conn, run_id, failed_only=False) == 2
        counts = ledger.run_status(conn, "r1").counts
    assert (counts["pending"], counts["succeeded"], counts["cancelled"]) == (3, 1, 0)
    list(ledger.queue_pending(engine, run_id, 10))
    again = claim(engine, ids[:1], "w")[0]
    assert (again.attempt, again.attempts_before_retry) == (2, 1)
    assert again.may_retry(max_attempts=2) and not again.may_retry(max_attempts=1)


def test_expired_leases_are_requeued_or_dead_lettered_at_the_cap(engine: sa.Engine) -> None:
    """A running item whose lease passed goes back to queued with the reason, or fails for
    good if that was its last attempt; live leases are left alone."""
    ids = add_run(engine, 3)
    first, second, live = (claim(engine, [i], "w@dead")[0] for i in ids)
    with engine.begin() as conn:
        conn.execute(
            sa.update(Item)
            .where(Item.id.in_(ids[:2]))
            .values(lease_expires_at=ledger.utcnow() - timedelta(seconds=1))
        )
        conn.execute(sa.update(Item).where(Item.id == ids[1]).values(attempts_before_retry=-2))
        requeued, dead = ledger.expire_leases(conn, max_attempts=3, batch_size=1)
    assert dead == 1  # ids[1]: attempt 1 counts as 3 since its last retry
    assert [group.batches for group in requeued] == [[[ids[0]]]]
    with engine.connect() as conn:
        rows = {r.id: r for r in conn.execute(sa.select(Item))}
    assert rows[ids[0]].status == "queued" and "lease expired" in rows[ids[0]].last_error
    assert "w@dead" in rows[ids[0]].last_error
    assert rows[ids[1]].status == "failed" and rows[ids[2]].status == "running"
    assert not finish(engine, first)  # the fence holds
    assert ledger.renew(engine, live, 60) and not ledger.renew(engine, second, 60)


def test_stale_queued_items_are_restamped_and_returned_for_publishing(engine: sa.Engine) -> None:
    """Queued items older than the threshold are returned in batches, once: the stamp makes
    the next pass leave them alone."""
    ids = add_run(engine, 5)
    older = ledger.utcnow() + timedelta(seconds=1)
    with engine.begin() as conn:
        assert ledger.queued_models(conn, older) == ["tiny"]
        found = ledger.requeue_stale(conn, "tiny", older, batch_size=2)
    assert [sorted(b) for g in found for b in g.batches] == [
        sorted(ids[:2]),
        sorted(ids[2:4]),
        [ids[4]],
    ]
    with engine.begin() as conn:
        assert ledger.requeue_stale(conn, "tiny", ledger.utcnow() - timedelta(seconds=30), 2) == []


def test_missing_tables_are_reported_plainly(database_url: str) -> None:
    """Before `skufleet db upgrade`, commands say so instead of failing on SQL."""
    engine = ledger.create_engine(database_url)
    with pytest.raises(SchemaMissingError, match="run `skufleet db upgrade`"):
        ledger.require_schema(engine)


def test_a_batch_is_finished_in_one_statement_fenced_item_by_item(engine: sa.Engine) -> None:
    """``finish_many``: each item still ours ends succeeded or needs review with its own
    values and candidates; one taken over meanwhile is left alone, its candidates unrecorded;
    ``renew_many`` renews only what is still ours."""
    from skufleet.schemas.tables import Candidate

    ids = add_run(engine, 3)
    held = claim(engine, ids, "w1")
    # the third item was taken over: its lease expired and another worker claimed it
    assert ledger.fail(engine, held[2], "lost", retry=True, max_attempts=3) is ItemStatus.QUEUED
    claim(engine, [held[2].id], "w2")
    assert ledger.renew_many(engine, held, 60) == {held[0].id, held[1].id}
    passing = {"dark": {"score": 0.5, "threshold": 0.06, "passed": True}}
    failing = {"dark": {"score": 0.0, "threshold": 0.06, "passed": False}}
    gates = [
        ledger.Gated((ledger.Drawn(0, 11, passing, True, False),), kept=0, phash=5),
        ledger.Gated(
            (
                ledger.Drawn(0, 12, failing, False, False),
                ledger.Drawn(1, 13, failing, False, True),
            ),
            kept=1,
            phash=(1 << 64) - 1,
        ),
        ledger.Gated((ledger.Drawn(0, 14, passing, True, False),), kept=0, phash=7),
    ]
    finished = [
        ledger.Finished(h, 10 + i, f"{i}" * 64, 0.5, 64, 64, "png", g)
        for i, (h, g) in enumerate(zip(held, gates, strict=True))
    ]
    assert ledger.finish_many(engine, finished) == {held[0].id, held[1].id}
    with Session(engine) as session:
        rows = {i.id: i for i in session.scalars(sa.select(Item))}
        recorded = session.scalars(sa.select(Candidate).order_by(Candidate.id)).all()
    first, second, third = (rows[h.id] for h in held)
    assert (first.status, first.byte_size, first.image_seed, first.renders, first.phash) == (
        ItemStatus.SUCCEEDED,
        10,
        11,
        1,
        5,
    )
    assert (second.status, second.image_seed, second.roll, second.next_roll) == (
        ItemStatus.NEEDS_REVIEW,
        13,
        1,
        2,
    )
    assert (second.renders, second.rerolls, second.phash) == (2, 1, -1)
    assert second.last_error == "quality: failed dark"
    assert (third.status, third.worker, third.sha256) == (ItemStatus.RUNNING, "w2", None)
    assert [(c.item_id, c.seed, c.kept) for c in recorded] == [
        (held[0].id, 11, True),
        (held[1].id, 12, False),
        (held[1].id, 13, True),
    ]
