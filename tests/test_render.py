"""The renderer, called directly: claim, draw, store, record, against a real ledger and S3."""

from __future__ import annotations

import io
import secrets
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from skufleet.producer.services import LocalS3
from skufleet.schemas import ledger
from skufleet.schemas.errors import DeviceError
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, ItemStatus
from skufleet.worker.handoff import Handoff
from skufleet.worker.postprocess import read_metadata
from skufleet.worker.render import Renderer
from skufleet.worker.storage import Storage
from tests.fixtures.pipelines import (
    FLAG,
    POISON,
    FlaggingPipeline,
    OutOfMemoryPipeline,
    PoisonPipeline,
    StandInPipeline,
)

# the renderer's behaviour does not depend on the database: it runs on the production one
pytestmark = pytest.mark.postgresql_only


@pytest.fixture
def settings(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return Settings(
        s3_endpoint_url=s3.endpoint_url,
        s3_bucket=f"t-{secrets.token_hex(6)}",
        max_attempts=2,
        retry_backoff_seconds=0,
    )


class Requeued(list[tuple[RenderPayload, float]]):
    """Collects what the renderer republishes, instead of a broker."""

    def __call__(self, payload: RenderPayload, countdown: float) -> None:
        self.append((payload, countdown))


def queued_run(
    engine: sa.Engine, n: int, output: OutputSpec | None = None, prompt: str = "p{i}"
) -> tuple[int, list[int]]:
    params = GenerationParams(width=32, height=16).model_dump()
    rows = [
        {
            "sku": f"SKU/{i}",
            "shot": "main",
            "prompt": prompt.format(i=i),
            "negative_prompt": "n",
            "seed": 100 + i,
            "output": (output or OutputSpec()).to_json(),
            **params,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, "render", "tiny", 0, "ecommerce", {})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.merge()
    ids = [i for chunk in ledger.queue_pending(engine, run_id, 100) for b in chunk for i in b]
    return run_id, ids


def renderer(
    settings: Settings,
    engine: sa.Engine,
    pipeline: Any,
    *,
    bucket: bool = True,
    storage: Storage | None = None,
) -> tuple[Renderer, Requeued]:
    storage = storage or Storage(settings)
    if bucket:
        storage.ensure_bucket()
    requeued = Requeued()
    return Renderer(settings, engine, pipeline, storage, "w@test", requeued), requeued


def items(engine: sa.Engine) -> list[Item]:
    with Session(engine) as session:
        return list(session.scalars(sa.select(Item).order_by(Item.id)))


def test_a_message_is_rendered_once_and_a_duplicate_is_skipped(
    engine: sa.Engine, settings: Settings
) -> None:
    """A second delivery of the same message draws nothing and uploads nothing."""
    pipeline = StandInPipeline("tiny")
    worker, _ = renderer(settings, engine, pipeline)
    run_id, ids = queued_run(engine, 3)
    payload = RenderPayload(run_id=run_id, model="tiny", item_ids=ids)

    first = worker.handle(payload)
    second = worker.handle(payload)
    worker.close()

    assert (first.claimed, first.drawn, second.claimed, pipeline.batches) == (3, 3, 0, [3])
    found = items(engine)
    assert {i.status for i in found} == {ItemStatus.SUCCEEDED}
    assert all(i.worker == "w@test" and i.device == "stand-in" for i in found)
    listed = worker.storage.client.list_objects_v2(Bucket=settings.s3_bucket)["Contents"]
    # only the images: completing the run (its manifest) is the reconciler's, not the worker's
    assert sorted(o["Key"] for o in listed) == sorted(i.object_key for i in found)
    assert all(i.object_key.startswith("render/SKU-") for i in found)  # "/" never reaches a key


def test_the_output_spec_of_an_item_shapes_its_object(
    engine: sa.Engine, settings: Settings
) -> None:
    """Format, thumbnail and labels come from the item: a WebP thumbnail with a label panel."""
    worker, _ = renderer(settings, engine, StandInPipeline("tiny"))
    spec = OutputSpec(format="webp", quality=70, max_side=24, labels=("first point",))
    run_id, ids = queued_run(engine, 1, spec)
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    worker.close()
    (item,) = items(engine)
    assert item.object_key.endswith("/main.webp")
    response = worker.storage.client.get_object(Bucket=settings.s3_bucket, Key=item.object_key)
    body = response["Body"].read()
    assert response["ContentType"] == "image/webp"
    opened = Image.open(io.BytesIO(body))
    assert opened.format == "WEBP" and max(opened.size) == 24
    assert opened.size[0] > opened.size[1]  # the panel widened the 32×16 image
    assert read_metadata(body)["seed"] == str(item.seed)


def test_the_next_batch_draws_while_the_previous_one_is_stored(
    engine: sa.Engine, settings: Settings
) -> None:
    """Encoding and upload happen on background threads: the upload of batch 1 is still
    running when batch 2 starts drawing, and every image still ends up stored."""
    uploads: list[tuple[str, float, float]] = []
    storage = Storage(settings)
    real_put = storage.put
    lock = threading.Lock()

    def slow_put(key: str, body: bytes, **kwargs: Any) -> None:
        started = time.perf_counter()
        time.sleep(0.3)
        real_put(key, body, **kwargs)
        with lock:
            uploads.append((key, started, time.perf_counter()))

    storage.put = slow_put  # type: ignore[method-assign]
    pipeline = StandInPipeline("tiny", sleep=0.2)
    worker, _ = renderer(settings, engine, pipeline, storage=storage)
    run_id, ids = queued_run(engine, 4)
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids[:2]))
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids[2:]))
    assert worker.busy()
    worker.close()
    assert not worker.busy()

    second_draw_start = [t for name, t in pipeline.events if name == "draw-start"][1]
    first_batch_uploads = [u for u in uploads if "/SKU-0~" in u[0] or "/SKU-1~" in u[0]]
    assert len(first_batch_uploads) == 2
    assert any(end > second_draw_start for _, _, end in first_batch_uploads)
    assert {i.status for i in items(engine)} == {ItemStatus.SUCCEEDED}


