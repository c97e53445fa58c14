"""Human review of a run's stored images: reviewers' decisions, and the review server.

- :func:`approve` and :func:`reject` record decisions in the ledger (``ledger.decide``); a
  reject puts the item back to pending and publishes the run's pending items, as ``skufleet
  retry`` does, so a worker draws it again with its next seed variant.
- :func:`serve` runs the review page (``skufleet review RUN``,
  :mod:`skufleet.producer.review_server`): a contact sheet of the run's stored images
  (succeeded and needs review), grouped by category then SKU, with every check's score,
  approve / reject buttons and keyboard shortcuts. Its rules are Flower's: without
  ``SKUFLEET_FLOWER_BASIC_AUTH`` it listens on the loopback address only; with it, every
  page, image and API call needs HTTP Basic, and decisions carry the login's user name.
- :func:`export` (:mod:`skufleet.producer.review_sheet`) writes the same page as one static,
  read-only file (``sheet.html``), the thumbnails embedded, the filters working offline.

Every text of the catalogue (SKU, title, prompt, category) reaches the page as JSON only,
escaped so that it cannot end its ``<script>`` element, and the page's script builds the
DOM with ``textContent``, never HTML strings; a Content-Security-Policy allows only the
page's own nonce-tagged script and style.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from skufleet.producer.bucket import Bucket
from skufleet.producer.enqueue import publish_pending
from skufleet.producer.flower import listen_credentials
from skufleet.producer.publish import Publisher
from skufleet.producer.review_sheet import export
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.names import render_queue
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, Review

__all__ = ["approve", "check_listen", "export", "item_state", "reject", "serve"]


# --- decisions ---------------------------------------------------------------------------


def _decide_all(
    conn: Connection,
    run_id: int,
    item_ids: Sequence[int],
    decision: ledger.Decision,
    reviewer: str,
    note: str,
) -> tuple[dict[int, str], list[int]]:
    """Decide on each item (once, in the order given): ``({id: new status}, skipped ids)``."""
    decided: dict[int, str] = {}
    skipped: list[int] = []
    for item_id in dict.fromkeys(item_ids):
        status = ledger.decide(conn, run_id, int(item_id), decision, reviewer, note)
        if status is None:
            skipped.append(int(item_id))
        else:
            decided[int(item_id)] = str(status)
    return decided, skipped


def reject(
    engine: Engine,
    publisher: Publisher,
    run_name: str,
    item_ids: Sequence[int],
    reviewer: str,
    queue_prefix: str,
    note: str = "",
) -> dict[str, Any]:
    """Reject items of a run in one transaction (each back to pending, to be drawn with its
    next seed variant), then publish the run's pending items as ``enqueue.retry`` does.

    Items without a stored image to decide on (rendering, pending, failed, or not of the
    run) are skipped, and nothing is recorded for them. Returns the counts: ``decided``,
    ``skipped`` (with ``skipped_ids``), ``enqueued`` and ``messages``, and ``statuses``
    (id → new status)."""
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, run_name)
        model, batch_size = ledger.run_settings(conn, run_id)
        decided, skipped = _decide_all(conn, run_id, item_ids, "rejected", reviewer, note)
    enqueued = messages = 0
    if decided:
        enqueued, messages = publish_pending(
            engine, publisher, run_id, model, render_queue(queue_prefix, model), batch_size
        )
    return {
        "run": run_name,
        "decision": "rejected",
        "reviewer": reviewer,
        "decided": len(decided),
        "skipped": len(skipped),
        "skipped_ids": skipped,
        "statuses": {str(k): v for k, v in decided.items()},
        "enqueued": enqueued,
        "messages": messages,
    }


def approve(
    engine: Engine, run_name: str, item_ids: Sequence[int], reviewer: str, note: str = ""
) -> dict[str, Any]:
    """Approve items of a run in one transaction: needs_review → succeeded (into the
    manifest); a succeeded item stays so, its approval recorded. Counts as :func:`reject`'s
    (nothing is published: ``enqueued`` and ``messages`` are 0)."""
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, run_name)
        decided, skipped = _decide_all(conn, run_id, item_ids, "approved", reviewer, note)
    return {
        "run": run_name,
        "decision": "approved",
        "reviewer": reviewer,
        "decided": len(decided),
        "skipped": len(skipped),
        "skipped_ids": skipped,
        "statuses": {str(k): v for k, v in decided.items()},
        "enqueued": 0,
        "messages": 0,
    }


def item_state(conn: Connection, run_id: int, item_id: int) -> dict[str, Any] | None:
    """An item's status and its latest decision (who, when), as the page updates a card."""
    row = conn.execute(
        sa.select(Item.status, Item.verdict, Item.sha256).where(
            Item.id == item_id, Item.run_id == run_id
        )
    ).first()
    if row is None:
        return None
    review = conn.execute(
        sa.select(Review.decision, Review.reviewer, Review.created_at)
        .where(Review.item_id == item_id)
        .order_by(Review.id.desc())
        .limit(1)
    ).first()
    return {
        "id": item_id,
        "status": str(row.status),
        "verdict": row.verdict,
        "sha256": row.sha256,
        "decision": None if review is None else review.decision,
        "reviewer": None if review is None else review.reviewer,
        "decided_at": None if review is None else review.created_at.isoformat(),
    }


def check_listen(settings: Settings, address: str) -> list[str]:
    """The basic-auth credentials (``user:password``), checked; ConfigError when there are
    none and ``address`` is not the loopback address (Flower's rule)."""
    return listen_credentials(settings, address, "the review server")


@contextlib.contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM stops the server as Ctrl-C does (in the main thread; elsewhere, nothing)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(
    settings: Settings,
    run_name: str,
    *,
    address: str,
    port: int,
    reviewer_default: str,
    announce: Callable[[str, bool], None] | None = None,
) -> None:
    """Serve the review page of ``run_name`` on ``address:port`` until SIGTERM or SIGINT.

    ``announce(url, authenticated)`` is called once it listens. Raises ConfigError for a
    malformed ``SKUFLEET_FLOWER_BASIC_AUTH``, for no credentials beyond the loopback address,
    for an unknown run or a port it cannot listen on.
    """
    from skufleet.producer.review_server import ReviewApp, ReviewServer

    credentials = check_listen(settings, address)
    engine = ledger.create_engine(settings.database_url)
    try:
        ledger.require_schema(engine)
        app = ReviewApp(
            engine,
            Bucket(settings),
            run_name,
            publisher=lambda: Publisher(settings),
            queue_prefix=settings.queue_prefix,
            reviewer_default=reviewer_default,
            credentials=credentials,
            loopback_only=not credentials,
        )
        app.connect()  # the broker answers now, or the command fails at once
        try:
            server = ReviewServer(app, (address, port))
        except OSError as exc:  # the port is taken, or the address is not this machine's
            raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
        if announce is not None:
            announce(server.url, bool(credentials))
        try:
            with _stopped_by_sigterm(), contextlib.suppress(KeyboardInterrupt):
                server.serve_forever(poll_interval=0.5)
        finally:
            server.server_close()
    finally:
        engine.dispose()
