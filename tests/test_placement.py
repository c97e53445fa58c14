"""No input or message puts an image in the wrong place: object keys are injective within a
run (by construction and by constraint), and a render message renders only items of its own
run, with that run's model, at the keys the ledger holds."""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import logging
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.producer.db import upgrade
from skufleet.producer.enqueue import EnqueueRequest, EnqueueSummary, enqueue
from skufleet.producer.publish import Publisher
from skufleet.schemas import key, ledger
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, ItemStatus, Run
from skufleet.worker.render import Renderer
from skufleet.worker.storage import Storage
from tests.fixtures.pipelines import StandInPipeline

HEADER = "sku,title,category,description,brand,color\n"
MIGRATION = importlib.import_module("skufleet.migrations.versions.0005_object_keys_and_events")


def catalogue(tmp_path: Path, skus: list[str], name: str = "catalogue.csv") -> Path:
    path = tmp_path / name
    rows = "".join(f'"{sku}",Shoe {i},Footwear,A shoe,Brand,blue\n' for i, sku in enumerate(skus))
    path.write_text(HEADER + rows, encoding="utf-8")
    return path


@pytest.fixture
def publisher(redis_url: str) -> Iterator[Publisher]:
    with Publisher(Settings(redis_url=redis_url)) as publisher:
        yield publisher


@pytest.fixture
def queue_prefix(redis_url: str) -> Iterator[str]:
    """A queue prefix of this test's own; its queues are deleted afterwards."""
    prefix = f"test-{secrets.token_hex(6)}"
    yield prefix
    client = redis.Redis.from_url(redis_url)
    for name in client.scan_iter(f"{prefix}*"):
        client.delete(name)


def run_enqueue(
    engine: sa.Engine, publisher: Publisher, path: Path, queue_prefix: str
) -> tuple[EnqueueSummary, list[dict[str, Any]]]:
    """Enqueue ``path`` into run ``placement``: the summary and the rejects report."""
    report = io.StringIO()
    summary = enqueue(
        engine,
        publisher,
        EnqueueRequest(catalogue=path, run="placement", model="tiny"),
        queue_prefix=queue_prefix,
        report=report,
    )
    assert summary.accepted + summary.rejected + summary.duplicates == summary.read
    assert summary.new + summary.changed + summary.unchanged + summary.in_flight == summary.items
    return summary, [json.loads(line) for line in report.getvalue().splitlines()]


def keys_by_item(engine: sa.Engine) -> dict[tuple[str, str], str | None]:
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Item.sku, Item.shot, Item.object_key)).all()
    return {(row.sku, row.shot): row.object_key for row in rows}


def force_collision(monkeypatch: pytest.MonkeyPatch, sku: str, onto: str) -> None:
    """Make ``sku``'s key segment the one of ``onto``: a SHA-256 collision, on demand."""
    real = key.safe_segment
    monkeypatch.setattr(key, "safe_segment", lambda value: real(onto if value == sku else value))


# --- 1. object keys are injective within a run -------------------------------------------


def test_a_sku_and_the_text_of_its_key_segment_become_two_items_with_two_keys(
    engine: sa.Engine, publisher: Publisher, queue_prefix: str, tmp_path: Path
) -> None:
    """``A/B``, the text of its key segment, and the text of its old-scheme segment are
    three products: enqueued, they are six items (two shots each) with six object keys."""
    digest = hashlib.sha256(b"A/B").hexdigest()
    skus = ["A/B", key.safe_segment("A/B"), f"A-B-{digest[:10]}"]
    summary, rejects = run_enqueue(engine, publisher, catalogue(tmp_path, skus), queue_prefix)
    assert (summary.accepted, summary.rejected, summary.items, summary.new) == (3, 0, 6, 6)
    assert rejects == []
    found = keys_by_item(engine)
    assert {sku for sku, _ in found} == set(skus)
    assert len(set(found.values())) == 6
    for (sku, shot), stored in found.items():
        assert stored == key.object_key("placement", sku, shot)


