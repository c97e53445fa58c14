"""The webhook: events kept in the ledger's outbox, signed, sent without following redirects,
with short timeouts, retried with backoff, and never a reason for the reconciler to stop."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import boto3
import pytest
import sqlalchemy as sa

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.publish import Publisher
from skufleet.producer.reconcile import reconcile
from skufleet.producer.services import LocalS3, free_port
from skufleet.schemas import ledger
from skufleet.schemas.errors import LedgerUnavailable
from skufleet.schemas.ledger import outbox
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Event, Item, ItemStatus, Run

SECRET = "webhook-secret-" + "x" * 16


class Receiver(ThreadingHTTPServer):
    """A downstream system on 127.0.0.1: records each request and answers ``status``."""

    def __init__(self, port: int = 0, status: int = 204, location: str | None = None) -> None:
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.status = status
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                server.requests.append((dict(self.headers.items()), body))
                self.send_response(server.status)
                if location is not None:
                    self.send_header("Location", location)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", port), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def url(self, path: str = "/hooks/skufleet") -> str:
        return f"http://127.0.0.1:{self.server_address[1]}{path}"

    def bodies(self) -> list[dict[str, Any]]:
        return [json.loads(body) for _, body in self.requests]

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def settings_for(redis_url: str, webhook_url: str, secret: str | None = SECRET) -> Settings:
    return Settings(
        redis_url=redis_url,
        queue_prefix=f"test-{secrets.token_hex(6)}",
        webhook_url=webhook_url,
        webhook_secret=secret,
    )


def aware(moment: datetime) -> datetime:
    """SQLite gives datetimes back without their zone; the ledger writes UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def one_pass(engine: sa.Engine, settings: Settings) -> tuple[Any, float]:
    """One reconciler pass: its report and how many seconds it took."""
    started = time.monotonic()
    with Publisher(settings) as publisher:
        report = reconcile(engine, publisher, settings)
    return report, time.monotonic() - started


def events(engine: sa.Engine) -> list[Any]:
    with engine.connect() as conn:
        return list(conn.execute(sa.select(Event).order_by(Event.id)).all())


def wait_out_backoff(engine: sa.Engine) -> None:
    """As if the backoff had passed: every undelivered event is due now."""
    with engine.begin() as conn:
        conn.execute(
            sa.update(Event).values(next_attempt_at=ledger.utcnow() - timedelta(seconds=1))
        )


