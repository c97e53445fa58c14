"""What downstream systems get: the manifest in the bucket, presigned URLs, a webhook.

When a run's last open item is done, the reconciler (the caller that wins
``ledger.complete_run``) calls :func:`complete`: the manifest goes to the bucket, one line
per succeeded item in ``<run>/manifest.jsonl`` (items waiting for review are in none until
approved) and its summary in ``<run>/manifest.json`` (``schemas.ledger.manifest``), and,
with a webhook configured, an event with the counts, needs_review and re-rolls included,
goes into the ledger's outbox (``schemas.ledger.outbox``) and is sent at once:
``run.completed`` the first time, ``run.updated`` when the run completes again with another
manifest or other counts (items retried, changed, added or retired), none when nothing
changed (a reviewer's approval changes both: the item joins the manifest).

Delivery is one POST of the event's JSON body, ``http`` or ``https`` only, redirects not
followed, :data:`WEBHOOK_TIMEOUT` seconds to connect and to answer, signed with
``X-Skufleet-Signature: sha256=<HMAC-SHA256 of the body with SKUFLEET_WEBHOOK_SECRET>`` and
carrying ``X-Skufleet-Event-Id`` (also ``"id"`` in the body) for the receiver to
deduplicate. An event the webhook did not take with a 2xx is tried again by every reconciler
pass once its backoff has passed (30 s, doubling, at most 1 h). Logs show the webhook as
``scheme://host:port/…`` only (``schemas.redact``): its path and query often hold a token.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import http.client
import json
import logging
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from sqlalchemy.engine import Engine

from skufleet.producer.bucket import Bucket
from skufleet.schemas import ledger
from skufleet.schemas.errors import LedgerUnavailable, StorageRefused, StorageUnavailable
from skufleet.schemas.key import check_run_name
from skufleet.schemas.ledger import outbox
from skufleet.schemas.ledger.manifest import SCHEMA_VERSION
from skufleet.schemas.ledger.transitions import OPEN
from skufleet.schemas.redact import redact_text, redact_url
from skufleet.schemas.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
SUMMARY = "manifest.json"
PRUNE_CHUNK = 1000
"""Objects deleted per request (S3's DeleteObjects takes at most 1,000)."""


def manifest_key(run: str) -> str:
    return f"{check_run_name(run)}/{MANIFEST}"


def summary_key(run: str) -> str:
    return f"{check_run_name(run)}/{SUMMARY}"


@dataclass(frozen=True)
class Published:
    """A manifest written to the bucket: its summary (``<run>/manifest.json``) and the
    digest of what it says (its lines and counts), which tells one completion from the
    next."""

    summary: dict[str, Any]
    digest: str

    @property
    def key(self) -> str:
        return str(self.summary["manifest"])

    @property
    def items(self) -> int:
        return int(self.summary["items"])


def publish_manifest(engine: Engine, bucket: Bucket, run: str) -> Published:
    """Upload the run's manifest: ``manifest.jsonl``, one JSON line per succeeded item, then
    ``manifest.json``, its summary: ``{"schema_version", "run", "complete", "counts",
    "items", "manifest", "bytes", "sha256", "generated_at"}``.

    The counts are read first: ``complete`` is true when they show no open item (nothing
    pending, queued or running; an item waiting for review is not open), and then only an
    enqueue, a retry or a review can change the run, which makes it complete again later
    with a new manifest. ``items``, ``bytes`` and
    ``sha256`` are those of the lines uploaded.
    """
    with ledger.connect(engine) as conn:
        counts = ledger.run_status(conn, run).counts
    items = 0
    lines_digest = hashlib.sha256()

    def lines() -> Iterator[str]:
        nonlocal items
        with ledger.connect(engine) as conn:
            for record in ledger.manifest(conn, run):
                items += 1
                line = json.dumps(record, ensure_ascii=False) + "\n"
                lines_digest.update(line.encode("utf-8"))
                yield line

    key = manifest_key(run)
    size = bucket.put_lines(key, lines(), "application/x-ndjson")
    summary = {
        "schema_version": SCHEMA_VERSION,
        "run": run,
        "complete": not any(counts.get(status.value, 0) for status in OPEN),
        "counts": counts,
        "items": items,
        "manifest": key,
        "bytes": size,
        "sha256": lines_digest.hexdigest(),
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
    }
    bucket.put_lines(
        summary_key(run), [json.dumps(summary, ensure_ascii=False) + "\n"], "application/json"
    )
    said = json.dumps([summary["sha256"], counts], sort_keys=True).encode()
    return Published(summary, hashlib.sha256(said).hexdigest())


def write_manifest(engine: Engine, bucket: Bucket, run: str) -> tuple[str, int]:
    """Upload the run's manifest and its summary (:func:`publish_manifest`); ``(key of the
    lines, items)``."""
    published = publish_manifest(engine, bucket, run)
    return published.key, published.items


def prune_retired(engine: Engine, bucket: Bucket, run_id: int) -> int:
    """Delete the objects of the run's retired items from the bucket; how many.

    Each chunk is deleted from the bucket first and then forgotten by the ledger, so an
    interruption leaves the ledger holding objects that may be gone, never forgetting one
    still there: pruning again finishes the job (deleting a missing key succeeds).
    """
    pruned = 0
    while True:
        with ledger.connect(engine) as conn:
            found = ledger.retired_objects(conn, run_id, PRUNE_CHUNK)
        if not found:
            return pruned
        keys = [key for _, key in found]
        try:
            answer = bucket.client.delete_objects(
                Bucket=bucket.name,
                Delete={"Objects": [{"Key": key} for key in keys], "Quiet": True},
            )
        except (ClientError, BotoCoreError) as exc:
            raise StorageUnavailable(
                f"cannot delete {len(keys)} retired objects from {keys[0]!r}: "
                f"{redact_text(str(exc))}"
            ) from exc
        errors = answer.get("Errors") or []
        if errors:
            first = errors[0]
            raise StorageRefused(
                f"the bucket refused to delete {len(errors)} retired objects, "
                f"{first.get('Key')!r} first: {first.get('Code')} {first.get('Message', '')}"
            )
        with ledger.begin(engine) as conn:
            pruned += ledger.forget_objects(conn, [item_id for item_id, _ in found])


def presigned(engine: Engine, bucket: Bucket, run: str, expires: int) -> Iterator[dict[str, Any]]:
    """One record per succeeded item: sku, shot, key and a URL valid ``expires`` seconds."""
    with ledger.connect(engine) as conn:
        for record in ledger.manifest(conn, run):
            yield {
                "sku": record["sku"],
                "shot": record["shot"],
                "key": record["key"],
                "url": bucket.presign(record["key"], expires),
            }


WEBHOOK_TIMEOUT = 5.0
"""Seconds the webhook gets to accept the connection, and again for each read of its answer."""
DELIVERIES_PER_PASS = 100
"""Events one :func:`deliver_due` sends at most."""
SIGNATURE_HEADER = "X-Skufleet-Signature"
EVENT_ID_HEADER = "X-Skufleet-Event-Id"


def sign(secret: str, body: bytes) -> str:
    """The ``X-Skufleet-Signature`` value: ``sha256=`` and the HMAC-SHA256 of ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(
    url: str, body: bytes, headers: dict[str, str], timeout: float = WEBHOOK_TIMEOUT
) -> str | None:
    """POST ``body`` to ``url`` once, http or https only, following no redirect.

    None when the webhook answered 2xx, otherwise why the event was not delivered, in words
    that never include the URL's path or query.
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return f"unsupported webhook URL scheme {parts.scheme!r}: use http or https"
    if not parts.hostname:
        return "the webhook URL has no host"
    try:
        port = parts.port
    except ValueError:
        return "the webhook URL's port is not a number from 0 to 65535"
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    connection = (
        http.client.HTTPSConnection(parts.hostname, port, timeout=timeout)
        if parts.scheme == "https"
        else http.client.HTTPConnection(parts.hostname, port, timeout=timeout)
    )
    try:
        connection.request("POST", target, body=body, headers=headers)
        with connection.getresponse() as response:
            status = response.status
            response.read(65536)  # a little of the answer, so the server sees it read
    except http.client.InvalidURL:
        return "the webhook URL is malformed"
    except (OSError, http.client.HTTPException, ValueError) as exc:
        # OSError: refused, reset, timed out, TLS; ValueError: a host name IDNA rejects
        return f"{type(exc).__name__}: {exc}"
    finally:
        connection.close()
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"answered {status}, a redirect: redirects are not followed"
    return f"answered {status}"


@functools.cache
def _warn_unsigned(where: str) -> None:
    log.warning("SKUFLEET_WEBHOOK_SECRET is not set: events to %s are sent unsigned", where)


def send(settings: Settings, event: outbox.PendingEvent) -> str | None:
    """POST one event to the configured webhook, signed when SKUFLEET_WEBHOOK_SECRET is
    set; None when it was taken, otherwise why not (see :func:`post`)."""
    url = settings.webhook_url
    if not url:
        return "no webhook is configured (SKUFLEET_WEBHOOK_URL)"
    body = json.dumps(event.payload, ensure_ascii=False, separators=(",", ":")).encode()
    headers = {
        "Content-Type": "application/json",
        "User-Agent": "skufleet",
        EVENT_ID_HEADER: event.event_id,
        "X-Skufleet-Event": event.kind,
    }
    secret = settings.webhook_secret.get_secret_value() if settings.webhook_secret else ""
    if secret:
        headers[SIGNATURE_HEADER] = sign(secret, body)
    else:
        _warn_unsigned(redact_url(url, keep_path=False))
    return post(url, body, headers)


@dataclass
class Deliveries:
    delivered: int = 0
    """Events the webhook took."""
    failed: int = 0
    """Deliveries that failed; their events are due again after a backoff."""


def deliver_due(settings: Settings, engine: Engine, limit: int = DELIVERIES_PER_PASS) -> Deliveries:
    """Send the events that are due, oldest first, until one fails or ``limit`` are sent.

    A webhook that is down, slow, redirecting or misconfigured costs one failed delivery
    per call (and at most :data:`WEBHOOK_TIMEOUT` twice over), never an exception; the
    event stays in the ledger and is due again later. Raises LedgerUnavailable when the
    ledger is away.
    """
    done = Deliveries()
    if not settings.webhook_url:
        return done
    where = redact_url(settings.webhook_url, keep_path=False)
    for _ in range(limit):
        claimed = outbox.claim_due(engine)
        if not claimed:
            break
        event = claimed[0]
        error = send(settings, event)
        if error is None:
            outbox.mark_delivered(engine, event.event_id)
            done.delivered += 1
            log.info("webhook %s took event %s (%s)", where, event.event_id, event.kind)
            continue
        retry_at = outbox.mark_failed(engine, event.event_id, error)
        done.failed += 1
        log.warning(
            "webhook %s did not take event %s (%s, attempt %d): %s; next attempt at %s",
            where,
            event.event_id,
            event.kind,
            event.attempts,
            error,
            retry_at.isoformat(timespec="seconds") if retry_at else "never",
        )
        break  # the same webhook would most likely fail the next event too
    return done


def complete(
    settings: Settings, engine: Engine, bucket: Bucket, run_id: int, *, deliver: bool = True
) -> bool:
    """If run ``run_id`` has just finished (and this caller won), write its manifest and
    count the completion with its event (``run.completed`` the first time, ``run.updated``
    when the manifest or the counts changed since the last one, none when neither did),
    then (``deliver``) send the events that are due. Returns whether this caller completed
    the run.

    The completion and its event commit together, before any delivery: a webhook that is
    down delays the event, the reconciler sends it later, and nothing here raises for the
    webhook. The event's body: ``{"event", "id", "run", "complete", "counts", "attempts",
    "needs_review", "renders", "rerolls", "usable_ratio", "renders_per_item", "items",
    "completion", "bucket", "manifest", "summary", "schema_version"}`` (the quality gate's
    figures are ``ledger.RunStatus``'s: items waiting for review, candidate images drawn,
    those drawn again, the share of finished items that succeeded, renders per stored
    image).
    """
    with ledger.begin(engine) as conn:
        if not ledger.complete_run(conn, run_id):
            return False
        run = ledger.find_run_name(conn, run_id)
    if run is None:
        return False
    try:
        published = publish_manifest(engine, bucket, run)
        with ledger.connect(engine) as conn:
            status = ledger.run_status(conn, run)
        with ledger.begin(engine) as conn:
            completion = ledger.record_completion(conn, run_id, published.digest)
            if completion is not None and settings.webhook_url:
                outbox.add(
                    conn,
                    run_id,
                    outbox.RUN_COMPLETED if completion == 1 else outbox.RUN_UPDATED,
                    {
                        **status.as_dict(),
                        "complete": published.summary["complete"],
                        "counts": published.summary["counts"],
                        "items": published.items,
                        "completion": completion,
                        "bucket": bucket.name,
                        "manifest": published.key,
                        "summary": summary_key(run),
                        "schema_version": SCHEMA_VERSION,
                    },
                )
    except Exception:
        with ledger.begin(engine) as conn:
            ledger.reopen_run(conn, run_id)  # the reconciler completes it on a later pass
        raise
    log.info(
        "run %s complete%s: %s; manifest of %d items at %s",
        run,
        "" if completion is not None else " (unchanged: no event)",
        published.summary["counts"],
        published.items,
        published.key,
    )
    if deliver and settings.webhook_url:
        try:
            deliver_due(settings, engine)
        except LedgerUnavailable as exc:
            log.warning("run %s: its webhook event waits for the reconciler: %s", run, exc)
    return True