def test_a_key_collision_in_the_catalogue_is_a_rejected_record_naming_both_skus(
    engine: sa.Engine,
    publisher: Publisher,
    queue_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two SKUs of one file with the same key: the later record is rejected (reported,
    counted as rejected, none of its items staged), the rest of the catalogue goes in."""
    force_collision(monkeypatch, "SHOE-2", onto="SHOE-1")
    path = catalogue(tmp_path, ["SHOE-1", "SHOE-2", "SHOE-3"])
    summary, rejects = run_enqueue(engine, publisher, path, queue_prefix)
    assert (summary.read, summary.accepted, summary.rejected) == (3, 2, 1)
    assert summary.reasons == {"key_collision": 1}
    assert (summary.items, summary.new, summary.enqueued) == (4, 4, 4)
    (reject,) = rejects
    assert (reject["record"], reject["line"], reject["reason"]) == (2, 3, "key_collision")
    assert "'SHOE-2'" in reject["detail"] and "'SHOE-1'" in reject["detail"]
    assert "record 1" in reject["detail"]
    found = keys_by_item(engine)
    assert {sku for sku, _ in found} == {"SHOE-1", "SHOE-3"}
    assert len(set(found.values())) == 4


def test_a_key_collision_with_an_item_already_in_the_run_is_a_rejected_record(
    engine: sa.Engine,
    publisher: Publisher,
    queue_prefix: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new SKU whose key an item of the run already has is rejected, naming that item's
    SKU; the item keeps its key, and the other new SKU goes in."""
    run_enqueue(engine, publisher, catalogue(tmp_path, ["SHOE-1"], "first.csv"), queue_prefix)
    before = keys_by_item(engine)
    force_collision(monkeypatch, "SHOE-9", onto="SHOE-1")
    path = catalogue(tmp_path, ["SHOE-9", "SHOE-3"], "second.csv")
    summary, rejects = run_enqueue(engine, publisher, path, queue_prefix)
    assert (summary.read, summary.accepted, summary.rejected, summary.new) == (2, 1, 1, 2)
    (reject,) = rejects
    assert reject["reason"] == "key_collision" and reject["record"] == 1
    assert "'SHOE-9'" in reject["detail"] and "'SHOE-1'" in reject["detail"]
    assert "already in the run" in reject["detail"]
    after = keys_by_item(engine)
    assert {sku for sku, _ in after} == {"SHOE-1", "SHOE-3"}
    assert {k: v for k, v in after.items() if k[0] == "SHOE-1"} == before


def test_two_items_of_a_run_cannot_share_an_object_key(engine: sa.Engine) -> None:
    """The ledger backs the key scheme: unique (run, object key), on each backend."""
    now = ledger.utcnow()
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, "r1", "tiny", 0, "ecommerce", {})
    row = {
        "run_id": run_id,
        "shot": "main",
        "prompt": "p",
        "negative_prompt": "",
        "seed": 1,
        **GenerationParams().model_dump(),
        "status": ItemStatus.PENDING,
        "attempts": 0,
        "object_key": "r1/A-B/main.png",
        "created_at": now,
        "updated_at": now,
    }
    with engine.begin() as conn:
        conn.execute(sa.insert(Item).values(sku="A-B", **row))
    unique = pytest.raises(sa.exc.IntegrityError, match=r"uq_items_run_object_key|UNIQUE")
    with unique, engine.begin() as conn:
        conn.execute(sa.insert(Item).values(sku="A/B", **row))
    with engine.begin() as conn:  # the same key in another run is another object
        other = ledger.upsert_run(conn, "r2", "tiny", 0, "ecommerce", {})
        conn.execute(sa.insert(Item).values(sku="A/B", **{**row, "run_id": other}))


# --- 2. a message renders only items of its own run, with that run's model ---------------


@pytest.fixture
def settings(worker_settings: Settings) -> Settings:
    return worker_settings


@pytest.fixture
def pipeline() -> StandInPipeline:
    return StandInPipeline("tiny")


@pytest.fixture
def worker(settings: Settings, engine: sa.Engine, pipeline: StandInPipeline) -> Iterator[Renderer]:
    storage = Storage(settings)
    storage.ensure_bucket()
    renderer = Renderer(settings, engine, pipeline, storage, "w@test", lambda *_: None)
    yield renderer
    renderer.close()


def queued_run(
    engine: sa.Engine, name: str, model: str = "tiny", output: OutputSpec | None = None
) -> tuple[int, list[int]]:
    """Run ``name`` of ``model`` with two queued items, SKU/1 and SKU/2."""
    params = GenerationParams(width=32, height=16).model_dump()
    rows = [
        {
            "sku": f"SKU/{i}",
            "shot": "main",
            "prompt": f"{name} {i}",
            "negative_prompt": "",
            "seed": i,
            "output": (output or OutputSpec()).to_json(),
            **params,
        }
        for i in (1, 2)
    ]
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, name, model, 0, "ecommerce", {})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.merge()
    ids = [i for chunk in ledger.queue_pending(engine, run_id, 100) for b in chunk for i in b]
    return run_id, ids


def objects(worker: Renderer, prefix: str = "") -> list[str]:
    listed = worker.storage.client.list_objects_v2(Bucket=worker.settings.s3_bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listed.get("Contents", []))


def item_rows(engine: sa.Engine) -> dict[int, Item]:
    with Session(engine) as session:
        return {item.id: item for item in session.scalars(sa.select(Item))}


