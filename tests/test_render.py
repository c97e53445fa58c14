"""The renderer, called directly: claim, draw, upload, record, against a real ledger and S3."""

from __future__ import annotations

import secrets

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from producer.services import LocalS3, free_port
from schemas import ledger
from schemas.errors import ItemError
from schemas.params import GenerationParams, RenderPayload
from schemas.settings import Settings
from schemas.tables import Item, ItemStatus
from tests.fixtures.pipelines import StandInPipeline
from worker.render import Renderer
from worker.storage import Storage


@pytest.fixture
def settings(s3: LocalS3, monkeypatch: pytest.MonkeyPatch) -> Settings:
    for key, value in s3.env().items():
        monkeypatch.setenv(key, value)
    return Settings(
        s3_endpoint_url=s3.endpoint_url, s3_bucket=f"t-{secrets.token_hex(6)}", max_attempts=2
    )


def queued_run(engine: sa.Engine, n: int) -> tuple[int, list[int]]:
    params = GenerationParams(width=32, height=16).model_dump()
    rows = [
        {
            "sku": f"SKU/{i}",
            "shot": "main",
            "prompt": f"p{i}",
            "negative_prompt": "n",
            "seed": 100 + i,
            **params,
        }
        for i in range(n)
    ]
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, "render", "tiny", 0, "ecommerce", {})
        staging = ledger.ItemStaging(conn)
        staging.add(rows)
        staging.merge(run_id)
    ids = [i for chunk in ledger.queue_pending(engine, run_id, 100) for b in chunk for i in b]
    return run_id, ids


def test_a_message_is_rendered_once_and_a_duplicate_is_skipped(
    engine: sa.Engine, settings: Settings
) -> None:
    """A second delivery of the same message renders nothing and uploads nothing."""
    storage = Storage(settings)
    storage.ensure_bucket()
    pipeline = StandInPipeline("tiny")
    renderer = Renderer(settings, engine, pipeline, storage, "w@test")
    run_id, ids = queued_run(engine, 3)
    payload = RenderPayload(run_id=run_id, model="tiny", item_ids=ids)

    first = renderer.handle(payload)
    second = renderer.handle(payload)

    assert sorted(first.succeeded) == sorted(ids)
    assert (second.claimed, second.succeeded, pipeline.batches) == (0, [], 1)
    with Session(engine) as session:
        items = session.scalars(sa.select(Item)).all()
    assert {i.status for i in items} == {ItemStatus.SUCCEEDED}
    assert all(i.worker == "w@test" and i.device == "stand-in" for i in items)
    listed = storage.client.list_objects_v2(Bucket=settings.s3_bucket)["Contents"]
    assert sorted(o["Key"] for o in listed) == sorted(i.object_key for i in items)
    assert all(i.object_key.startswith("render/SKU-") for i in items)  # "/" never reaches a key


def test_an_unreachable_bucket_requeues_the_items_with_the_error(
    engine: sa.Engine, settings: Settings
) -> None:
    """Upload failures are retryable: items go back to queued with the reason recorded."""
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens: every PUT is refused
    storage = Storage(settings.model_copy(update={"s3_endpoint_url": closed, "s3_max_attempts": 1}))
    renderer = Renderer(settings, engine, StandInPipeline("tiny"), storage, "w@test")
    run_id, ids = queued_run(engine, 2)
    outcome = renderer.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    assert sorted(outcome.retry) == sorted(ids)
    with Session(engine) as session:
        items = session.scalars(sa.select(Item)).all()
    assert {i.status for i in items} == {ItemStatus.QUEUED}
    assert all("StorageUnavailable" in (i.last_error or "") for i in items)


def test_a_message_for_another_model_is_refused(engine: sa.Engine, settings: Settings) -> None:
    """A worker never renders items with a model it did not load."""
    renderer = Renderer(settings, engine, StandInPipeline("tiny"), Storage(settings), "w")
    run_id, ids = queued_run(engine, 1)
    with pytest.raises(ItemError, match="model 'other'"):
        renderer.handle(RenderPayload(run_id=run_id, model="other", item_ids=ids))
