"""The quality gate in the renderer: re-rolls, needs_review, a reviewer's reject drawn again
with the next seed, and the duplicate check fed from the ledger; real ledger and S3."""

from __future__ import annotations

import json
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.schemas import ledger
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Candidate, Item, ItemStatus, Run
from skufleet.worker.quality import seed_variant
from skufleet.worker.render import Renderer
from skufleet.worker.storage import Storage
from tests.fixtures.pipelines import ScriptedPipeline

pytestmark = pytest.mark.postgresql_only

SEED = 100


@pytest.fixture
def settings(worker_settings: Settings) -> Settings:
    return worker_settings


def queued_run(engine: sa.Engine, skus: list[str], quality: dict[str, Any] | None = None) -> int:
    """Run ``gate`` with one item per SKU (seeds 100, 101, …), queued; its id."""
    params = GenerationParams(width=64, height=64).model_dump()
    rows = [
        {
            "sku": sku,
            "shot": "main",
            "prompt": f"a photo of {sku}",
            "negative_prompt": "",
            "seed": SEED + i,
            "output": "{}",
            **params,
        }
        for i, sku in enumerate(skus)
    ]
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, "gate", "tiny", 0, "ecommerce", {"quality": quality or {}})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.merge()
        conn.execute(
            sa.update(Run).where(Run.id == run_id).values(params={"quality": quality or {}})
        )
    return run_id


def render_queued(worker: Renderer, engine: sa.Engine, run_id: int) -> None:
    """Queue the run's pending items and render them, one message per batch of 8."""
    for chunk in ledger.queue_pending(engine, run_id, 8):
        for ids in chunk.batches:
            worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))


def items(engine: sa.Engine) -> dict[str, Item]:
    with Session(engine) as session:
        return {i.sku: i for i in session.scalars(sa.select(Item))}


def candidates(engine: sa.Engine, item_id: int) -> list[tuple[int, int, bool, bool]]:
    """(roll, seed, passed, kept) of every candidate recorded for the item, in order."""
    with Session(engine) as session:
        rows = session.scalars(
            sa.select(Candidate).where(Candidate.item_id == item_id).order_by(Candidate.id)
        )
        return [(c.roll, c.seed, c.passed, c.kept) for c in rows]


def renderer(settings: Settings, engine: sa.Engine, pipeline: Any) -> Renderer:
    storage = Storage(settings)
    storage.ensure_bucket()
    return Renderer(settings, engine, pipeline, storage, "w@test", lambda *_: None)


def test_a_black_image_is_drawn_again_with_the_next_seed_variant_and_the_good_one_kept(
    engine: sa.Engine, settings: Settings
) -> None:
    """An fp16-overflow black frame fails ``dark``; the item is drawn again at roll 1 and
    succeeds with that image, both candidates recorded with their seeds."""
    pipeline = ScriptedPipeline("tiny", {SEED: "black"})
    worker = renderer(settings, engine, pipeline)
    run_id = queued_run(engine, ["A", "B"])
    render_queued(worker, engine, run_id)
    worker.close()

    found = items(engine)
    a, b = found["A"], found["B"]
    assert (a.status, a.roll, a.image_seed, a.renders, a.rerolls, a.verdict) == (
        ItemStatus.SUCCEEDED,
        1,
        seed_variant(SEED, 1),
        2,
        1,
        "passed",
    )
    assert candidates(engine, a.id) == [
        (0, SEED, False, False),
        (1, seed_variant(SEED, 1), True, True),
    ]
    assert json.loads(a.quality)["dark"]["passed"] is True
    assert (b.status, b.roll, b.renders, b.rerolls) == (ItemStatus.SUCCEEDED, 0, 1, 0)
    # one batch for both items, then one re-roll batch for A alone
    assert pipeline.batches == [2, 1]
    metadata = worker.storage.client.head_object(Bucket=settings.s3_bucket, Key=a.object_key)
    assert metadata["Metadata"]["seed"] == str(seed_variant(SEED, 1))


def test_an_item_failing_every_roll_is_stored_for_review_with_its_best_image(
    engine: sa.Engine, settings: Settings
) -> None:
    """After ``max_rolls`` re-rolls all blank, the item is needs_review: its image stored,
    the failed check named, every candidate recorded; the run completes without it in
    the manifest's lines."""
    script = {seed_variant(SEED, roll): "blank" for roll in range(3)}
    pipeline = ScriptedPipeline("tiny", script)
    worker = renderer(settings, engine, pipeline)
    run_id = queued_run(engine, ["A"], {"max_rolls": 2})
    render_queued(worker, engine, run_id)
    worker.close()

    a = items(engine)["A"]
    assert (a.status, a.verdict, a.renders, a.rerolls, a.next_roll) == (
        ItemStatus.NEEDS_REVIEW,
        "failed",
        3,
        2,
        3,
    )
    assert a.last_error is not None and "blank" in a.last_error
    recorded = candidates(engine, a.id)
    assert [(roll, seed) for roll, seed, _, _ in recorded] == [
        (roll, seed_variant(SEED, roll)) for roll in range(3)
    ]
    assert sum(kept for *_, kept in recorded) == 1 and not any(p for _, _, p, _ in recorded)
    head = worker.storage.client.head_object(Bucket=settings.s3_bucket, Key=a.object_key)
    assert head["ContentLength"] == a.byte_size
    with ledger.connect(engine) as conn:
        lines = list(ledger.manifest(conn, ledger.find_run_name(conn, run_id) or ""))
    assert lines == []


