"""The renderer, called directly: claim, draw, store, record, against a real ledger and S3."""

from __future__ import annotations

import io
import threading
import time
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from prometheus_client import REGISTRY
from sqlalchemy.orm import Session

from skufleet.schemas import ledger
from skufleet.schemas.errors import DeviceError, Stopping
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, ItemStatus
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
def settings(worker_settings: Settings) -> Settings:
    return worker_settings


class Requeued(list[tuple[RenderPayload, float]]):
    """Collects what the renderer republishes, instead of a broker."""

    def __init__(self) -> None:
        super().__init__()
        self.labels: list[str] = []

    def __call__(self, payload: RenderPayload, countdown: float, label: str) -> None:
        self.append((payload, countdown))
        self.labels.append(label)


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


def in_thread(worker: Renderer, payload: RenderPayload) -> tuple[threading.Thread, list[Any]]:
    """``worker.handle(payload)`` on a thread of its own, as a Celery task thread runs it:
    the thread, and a list that gets ``(outcome, time it returned)``."""
    returned: list[Any] = []

    def run() -> None:
        outcome = worker.handle(payload)
        returned.append((outcome, time.perf_counter()))

    thread = threading.Thread(target=run)
    thread.start()
    return thread, returned


def wait_for(check: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_next_batch_draws_while_the_previous_one_is_stored(
    engine: sa.Engine, settings: Settings
) -> None:
    """Two task threads share the device: the second draws while the first stores (its
    uploads are still running when the second draw starts), draws never overlap, and each
    task returns only after its own images are uploaded and recorded."""
    uploads: dict[str, float] = {}
    storage = Storage(settings)
    real_put = storage.put
    lock = threading.Lock()

    def slow_put(key: str, body: bytes, **kwargs: Any) -> None:
        time.sleep(0.5)
        real_put(key, body, **kwargs)
        with lock:
            uploads[key] = time.perf_counter()

    storage.put = slow_put  # type: ignore[method-assign]
    pipeline = StandInPipeline("tiny", sleep=0.3)
    worker, _ = renderer(settings, engine, pipeline, storage=storage)
    run_id, ids = queued_run(engine, 4)
    first, first_returned = in_thread(
        worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[:2])
    )
    wait_for(lambda: pipeline.events)  # the first task holds the device
    second, second_returned = in_thread(
        worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[2:])
    )
    wait_for(lambda: worker.busy())
    first.join(30)
    second.join(30)
    worker.close()
    assert not worker.busy()

    starts = [t for name, t in pipeline.events if name == "draw-start"]
    ends = [t for name, t in pipeline.events if name == "draw-end"]
    assert len(starts) == 2 and ends[0] <= starts[1]  # one draw at a time
    found = items(engine)
    keys = {i.id: i.object_key for i in found}
    first_uploads = [uploads[keys[i]] for i in ids[:2]]
    second_uploads = [uploads[keys[i]] for i in ids[2:]]
    assert any(end > starts[1] for end in first_uploads)  # stored while the next one drew
    (outcome, returned), (second_outcome, second_at) = first_returned[0], second_returned[0]
    assert returned >= max(first_uploads) and second_at >= max(second_uploads)
    assert (outcome.stored, outcome.problem()) == (2, None)
    assert (second_outcome.stored, second_outcome.problem()) == (2, None)
    assert {i.status for i in found} == {ItemStatus.SUCCEEDED}


def test_a_task_waiting_for_the_device_claims_nothing_until_it_holds_it(
    engine: sa.Engine, settings: Settings
) -> None:
    """While one task draws, the other's items stay queued: claiming starts a lease, so it
    waits for the device and no lease ticks while a message waits."""
    pipeline = StandInPipeline("tiny", sleep=1.5)
    worker, _ = renderer(settings, engine, pipeline)
    run_id, ids = queued_run(engine, 4)
    first, _ = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[:2]))
    wait_for(lambda: pipeline.events)
    second, _ = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[2:]))
    time.sleep(0.5)
    assert pipeline.events[-1][0] == "draw-start"  # the first batch is still drawing
    waiting = [i for i in items(engine) if i.id in ids[2:]]
    assert {i.status for i in waiting} == {ItemStatus.QUEUED}
    assert all(i.lease_expires_at is None and i.attempts == 0 for i in waiting)
    first.join(30)
    second.join(30)
    worker.close()
    assert {i.status for i in items(engine)} == {ItemStatus.SUCCEEDED}


