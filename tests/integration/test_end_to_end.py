"""The whole path, with real processes: CSV → ledger → Redis → skufleet-worker → S3 → ledger."""

from __future__ import annotations

import hashlib
import io
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import sqlalchemy as sa
from PIL import Image
from sqlalchemy.orm import Session

from skufleet.producer.seed import derive_seed
from skufleet.schemas.key import object_key
from skufleet.schemas.tables import Item, ItemStatus, Run
from tests.fleet import EXAMPLES, Fleet

pytestmark = pytest.mark.integration

CATALOGUE = str(EXAMPLES / "catalogue.csv")
WORKER = ("--model", "tiny", "--devices", "cpu", "--burst")


class Webhook(ThreadingHTTPServer):
    """A downstream system: records the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.received: list[dict[str, Any]] = []
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/skufleet"


def test_catalogue_is_rendered_once_and_matches_the_ledger(fleet: Fleet) -> None:
    """20 rows × 2 shots end as 40 succeeded items whose objects match the ledger; a re-run
    renders none."""
    assert fleet.cli("db", "upgrade").returncode == 0
    webhook = Webhook()
    fleet.env["SKUFLEET_WEBHOOK_URL"] = webhook.url

    # 1. enqueue the example catalogue
    summary = fleet.cli_json(
        "enqueue",
        CATALOGUE,
        "--run",
        "smoke",
        "--model",
        "tiny",
        "--seed",
        "7",
        "--batch-size",
        "6",
        "--size",
        "64x48",
        "--json",
    )
    assert {k: summary[k] for k in ("read", "accepted", "rejected", "duplicates", "enqueued")} == {
        "read": 20,
        "accepted": 20,
        "rejected": 0,
        "duplicates": 0,
        "enqueued": 40,  # the e-commerce pack's shots: front and lifestyle
    }
    assert summary["messages"] == 7  # 6 × 6 + 4

    # 2. a real worker process drains the queue and exits 0
    result = fleet.worker(*WORKER)
    assert result.returncode == 0, result.stderr[-4000:]

    # 3. the ledger says every item succeeded, each rendered once
    status = fleet.cli_json("status", "smoke", "--json")
    assert status["counts"] == {
        "pending": 0,
        "queued": 0,
        "running": 0,
        "succeeded": 40,
        "needs_review": 0,
        "failed": 0,
        "cancelled": 0,
        "retired": 0,
    }
    assert (status["run"], status["attempts"], status["total"], status["remaining"]) == (
        "smoke",
        40,
        40,
        0,
    )
    assert not status["failures_by_kind"] and status["retrying"]["count"] == 0

    # 4. exactly one object per item, matching the recorded size and sha256
    with Session(fleet.engine()) as session:
        items = session.scalars(sa.select(Item).join(Run).where(Run.name == "smoke")).all()
    objects = fleet.objects("smoke/")
    assert sorted(objects) == sorted(item.object_key for item in items)
    for item in items:
        assert item.status is ItemStatus.SUCCEEDED
        assert item.seed == derive_seed(7, item.sku, item.shot)
        assert item.object_key == object_key("smoke", item.sku, item.shot)
        body, response = fleet.read_object(item.object_key)
        assert len(body) == item.byte_size == objects[item.object_key]["Size"]
        assert hashlib.sha256(body).hexdigest() == item.sha256
        assert response["ContentType"] == "image/png"
        assert response["Metadata"]["seed"] == str(item.seed)
        assert response["Metadata"]["model"] == "tiny"
        image = Image.open(io.BytesIO(body))
        assert (image.format, image.size) == ("PNG", (64, 48))
        assert image.text["seed"] == str(item.seed)

    # 5. enqueuing the same run again publishes and renders nothing
    again = fleet.cli_json(
        "enqueue",
        CATALOGUE,
        "--run",
        "smoke",
        "--model",
        "tiny",
        "--seed",
        "7",
        "--size",
        "64x48",
        "--json",
    )
    assert (again["new"], again["changed"], again["unchanged"]) == (0, 0, 40)
    assert (again["enqueued"], again["messages"]) == (0, 0)
    assert fleet.worker(*WORKER).returncode == 0
    assert fleet.cli_json("status", "smoke", "--json")["attempts"] == 40
    assert {k: v["ETag"] for k, v in fleet.objects("smoke/").items()} == {
        k: v["ETag"] for k, v in objects.items()
    }

    # 6. the manifest lists every succeeded item with what downstream systems need
    manifest = fleet.tmp_path / "manifest.jsonl"
    assert fleet.cli("manifest", "smoke", "--out", str(manifest)).returncode == 0
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    by_key = {item.object_key: item for item in items}
    assert sorted(r["key"] for r in records) == sorted(by_key)
    for record in records:
        item = by_key[record["key"]]
        assert (record["run"], record["model"], record["sku"], record["shot"]) == (
            "smoke",
            "tiny",
            item.sku,
            item.shot,
        )
        assert (record["seed"], record["sha256"], record["bytes"]) == (
            item.seed,
            item.sha256,
            item.byte_size,
        )
        assert (record["prompt"], record["negative_prompt"]) == (
            item.prompt,
            item.negative_prompt,
        )
    listing = fleet.cli("runs").stdout
    assert "smoke" in listing and "40/40" in listing and "done" in listing

    # 7. the reconciler completes the finished run: the manifest goes to the bucket and the
    # webhook is called once, however many passes follow
    for _ in range(2):
        assert fleet.cli("reconcile").returncode == 0
    assert sorted(r["key"] for r in fleet.manifest("smoke")) == sorted(by_key)
    assert len(webhook.received) == 1
    event = webhook.received[0]
    assert (event["event"], event["run"], event["counts"]["succeeded"]) == (
        "run.completed",
        "smoke",
        40,
    )
    assert (event["bucket"], event["manifest"]) == (fleet.bucket, "smoke/manifest.jsonl")
    webhook.shutdown()