def refusals(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "skufleet.worker.render" and r.levelno >= logging.WARNING
    ]


def test_a_message_naming_another_runs_item_renders_nothing(
    engine: sa.Engine,
    worker: Renderer,
    pipeline: StandInPipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """{run A, an item of run B}: nothing is claimed or drawn, nothing lands under A's
    prefix (or anywhere), B's item stays queued, and one warning names run, model, reason."""
    run_a, items_a = queued_run(engine, "run-a")
    _, items_b = queued_run(engine, "run-b")
    caplog.set_level(logging.INFO, logger="skufleet.worker.render")
    for ids in ([items_b[0]], [items_a[0], items_b[0]]):
        outcome = worker.handle(RenderPayload(run_id=run_a, model="tiny", item_ids=ids))
        assert (outcome.claimed, outcome.drawn) == (0, 0)
    worker.close()
    assert pipeline.batches == [] and objects(worker) == []
    assert {row.status for row in item_rows(engine).values()} == {ItemStatus.QUEUED}
    refusal = (
        f"refusing a message for run {run_a} on a worker of model 'tiny': "
        "1 of the message's items are not items of run run-a"
    )
    assert refusals(caplog) == [refusal, refusal]


def test_a_message_for_a_run_of_another_model_renders_nothing(
    engine: sa.Engine,
    worker: Renderer,
    pipeline: StandInPipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A message saying model "tiny" for a run of "other/model" reaches a tiny worker: the
    worker goes by the run's model in the ledger and draws nothing."""
    run_c, items_c = queued_run(engine, "run-c", model="other/model")
    caplog.set_level(logging.INFO, logger="skufleet.worker.render")
    outcome = worker.handle(RenderPayload(run_id=run_c, model="tiny", item_ids=items_c))
    worker.close()
    assert (outcome.claimed, pipeline.batches, objects(worker)) == (0, [], [])
    assert {row.status for row in item_rows(engine).values()} == {ItemStatus.QUEUED}
    assert refusals(caplog) == [
        f"refusing a message for run {run_c} on a worker of model 'tiny': "
        "run run-c is for model 'other/model', not 'tiny'"
    ]


def test_a_message_naming_a_run_that_does_not_exist_renders_nothing(
    engine: sa.Engine,
    worker: Renderer,
    pipeline: StandInPipeline,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """An unknown run id, with ids of real items: nothing is claimed or drawn."""
    run_a, items_a = queued_run(engine, "run-a")
    caplog.set_level(logging.INFO, logger="skufleet.worker.render")
    outcome = worker.handle(RenderPayload(run_id=run_a + 1000, model="tiny", item_ids=items_a))
    worker.close()
    assert (outcome.claimed, pipeline.batches, objects(worker)) == (0, [], [])
    assert {row.status for row in item_rows(engine).values()} == {ItemStatus.QUEUED}
    assert refusals(caplog) == [
        f"refusing a message for run {run_a + 1000} on a worker of model 'tiny': "
        f"no run with id {run_a + 1000}"
    ]


def test_a_matching_message_renders_into_its_runs_prefix_at_the_stored_keys(
    engine: sa.Engine, worker: Renderer, caplog: pytest.LogCaptureFixture
) -> None:
    """The message of run B renders B's items, each at the key the ledger holds for it."""
    queued_run(engine, "run-a")
    run_b, items_b = queued_run(engine, "run-b")
    caplog.set_level(logging.INFO, logger="skufleet.worker.render")
    outcome = worker.handle(RenderPayload(run_id=run_b, model="tiny", item_ids=items_b))
    worker.close()
    assert outcome.claimed == outcome.drawn == 2 and refusals(caplog) == []
    rows = item_rows(engine)
    done = [rows[i] for i in items_b]
    assert all(row.status is ItemStatus.SUCCEEDED for row in done)
    assert [row.object_key for row in done] == [
        key.object_key("run-b", row.sku, row.shot) for row in done
    ]
    assert objects(worker, "run-b/") == sorted(str(row.object_key) for row in done)
    assert objects(worker, "run-a/") == []


def test_an_item_whose_key_does_not_fit_its_format_fails_and_uploads_nothing(
    engine: sa.Engine, worker: Renderer
) -> None:
    """The image is stored only at the item's key, and only if the key's extension is the
    format the image was encoded in; otherwise the item fails for good."""
    run_id, ids = queued_run(engine, "run-w", output=OutputSpec(format="webp"))
    with engine.begin() as conn:
        conn.execute(
            sa.update(Item)
            .where(Item.id == ids[0])
            .values(object_key=sa.func.replace(Item.object_key, ".webp", ".png"))
        )
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    worker.close()
    rows = item_rows(engine)
    assert rows[ids[0]].status is ItemStatus.FAILED
    assert "does not end in .webp" in (rows[ids[0]].last_error or "")
    assert rows[ids[1]].status is ItemStatus.SUCCEEDED
    assert objects(worker, "run-w/") == [rows[ids[1]].object_key]


# --- the migration that brings keys to existing ledgers ----------------------------------


def ledger_at_0004(database_url: str, items: list[dict[str, Any]]) -> sa.Engine:
    """A ledger at revision 0004 with run ``mig`` (id 1) holding ``items`` in order."""
    engine = ledger.create_engine(database_url)
    upgrade(engine, "0004")
    now = ledger.utcnow()
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Run).values(
                id=1,
                name="mig",
                model="tiny",
                seed=0,
                template="ecommerce",
                params={},
                stats={},
                created_at=now,
                updated_at=now,
            )
        )
        for values in items:
            conn.execute(
                sa.insert(Item).values(
                    run_id=1,
                    shot="main",
                    prompt="p",
                    negative_prompt="",
                    seed=1,
                    **GenerationParams().model_dump(),
                    attempts=1 if values["status"] == "succeeded" else 0,
                    created_at=now,
                    updated_at=now,
                    **values,
                )
            )
    return engine


def migrated(engine: sa.Engine) -> dict[str, Any]:
    upgrade(engine)
    ledger.require_schema(engine)
    with engine.connect() as conn:
        rows = conn.execute(sa.select(Item.sku, Item.status, Item.object_key, Item.last_error))
        return {row.sku: row for row in rows}


OLD_AB = f"A-B-{hashlib.sha256(b'A/B').hexdigest()[:10]}"
"""What the old scheme made of ``A/B``: also a SKU of its own, kept verbatim."""
OLD_KEY = f"mig/{OLD_AB}/main.png"


def test_upgrading_keeps_the_first_of_two_succeeded_items_sharing_a_key(
    database_url: str,
) -> None:
    """Two succeeded items with one (old-scheme) key and a pending one without a key: the
    first keeps its key, the second fails with the reason and gets a key of its own, the
    pending one gets its key."""
    engine = ledger_at_0004(
        database_url,
        [
            {"sku": OLD_AB, "status": "succeeded", "object_key": OLD_KEY, "sha256": "a" * 64},
            {"sku": "A/B", "status": "succeeded", "object_key": OLD_KEY, "sha256": "b" * 64},
            {"sku": "C D", "status": "pending"},
        ],
    )
    try:
        rows = migrated(engine)
    finally:
        engine.dispose()
    assert (rows[OLD_AB].status, rows[OLD_AB].object_key) == ("succeeded", OLD_KEY)
    second = rows["A/B"]
    assert (second.status, second.last_error) == ("failed", MIGRATION.COLLISION)
    assert second.object_key == key.object_key("mig", "A/B", "main") != OLD_KEY
    assert rows["C D"].object_key == key.object_key("mig", "C D", "main")
    assert rows["C D"].status == "pending"


def test_upgrading_gives_a_verbatim_sku_its_key_when_another_sku_held_it(
    database_url: str,
) -> None:
    """``A/B`` succeeded first at its old key, which is the verbatim SKU's own key: the
    verbatim SKU keeps (or, pending, gets) that key and ``A/B`` fails and moves, so the
    upgrade's unique constraint holds instead of failing the upgrade."""
    engine = ledger_at_0004(
        database_url,
        [
            {"sku": "A/B", "status": "succeeded", "object_key": OLD_KEY},
            {"sku": OLD_AB, "status": "succeeded", "object_key": OLD_KEY},
            {"sku": "E/F", "status": "succeeded", "object_key": "mig/E-F-0123456789/main.png"},
            {"sku": "E-F-0123456789", "status": "queued"},
            {"sku": "G", "status": "failed", "object_key": "mig/G/main.png"},
        ],
    )
    try:
        rows = migrated(engine)
    finally:
        engine.dispose()
    assert (rows[OLD_AB].status, rows[OLD_AB].object_key) == ("succeeded", OLD_KEY)
    assert (rows["A/B"].status, rows["A/B"].last_error) == ("failed", MIGRATION.COLLISION)
    assert rows["A/B"].object_key == key.object_key("mig", "A/B", "main")
    assert rows["E-F-0123456789"].object_key == "mig/E-F-0123456789/main.png"
    assert rows["E-F-0123456789"].status == "queued"
    assert (rows["E/F"].status, rows["E/F"].object_key) == (
        "failed",
        key.object_key("mig", "E/F", "main"),
    )
    assert (rows["G"].status, rows["G"].object_key) == ("failed", "mig/G/main.png")
