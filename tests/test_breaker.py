"""Outages pause the renderer instead of failing items: real ledger, real S3 behind a
forwarder that can take either down (tests/faults/outage.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import sqlalchemy as sa

from skufleet.producer.db import upgrade
from skufleet.producer.services import LocalS3
from skufleet.schemas import ledger
from skufleet.schemas.params import RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import ItemStatus
from skufleet.worker.breaker import Breaker
from skufleet.worker.storage import Storage
from tests.faults.outage import Outage
from tests.fixtures.pipelines import StandInPipeline
from tests.test_render import in_thread, items, queued_run, renderer
from tests.test_render import settings as settings

# the renderer's behaviour does not depend on the database: it runs on the production one
pytestmark = pytest.mark.postgresql_only


def until(check: Callable[[], bool], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.fixture
def storage_outage(s3: LocalS3) -> Iterator[Outage]:
    with Outage(s3.port) as outage:
        yield outage


def through(settings: Settings, outage: Outage) -> Storage:
    return Storage(
        settings.model_copy(
            update={"s3_endpoint_url": f"http://127.0.0.1:{outage.port}", "s3_max_attempts": 1}
        )
    )


def test_a_breaker_opens_on_failure_and_closes_when_the_probe_answers() -> None:
    """One trip opens it; waiters block until a probe succeeds, then all go on."""
    answers = iter([False, False, True])

    def probe() -> None:
        if not next(answers):
            raise ConnectionError("refused")

    breaker = Breaker("thing", probe, first_delay=0.05, max_delay=0.1)
    breaker.trip(ConnectionError("refused"))
    assert breaker.is_open and not breaker.wait(timeout=0.01)
    assert breaker.wait(timeout=5) and not breaker.is_open
    breaker.trip(ConnectionError("again"))
    breaker.stop()
    assert breaker.wait(timeout=5) is False  # stopping releases waiters, still open


def test_drawn_images_wait_out_a_storage_outage_and_are_stored_once(
    engine: sa.Engine, settings: Settings, storage_outage: Outage
) -> None:
    """With the bucket unreachable, drawn items stay running (no attempt spent, no failure)
    and are stored as soon as it answers; nothing is drawn again."""
    storage = through(settings, storage_outage)
    storage.ensure_bucket()
    pipeline = StandInPipeline("tiny")
    worker, requeued = renderer(settings, engine, pipeline, storage=storage)
    run_id, ids = queued_run(engine, 3)
    storage_outage.down()
    task, returned = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    until(lambda: worker.services.storage_breaker.is_open)
    time.sleep(1)
    assert {i.status for i in items(engine)} == {ItemStatus.RUNNING}
    assert task.is_alive()  # the task ends only once its batch is stored
    storage_outage.up()
    task.join(30)
    assert {i.status for i in items(engine)} == {ItemStatus.SUCCEEDED}
    worker.close()
    assert [i.attempts for i in items(engine)] == [1, 1, 1]
    assert pipeline.batches == [3] and requeued == []
    assert returned[0][0].problem() is None


def test_a_worker_stopped_during_a_storage_outage_hands_its_items_back(
    engine: sa.Engine, settings: Settings, storage_outage: Outage
) -> None:
    """Shutting down while storage is away does not wait for it: the items go back to
    queued, their attempt not counted against the cap, and are republished."""
    storage = through(settings, storage_outage)
    storage.ensure_bucket()
    worker, requeued = renderer(settings, engine, StandInPipeline("tiny"), storage=storage)
    run_id, ids = queued_run(engine, 2)
    storage_outage.down()
    task, returned = in_thread(worker, RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    until(lambda: worker.services.storage_breaker.is_open)
    worker.close()
    task.join(30)
    found = items(engine)
    assert {i.status for i in found} == {ItemStatus.QUEUED}
    assert all(i.attempts - i.attempts_before_retry == 0 for i in found)
    assert sorted(i for payload, _ in requeued for i in payload.item_ids) == sorted(ids)
    assert requeued.labels == ["render · main · SKU/0, SKU/1 (2 items) · handed back"]
    assert (returned[0][0].problem() or "").startswith("2 of 2 items not stored (2 handed back)")


@pytest.fixture
def refusing_s3() -> Iterator[str]:
    """An S3 endpoint that answers every PUT ``400 InvalidArgument`` (a request it refuses,
    not an outage) and every other request 200."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_PUT(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = b"<Error><Code>InvalidArgument</Code><Message>refused</Message></Error>"
            self.send_response(400)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_an_upload_the_bucket_refuses_is_the_items_error(
    engine: sa.Engine, settings: Settings, refusing_s3: str
) -> None:
    """A 4xx about the request itself is not an outage: the item goes back to queued with
    the error recorded and its attempt counted, and the worker does not pause."""
    storage = Storage(
        settings.model_copy(update={"s3_endpoint_url": refusing_s3, "s3_max_attempts": 1})
    )
    worker, requeued = renderer(
        settings, engine, StandInPipeline("tiny"), bucket=False, storage=storage
    )
    run_id, ids = queued_run(engine, 2)
    outcome = worker.handle(RenderPayload(run_id=run_id, model="tiny", item_ids=ids))
    worker.close()
    found = items(engine)
    assert {i.status for i in found} == {ItemStatus.QUEUED}
    assert "2 retried after an error" in (outcome.problem() or "")
    assert all("StorageRefused" in (i.last_error or "") for i in found)
    assert all(i.attempts - i.attempts_before_retry == 1 for i in found)
    assert not worker.services.storage_breaker.trips
    assert sorted(p.item_ids[0] for p, _ in requeued) == sorted(ids)


def test_a_ledger_outage_while_storing_pauses_and_records_the_image_once(
    database_url: str, settings: Settings
) -> None:
    """The database goes away while a batch draws: the finished images wait, and once it
    answers they are uploaded and recorded, each with its first attempt."""
    direct = ledger.create_engine(database_url)
    upgrade(direct)
    with Outage(sa.make_url(database_url).port or 5432) as database:
        proxied = ledger.create_engine(
            sa.make_url(database_url)
            .set(host="127.0.0.1", port=database.port)
            .render_as_string(hide_password=False)
        )
        worker, _ = renderer(settings, proxied, StandInPipeline("tiny", sleep=1.5))
        run_id, ids = queued_run(direct, 2)
        drawing = threading.Thread(
            target=worker.handle, args=(RenderPayload(run_id=run_id, model="tiny", item_ids=ids),)
        )
        drawing.start()
        until(lambda: {i.status for i in items(direct)} == {ItemStatus.RUNNING})
        database.down()
        until(lambda: worker.services.ledger_breaker.is_open)
        time.sleep(1)
        database.up()
        drawing.join(30)
        assert {i.status for i in items(direct)} == {ItemStatus.SUCCEEDED}
        worker.close()
        proxied.dispose()
    assert [i.attempts for i in items(direct)] == [1, 1]
    direct.dispose()