def finished_run(engine: sa.Engine, name: str) -> int:
    """A run with one succeeded item and no open one, not yet marked completed."""
    now = ledger.utcnow()
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, name, "tiny", 1, "ecommerce", {})
        conn.execute(
            sa.insert(Item).values(
                run_id=run_id,
                sku="MUG-1",
                shot="front",
                prompt="a red mug",
                seed=1,
                width=64,
                height=64,
                steps=2,
                guidance_scale=7.5,
                status=ItemStatus.SUCCEEDED,
                attempts=1,
                object_key=f"{name}/MUG-1/front.png",
                byte_size=3,
                sha256="0" * 64,
                finished_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    return run_id


def test_a_completed_run_posts_one_event_signed_over_its_exact_body(
    engine: sa.Engine, redis_url: str, s3: LocalS3, receiver: Receiver
) -> None:
    """Completing a run records a run.completed event and sends it at once: the body has the
    totals, bucket, manifest and event id, the id is also in X-Skufleet-Event-Id, and
    X-Skufleet-Signature is sha256=HMAC-SHA256(secret, body) of the bytes received."""
    bucket_name = f"test-{secrets.token_hex(6)}"
    s3.client().create_bucket(Bucket=bucket_name)
    settings = settings_for(redis_url, receiver.url()).model_copy(
        update={"s3_endpoint_url": s3.endpoint_url, "s3_bucket": bucket_name}
    )
    session = boto3.Session(aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    run_id = finished_run(engine, "spring")

    assert downstream.complete(settings, engine, Bucket(settings, session), run_id)

    assert len(receiver.requests) == 1
    headers, body = receiver.requests[0]
    expected = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    assert headers["X-Skufleet-Signature"] == f"sha256={expected}"
    wrong = hmac.new(b"another secret", body, hashlib.sha256).hexdigest()
    assert headers["X-Skufleet-Signature"] != f"sha256={wrong}"
    event = json.loads(body)
    assert headers["X-Skufleet-Event-Id"] == event["id"]
    assert (event["event"], event["run"], event["counts"]["succeeded"]) == (
        "run.completed",
        "spring",
        1,
    )
    assert (event["bucket"], event["manifest"], event["attempts"]) == (
        bucket_name,
        "spring/manifest.jsonl",
        1,
    )
    # the quality gate's figures: nothing waits for review, nothing was re-rolled
    assert (event["needs_review"], event["rerolls"], event["usable_ratio"]) == (0, 0, 1.0)
    assert event["counts"]["needs_review"] == 0
    (row,) = events(engine)
    assert (row.event_id, row.run_id, row.attempts) == (event["id"], run_id, 1)
    assert row.delivered_at is not None and row.last_error is None


def test_without_a_secret_events_go_unsigned_with_one_warning(
    engine: sa.Engine, redis_url: str, receiver: Receiver, caplog: pytest.LogCaptureFixture
) -> None:
    """No SKUFLEET_WEBHOOK_SECRET: events are sent without a signature and the missing
    secret is logged once, not once per event."""
    settings = settings_for(redis_url, receiver.url(), secret=None)
    downstream._warn_unsigned.cache_clear()  # another test may have used this port
    with caplog.at_level(logging.WARNING, logger="skufleet.producer.downstream"):
        for _ in range(2):
            outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
            assert downstream.deliver_due(settings, engine).delivered == 1
    assert len(receiver.requests) == 2
    assert all("X-Skufleet-Signature" not in headers for headers, _ in receiver.requests)
    assert sum("SKUFLEET_WEBHOOK_SECRET" in r.getMessage() for r in caplog.records) == 1


def test_a_redirect_is_not_followed_and_counts_as_a_failure(
    engine: sa.Engine, redis_url: str, receiver: Receiver
) -> None:
    """A webhook answering 302 gets the event once; the redirect's target gets nothing and
    the event stays undelivered, with the reason, for a later attempt."""
    redirecting = Receiver(status=302, location=receiver.url("/elsewhere"))
    try:
        settings = settings_for(redis_url, redirecting.url())
        outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
        report, _ = one_pass(engine, settings)
    finally:
        redirecting.stop()
    assert len(redirecting.requests) == 1
    assert receiver.requests == []
    assert (report.delivered, report.undelivered) == (0, 1)
    (row,) = events(engine)
    assert row.delivered_at is None and "redirect" in row.last_error


@pytest.mark.parametrize("outage", ["down", "answers 500"])
def test_an_event_the_webhook_missed_is_delivered_exactly_once_by_a_later_pass(
    engine: sa.Engine, redis_url: str, outage: str
) -> None:
    """A webhook that is down or answers 500 leaves the event undelivered, with its error and
    a later next attempt; passes before the backoff send nothing; the first pass after it,
    with the webhook back, delivers the event once, and no pass sends it again."""
    port = free_port()
    failing = Receiver(port, status=500) if outage == "answers 500" else None
    settings = settings_for(redis_url, f"http://127.0.0.1:{port}/hook")
    outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
    before = ledger.utcnow()
    try:
        report, _ = one_pass(engine, settings)
    finally:
        if failing is not None:
            failing.stop()
    assert (report.delivered, report.undelivered) == (0, 1)
    (row,) = events(engine)
    assert row.delivered_at is None and row.last_error
    assert aware(row.next_attempt_at) > before

    back = Receiver(port)
    try:
        assert one_pass(engine, settings)[0].delivered == 0  # still backing off
        wait_out_backoff(engine)
        assert one_pass(engine, settings)[0].delivered == 1
        wait_out_backoff(engine)
        assert one_pass(engine, settings)[0].delivered == 0
    finally:
        back.stop()
    assert len(back.requests) == 1
    (row,) = events(engine)
    assert row.delivered_at is not None and row.attempts == 2


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1/hook",
        "file:///etc/passwd",
        "http:///no-host",
        "http://127.0.0.1:port/hook",
        "http://127.0.0.1/hook\r\nX-Injected: 1",
        "not a url at all",
    ],
)
def test_a_malformed_or_unsupported_webhook_url_never_raises_out_of_a_pass(
    engine: sa.Engine, redis_url: str, url: str
) -> None:
    """A webhook URL that is not http(s) with a host and port (one that got past the settings'
    own check) fails the delivery, with the reason kept on the event, and the reconciler's
    pass completes."""
    outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
    unchecked = settings_for(redis_url, "http://127.0.0.1/").model_copy(update={"webhook_url": url})
    report, _ = one_pass(engine, unchecked)
    assert (report.delivered, report.undelivered) == (0, 1)
    (row,) = events(engine)
    assert row.delivered_at is None and row.last_error


def test_a_webhook_that_never_answers_costs_a_pass_a_few_seconds(
    engine: sa.Engine, redis_url: str
) -> None:
    """A webhook that accepts the connection and never answers times out in seconds: the
    pass returns, the event is kept for later with the timeout as its error."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)  # connections complete in the kernel, and nobody ever reads them
        settings = settings_for(redis_url, f"http://127.0.0.1:{silent.getsockname()[1]}/")
        for _ in range(3):
            outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
        report, seconds = one_pass(engine, settings)
    assert seconds < 3 * downstream.WEBHOOK_TIMEOUT  # one delivery tried, not three
    assert (report.delivered, report.undelivered) == (0, 1)
    rows = events(engine)
    assert all(row.delivered_at is None for row in rows)
    assert "timed out" in rows[0].last_error


def test_logs_and_errors_show_the_webhook_as_scheme_and_host_only(
    engine: sa.Engine, redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The webhook URL's path and query (where tokens live) appear in no log line and in
    no stored error; scheme://host:port does."""
    failing = Receiver(status=500)
    try:
        url = failing.url("/hooks/PATH-TOKEN") + "?key=QUERY-TOKEN"
        outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
        with caplog.at_level(logging.INFO):
            report, _ = one_pass(engine, settings_for(redis_url, url))
    finally:
        failing.stop()
    assert report.undelivered == 1
    assert f"http://127.0.0.1:{failing.server_address[1]}" in caplog.text
    (row,) = events(engine)
    for text in (caplog.text, row.last_error):
        assert "PATH-TOKEN" not in text and "QUERY-TOKEN" not in text


def test_an_event_is_claimed_by_one_deliverer_at_a_time(engine: sa.Engine) -> None:
    """Two deliverers asking for due events at once never get the same one: a claimed event
    is due again only after its delivery failed and its backoff passed."""
    event_id = outbox.record(engine, None, outbox.RUN_COMPLETED, {"run": "r"})
    first = outbox.claim_due(engine)
    assert [e.event_id for e in first] == [event_id] and first[0].attempts == 1
    assert outbox.claim_due(engine) == []
    retry_at = outbox.mark_failed(engine, event_id, "answered 503")
    assert retry_at is not None and retry_at > ledger.utcnow() + timedelta(seconds=20)
    assert outbox.claim_due(engine) == []
    assert [e.event_id for e in outbox.claim_due(engine, now=retry_at)] == [event_id]
    assert outbox.mark_delivered(engine, event_id)
    assert not outbox.mark_delivered(engine, event_id)
    assert outbox.claim_due(engine, now=retry_at + timedelta(days=1)) == []


def test_retries_back_off_from_30_seconds_doubling_up_to_an_hour() -> None:
    """The wait after n failed deliveries: 30 s, 60 s, 120 s, …, never more than an hour."""
    waits = [outbox.backoff(n).total_seconds() for n in range(1, 12)]
    assert waits[:4] == [30, 60, 120, 240]
    assert max(waits) == 3600 and waits[-1] == 3600
    assert outbox.backoff(10_000) == timedelta(hours=1)


def test_the_run_is_reopened_when_its_event_cannot_be_recorded(
    engine: sa.Engine, redis_url: str, s3: LocalS3, receiver: Receiver
) -> None:
    """If the ledger refuses the run's event, the run is not left completed without one: it
    is reopened, so the reconciler completes it (and records the event) later."""
    bucket_name = f"test-{secrets.token_hex(6)}"
    s3.client().create_bucket(Bucket=bucket_name)
    settings = settings_for(redis_url, receiver.url()).model_copy(
        update={"s3_endpoint_url": s3.endpoint_url, "s3_bucket": bucket_name}
    )
    session = boto3.Session(aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    run_id = finished_run(engine, "autumn")
    with engine.begin() as conn:
        conn.execute(sa.text("DROP TABLE events"))
    with pytest.raises(LedgerUnavailable, match="events"):
        downstream.complete(settings, engine, Bucket(settings, session), run_id)
    with engine.connect() as conn:
        assert conn.execute(sa.select(Run.completed_at).where(Run.id == run_id)).scalar() is None
    assert receiver.requests == []
