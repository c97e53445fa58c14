"""What downstream systems get: the manifest in the bucket, presigned URLs, a webhook.

When a run's last open item is done, the worker that finished it (the one that wins
``ledger.complete_run``) calls :func:`complete`: the manifest goes to
``<run>/manifest.jsonl`` in the bucket and the webhook, if configured, receives the totals.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Iterator
from typing import Any

from sqlalchemy.engine import Engine

from producer.bucket import Bucket
from schemas import ledger
from schemas.key import check_run_name
from schemas.settings import Settings

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"


def manifest_key(run: str) -> str:
    return f"{check_run_name(run)}/{MANIFEST}"


def write_manifest(engine: Engine, bucket: Bucket, run: str) -> tuple[str, int]:
    """Upload the run's manifest (one JSON line per succeeded item); ``(key, items)``."""
    count = 0

    def lines() -> Iterator[str]:
        nonlocal count
        with engine.connect() as conn:
            for record in ledger.manifest(conn, run):
                count += 1
                yield json.dumps(record, ensure_ascii=False) + "\n"

    key = manifest_key(run)
    bucket.put_lines(key, lines(), "application/x-ndjson")
    return key, count


def presigned(engine: Engine, bucket: Bucket, run: str, expires: int) -> Iterator[dict[str, Any]]:
    """One record per succeeded item: sku, shot, key and a URL valid ``expires`` seconds."""
    with engine.connect() as conn:
        for record in ledger.manifest(conn, run):
            yield {
                "sku": record["sku"],
                "shot": record["shot"],
                "key": record["key"],
                "url": bucket.presign(record["key"], expires),
            }


def notify(url: str, payload: dict[str, Any], timeout: float = 10.0) -> None:
    """POST ``payload`` as JSON to the webhook; failures are logged, never raised."""
    request = urllib.request.Request(
        url,
        data=json.dumps(payload).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "User-Agent": "skufleet"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            log.info("webhook %s answered %s", url, response.status)
    except OSError as exc:
        log.warning("webhook %s failed: %s", url, exc)


def complete(settings: Settings, engine: Engine, bucket: Bucket, run_id: int) -> bool:
    """If run ``run_id`` has just finished (and this caller won), write its manifest and
    call the webhook. Returns whether this caller completed the run."""
    if not ledger.complete_run(engine, run_id):
        return False
    run = ledger.run_name(engine, run_id)
    if run is None:
        return False
    try:
        key, items = write_manifest(engine, bucket, run)
    except Exception:
        ledger.reopen_run(engine, run_id)  # the reconciler completes it on a later pass
        raise
    with engine.connect() as conn:
        status = ledger.run_status(conn, run)
    log.info("run %s complete: %s; manifest of %d items at %s", run, status.counts, items, key)
    if settings.webhook_url:
        notify(
            settings.webhook_url,
            {**status.as_dict(), "event": "run.completed", "bucket": bucket.name, "manifest": key},
        )
    return True