def test_a_retried_item_draws_only_once_no_other_batch_is_being_stored(
    engine: sa.Engine, settings: Settings
) -> None:
    """An item on its second attempt may be what killed a worker: it waits for the batch
    being stored before it draws, so a crash would cost no other item an attempt."""
    uploads: dict[str, float] = {}
    storage = Storage(settings)
    real_put = storage.put

    def slow_put(key: str, body: bytes, **kwargs: Any) -> None:
        time.sleep(0.5)
        real_put(key, body, **kwargs)
        uploads[key] = time.perf_counter()

    storage.put = slow_put  # type: ignore[method-assign]
    pipeline = StandInPipeline("tiny")
    worker, _ = renderer(settings, engine, pipeline, storage=storage)
    run_id, ids = queued_run(engine, 3)
    with engine.begin() as conn:  # the third item crashed a worker once already
        conn.execute(sa.update(Item).where(Item.id == ids[2]).values(attempts=1))
    first, _ = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[:2]))
    wait_for(lambda: any(name == "draw-end" for name, _ in pipeline.events))
    second, _ = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids[2:]))
    first.join(30)
    second.join(30)
    worker.close()
    keys = {i.id: i.object_key for i in items(engine)}
    retry_draw = [t for name, t in pipeline.events if name == "draw-start"][1]
    assert retry_draw >= max(uploads[keys[i]] for i in ids[:2])
    assert {i.status for i in items(engine)} == {ItemStatus.SUCCEEDED}


def test_a_message_whose_items_are_all_done_has_nothing_to_do(
    engine: sa.Engine, settings: Settings
) -> None:
    """A duplicate of a stored message claims nothing: no problem, the task succeeds."""
    worker, _ = renderer(settings, engine, StandInPipeline("tiny"))
    run_id, ids = queued_run(engine, 2)
    payload = RenderPayload(run_id=run_id, model="tiny", item_ids=ids)
    assert worker.handle(payload).problem() is None
    again = worker.handle(payload)
    worker.close()
    assert (again.claimed, again.stored, again.problem()) == (0, 0, None)


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
    assert requeued.labels == ["render · main · SKU/0, SKU/1, SKU/2 (3 items) · device failure"]
    problem = outcome.problem() or ""
    assert problem.startswith("3 of 3 items not stored (3 handed back); device out of rotation")
    assert "out of memory" in problem
    # a task that was waiting for the device gives its message back, claiming nothing
    with pytest.raises(Stopping, match="out of rotation"):
        worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    assert {i.attempts for i in items(engine)} == {1}


def test_a_batch_that_fails_to_draw_is_counted_and_retried_one_item_per_message(
    engine: sa.Engine, settings: Settings
) -> None:
    """A model error fails the batch's attempt: skufleet_worker_failed_batches_total counts
    it, and each item goes back to the queue in a message of its own."""
    worker, requeued = renderer(settings, engine, PoisonPipeline("tiny"))
    run_id, ids = queued_run(engine, 3, prompt=f"{POISON} {{i}}")
    failed_batches = "skufleet_worker_failed_batches_total"
    cpu = {"device": "cpu"}  # the label of a worker that serves no metrics
    before = REGISTRY.get_sample_value(failed_batches, cpu) or 0.0
    outcome = worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    assert (outcome.claimed, outcome.drawn, outcome.fatal) == (3, 0, None)
    assert REGISTRY.get_sample_value(failed_batches, cpu) == before + 1
    assert {i.status for i in items(engine)} == {ItemStatus.QUEUED}
    assert sorted(p.item_ids for p, _ in requeued) == [[i] for i in sorted(ids)]
    # each retry shows its item and the attempt it will be; the task says why it failed
    assert sorted(requeued.labels) == [
        f"render · main · SKU/{i} (1 item) · retry, attempt 2 of 2" for i in range(3)
    ]
    assert outcome.problem() == (
        "3 of 3 items not stored (3 retried after an error); first: SKU/0 (main): "
        f"RuntimeError: poisoned prompt: '{POISON} 0'"
    )


def test_a_flagged_image_is_recorded_and_never_uploaded(
    engine: sa.Engine, settings: Settings
) -> None:
    """The safety checker's verdict fails the item with flagged set; no object is written."""
    worker, requeued = renderer(settings, engine, FlaggingPipeline("tiny"))
    run_id, ids = queued_run(engine, 2, prompt=f"item {{i}} {FLAG}")
    outcome = worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    worker.close()
    found = items(engine)
    assert all(i.status is ItemStatus.FAILED and i.flagged and i.sha256 is None for i in found)
    assert "safety checker" in (found[0].last_error or "") and not requeued
    assert outcome.problem() == (
        "2 of 2 items not stored (2 failed for good); first: SKU/0 (main): "
        "flagged by the safety checker"
    )
    listed = worker.storage.client.list_objects_v2(Bucket=settings.s3_bucket)
    assert listed.get("Contents", []) == []


def test_a_message_for_another_model_is_refused(engine: sa.Engine, settings: Settings) -> None:
    """A worker never renders items with a model it did not load."""
    worker, _ = renderer(settings, engine, StandInPipeline("tiny"), bucket=False)
    run_id, ids = queued_run(engine, 1)
    outcome = worker.handle(RenderPayload(run_id=run_id, model="other", item_ids=ids))
    assert outcome.claimed == 0 and "model 'other'" in (outcome.refused or "")
    assert (outcome.problem() or "").startswith("message refused: message for model 'other'")
    assert {i.status for i in items(engine)} == {ItemStatus.QUEUED}