def test_out_of_memory_splits_the_batch_and_remembers_the_size(
    engine: sa.Engine, settings: Settings
) -> None:
    """On torch's out-of-memory error the cache is freed and the batch halved until it fits;
    later batches are drawn at that size straight away."""
    pipeline = OutOfMemoryPipeline("tiny", fits=2)
    worker, requeued = renderer(settings, engine, pipeline)
    run_id, ids = queued_run(engine, 10)
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids[:8]))
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids[8:]))
    worker.close()
    assert pipeline.batches == [2, 2, 2, 2, 2]  # 8 → 4 → 2, then 2 at once
    assert pipeline.freed == 2 and worker.batch_limit == 2
    assert {i.status for i in items(engine)} == {ItemStatus.SUCCEEDED} and not requeued


def test_a_device_that_cannot_draw_one_image_hands_its_items_back(
    engine: sa.Engine, settings: Settings
) -> None:
    """Out of memory even for one image is fatal for the device: the items go back to the
    queue at once without losing an attempt, and the outcome tells the task to stop."""
    worker, requeued = renderer(settings, engine, OutOfMemoryPipeline("tiny", fits=0))
    run_id, ids = queued_run(engine, 3)
    outcome = worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    assert isinstance(outcome.fatal, DeviceError)
    assert "out of memory" in str(outcome.fatal)
    found = items(engine)
    assert {i.status for i in found} == {ItemStatus.QUEUED}
    assert all(i.attempts == 1 and i.attempts_before_retry == 1 for i in found)
    assert [(sorted(p.item_ids), delay) for p, delay in requeued] == [(sorted(ids), 0.0)]


def test_a_batch_that_fails_to_draw_is_counted_and_retried_one_item_per_message(
    engine: sa.Engine, settings: Settings
) -> None:
    """A model error fails the batch's attempt: skufleet_worker_failed_batches_total counts
    it, and each item goes back to the queue in a message of its own."""
    worker, requeued = renderer(settings, engine, PoisonPipeline("tiny"))
    run_id, ids = queued_run(engine, 3, prompt=f"{POISON} {{i}}")
    failed_batches = "skufleet_worker_failed_batches_total"
    before = REGISTRY.get_sample_value(failed_batches) or 0.0
    outcome = worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    assert (outcome.claimed, outcome.drawn, outcome.fatal) == (3, 0, None)
    assert REGISTRY.get_sample_value(failed_batches) == before + 1
    assert {i.status for i in items(engine)} == {ItemStatus.QUEUED}
    assert sorted(p.item_ids for p, _ in requeued) == [[i] for i in sorted(ids)]


def test_a_flagged_image_is_recorded_and_never_uploaded(
    engine: sa.Engine, settings: Settings
) -> None:
    """The safety checker's verdict fails the item with flagged set; no object is written."""
    worker, requeued = renderer(settings, engine, FlaggingPipeline("tiny"))
    run_id, ids = queued_run(engine, 2, prompt=f"item {{i}} {FLAG}")
    worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    worker.close()
    found = items(engine)
    assert all(i.status is ItemStatus.FAILED and i.flagged and i.sha256 is None for i in found)
    assert "safety checker" in (found[0].last_error or "") and not requeued
    listed = worker.storage.client.list_objects_v2(Bucket=settings.s3_bucket)
    assert listed.get("Contents", []) == []


def test_a_message_for_another_model_is_refused(engine: sa.Engine, settings: Settings) -> None:
    """A worker never renders items with a model it did not load."""
    worker, _ = renderer(settings, engine, StandInPipeline("tiny"), bucket=False)
    run_id, ids = queued_run(engine, 1)
    outcome = worker.handle(RenderPayload(run_id=run_id, model="other", item_ids=ids))
    assert outcome.claimed == 0 and "model 'other'" in (outcome.refused or "")
    assert {i.status for i in items(engine)} == {ItemStatus.QUEUED}


def test_handoff_blocks_when_storage_falls_behind() -> None:
    """At most max_pending jobs wait; submitting more blocks until one finishes."""
    handoff = Handoff(threads=1, max_pending=2)
    release = threading.Event()
    handoff.submit(release.wait)
    handoff.submit(release.wait)
    third = threading.Thread(target=handoff.submit, args=(lambda: None,))
    third.start()
    third.join(0.3)
    assert third.is_alive() and handoff.pending == 2
    release.set()
    third.join(5)
    assert not third.is_alive()
    handoff.close()
    assert handoff.pending == 0