def test_a_rejected_item_is_drawn_again_with_a_seed_it_has_not_had(
    engine: sa.Engine, settings: Settings
) -> None:
    """A reviewer rejects a succeeded image: the next render draws the roll after every
    roll stored, so the item gets a new image; the decision is recorded with who."""
    pipeline = ScriptedPipeline("tiny")
    worker = renderer(settings, engine, pipeline)
    run_id = queued_run(engine, ["A"])
    render_queued(worker, engine, run_id)
    first = items(engine)["A"]
    with ledger.begin(engine) as conn:
        status = ledger.decide(conn, run_id, first.id, "rejected", "ana@example")
    assert status is ItemStatus.PENDING
    render_queued(worker, engine, run_id)
    worker.close()

    again = items(engine)["A"]
    assert (again.status, again.roll, again.image_seed) == (
        ItemStatus.SUCCEEDED,
        1,
        seed_variant(SEED, 1),
    )
    assert again.sha256 != first.sha256
    with ledger.connect(engine) as conn:
        decided = ledger.decisions(conn, run_id)
    assert [(d["decision"], d["reviewer"], d["seed"]) for d in decided] == [
        ("rejected", "ana@example", SEED)
    ]


def test_a_copy_of_another_skus_stored_image_is_caught_from_the_ledger(
    engine: sa.Engine, settings: Settings
) -> None:
    """A worker that never drew SKU A still sees A's stored image (its hash in the ledger):
    B's first draw, the same picture, fails ``duplicate`` and is drawn again."""
    run_id = queued_run(engine, ["A", "B"])
    # A is drawn and stored by one worker: seed 100 draws the picture "copy" draws
    first = renderer(settings, engine, ScriptedPipeline("tiny", {SEED: "copy"}))
    with ledger.begin(engine) as conn:
        conn.execute(sa.update(Item).where(Item.sku == "B").values(status=ItemStatus.CANCELLED))
    render_queued(first, engine, run_id)
    first.close()
    with ledger.begin(engine) as conn:
        conn.execute(sa.update(Item).where(Item.sku == "B").values(status=ItemStatus.PENDING))
    second_pipeline = ScriptedPipeline("tiny", {SEED + 1: "copy"})
    second = renderer(settings, engine, second_pipeline)
    render_queued(second, engine, run_id)
    second.close()

    b = items(engine)["B"]
    assert (b.status, b.roll, b.rerolls) == (ItemStatus.SUCCEEDED, 1, 1)
    first_try = candidates(engine, b.id)[0]
    assert first_try[:3] == (0, SEED + 1, False)
    assert second_pipeline.seeds == [SEED + 1, seed_variant(SEED + 1, 1)]


def test_a_run_that_turns_the_gate_off_keeps_what_was_drawn(
    engine: sa.Engine, settings: Settings
) -> None:
    """``checks: []``: one render per item, a black frame delivered as drawn."""
    pipeline = ScriptedPipeline("tiny", {SEED: "black"})
    worker = renderer(settings, engine, pipeline)
    run_id = queued_run(engine, ["A"], {"checks": []})
    render_queued(worker, engine, run_id)
    worker.close()
    a = items(engine)["A"]
    assert (a.status, a.renders, a.rerolls, pipeline.batches) == (ItemStatus.SUCCEEDED, 1, 0, [1])


def test_the_review_listing_shows_each_stored_image_with_its_candidates(
    engine: sa.Engine, settings: Settings
) -> None:
    """What a reviewer sees of a run: its stored images, seeds, scores and candidates."""
    script = {seed_variant(SEED, roll): "blank" for roll in range(2)}
    worker = renderer(settings, engine, ScriptedPipeline("tiny", script))
    run_id = queued_run(engine, ["A", "B"], {"max_rolls": 1})
    render_queued(worker, engine, run_id)
    worker.close()
    with ledger.connect(engine) as conn:
        listed = {r.sku: r for r in ledger.reviewable(conn, run_id)}
    a, b = listed["A"], listed["B"]
    assert (a.status, a.failed, len(a.candidates)) == ("needs_review", ["blank", "flat"], 2)
    assert [c["seed"] for c in a.candidates] == [SEED, seed_variant(SEED, 1)]
    assert (b.status, b.failed, b.seed, b.renders) == ("succeeded", [], SEED + 1, 1)


def test_a_configured_clip_model_scores_every_image_against_its_prompt(
    engine: sa.Engine, settings: Settings, model_cache: Any
) -> None:
    """With ``SKUFLEET_QUALITY_CLIP`` set, ``clip`` joins the checks of a run that did not
    choose its own: each image's score is recorded, and one below the run's threshold is
    drawn again; a run that chose its checks is held to those alone."""
    clip_settings = settings.model_copy(
        update={"quality_clip": "tiny-clip", "cache_dir": model_cache}
    )
    worker = renderer(clip_settings, engine, ScriptedPipeline("tiny"))
    # a tiny random CLIP scores near 0: -100 passes everything, 100 fails everything
    run_id = queued_run(engine, ["A"], {"thresholds": {"clip": -100.0}})
    render_queued(worker, engine, run_id)
    a = items(engine)["A"]
    scores = json.loads(a.quality)
    assert set(scores) == {"dark", "blank", "flat", "duplicate", "safety", "clip"}
    assert (a.status, scores["clip"]["passed"]) == (ItemStatus.SUCCEEDED, True)

    strict = queued_run(engine, ["B"], {"thresholds": {"clip": 100.0}, "max_rolls": 1})
    render_queued(worker, engine, strict)
    b = items(engine)["B"]
    assert (b.status, b.renders) == (ItemStatus.NEEDS_REVIEW, 2)
    assert json.loads(b.quality)["clip"]["passed"] is False

    chosen = queued_run(engine, ["C"], {"checks": ["dark"], "default_checks": False})
    render_queued(worker, engine, chosen)
    worker.close()
    c = items(engine)["C"]
    assert (c.status, set(json.loads(c.quality))) == (ItemStatus.SUCCEEDED, {"dark"})
