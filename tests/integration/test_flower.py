"""Flower tells the truth: what a real worker's tasks end as, read from Flower's own API.

A real worker process (a stand-in pipeline that fails on a poisoned prompt) and a real
``skufleet flower``, its state in a directory of this test's own; everything is read from
Flower's HTTP API (``/api/tasks``), the way an operator's tools would read it.
"""

from __future__ import annotations

import base64
import json
import secrets
import urllib.error
import urllib.request
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.producer.services import free_port, wait_until
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.tables import Item
from tests.fixtures import stand_in_worker
from tests.fixtures.pipelines import POISON
from tests.fleet import BIN, Fleet, postgres_only

pytestmark = pytest.mark.integration

PACK = 'name = "one-shot"\n[categories.default.shots.hero]\nprompt = "{{ title }}"\n'
RUN = "spring-2026"
SKUS = ["SKU-1", "SKU-2", "<i>3</i>", *(f"SKU-{i}" for i in range(4, 11))]
"""Two batches of five; the third SKU is markup, shown as text by Flower."""
POISONED = "SKU-8"
FINAL = {"SUCCESS", "FAILURE"}


class FlowerApi:
    """GETs against Flower with its login."""

    def __init__(self, port: int, user: str, password: str) -> None:
        self.base = f"http://127.0.0.1:{port}"
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}"}

    def get(self, path: str) -> bytes:
        request = urllib.request.Request(self.base + path, headers=self.headers)
        with urllib.request.urlopen(request, timeout=10) as response:
            return bytes(response.read())

    def json(self, path: str) -> Any:
        return json.loads(self.get(path))

    def answers(self) -> bool:
        try:
            self.json("/api/workers?status=true")
        except (OSError, urllib.error.HTTPError):
            return False
        return True


def finished_at(fleet: Fleet) -> dict[str, float]:
    """SKU → when the ledger recorded its item done (seconds since the epoch)."""
    with Session(fleet.engine()) as session:
        rows = session.execute(sa.select(Item.sku, Item.finished_at)).all()
    return {sku: at.timestamp() for sku, at in rows if at is not None}


@postgres_only
def test_flower_shows_each_tasks_whole_batch_retries_and_labels(fleet: Fleet) -> None:
    """A batch with a poisoned item ends FAILURE naming the failure; clean batches and
    retries end SUCCESS only after their images are recorded and in the bucket; every retry
    says it is one, with its attempt; labels name the run, the shot and the first SKUs, and
    Flower's own page shows a SKU's markup as text."""
    catalogue = fleet.tmp_path / "catalogue.csv"
    titles = {sku: f"{POISON} item" if sku == POISONED else f"Item {sku}" for sku in SKUS}
    catalogue.write_text("sku,title\n" + "".join(f"{s},{t}\n" for s, t in titles.items()))
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(PACK)
    fleet.env["SKUFLEET_MAX_ATTEMPTS"] = "3"
    assert fleet.cli("db", "upgrade").returncode == 0

    user, password = "ops", secrets.token_urlsafe(16)
    port = free_port()
    flower_env = {
        **fleet.env,
        "SKUFLEET_FLOWER_BASIC_AUTH": f"{user}:{password}",
        "SKUFLEET_CACHE_DIR": str(fleet.tmp_path / "flower"),  # its own persisted state
    }
    api = FlowerApi(port, user, password)
    name = f"fl{secrets.token_hex(3)}"
    worker = stand_in_worker("--fixture", "poison", "--sleep", "0.3", name=name, burst=False)
    command = (str(BIN / "skufleet"), "flower", "--port", str(port))
    with fleet.background(*command, env=flower_env), fleet.background(*worker):
        wait_until(api.answers, 90, "Flower")
        # Flower hears the worker's heartbeats: its event receiver is up before any task
        wait_until(
            lambda: any(k.startswith(name) for k in api.json("/api/workers?status=true")),
            120,
            "Flower to see the worker",
        )
        fleet.cli_json(
            "enqueue", str(catalogue), "--run", RUN, "--model", "tiny", "--template",
            str(pack), "--batch-size", "5", "--json",
        )  # fmt: skip

        def ours() -> list[dict[str, Any]]:
            # Redis is shared, and so are its task events: other tests' tasks show up too
            tasks = api.json("/api/tasks").values()
            return [t for t in tasks if (t.get("worker") or "").startswith(f"{name}@")]

        # 2 batches, 5 retries at attempt 2 (the poisoned batch, one item per message), and
        # the poisoned item's attempt 3
        def settled() -> bool:
            tasks = ours()
            return len(tasks) == 8 and all(t["state"] in FINAL for t in tasks)

        try:
            wait_until(settled, 240, "every task to reach its final state in Flower")
        except ConfigError as exc:
            seen = sorted((t["args"] or "", t["state"]) for t in ours())
            ledger = fleet.cli_json("status", RUN, "--json")["counts"]
            raise AssertionError(f"{exc}; Flower shows {seen}; the ledger {ledger}") from exc
        tasks = {task["args"]: task for task in ours()}
        clean_page = next(
            api.get(f"/task/{t['uuid']}").decode() for a, t in tasks.items() if "<i>" in a
        )

    done = finished_at(fleet)
    counts = fleet.cli_json("status", RUN, "--json")["counts"]
    assert (counts["succeeded"], counts["failed"]) == (9, 1)
    assert len(fleet.objects(f"{RUN}/")) == 9

    def shown(skus: str, size: int, note: str = "") -> str:
        return f"{RUN} · hero · {skus} ({size} item{'s' if size > 1 else ''}){note}"

    # the clean batch: SUCCESS, and only once all five images were recorded
    clean = tasks.pop(shown("SKU-1, SKU-2, <i>3</i> +2", 5))
    assert clean["state"] == "SUCCESS", clean
    assert max(done[s] for s in SKUS[:5]) <= clean["succeeded"]
    # the poisoned batch: FAILURE, naming how many items and the poisoned prompt
    poisoned = tasks.pop(shown("SKU-6, SKU-7, SKU-8 +2", 5))
    assert poisoned["state"] == "FAILURE", poisoned
    assert "5 of 5 items not stored (5 retried after an error)" in poisoned["exception"]
    assert "poisoned prompt" in poisoned["exception"]
    # the retries: labelled as such, each with its attempt
    for sku in ("SKU-6", "SKU-7", "SKU-9", "SKU-10"):
        retry = tasks.pop(shown(sku, 1, " · retry, attempt 2 of 3"))
        assert retry["state"] == "SUCCESS", retry
        assert done[sku] <= retry["succeeded"]
    second = tasks.pop(shown(POISONED, 1, " · retry, attempt 2 of 3"))
    assert second["state"] == "FAILURE" and "1 retried after an error" in second["exception"]
    last = tasks.pop(shown(POISONED, 1, " · retry, attempt 3 of 3"))
    assert last["state"] == "FAILURE" and "1 failed for good" in last["exception"]
    assert "poisoned prompt" in last["exception"]
    assert tasks == {}
    # Flower escapes what it shows: the SKU's markup is text on the task's page
    assert "&lt;i&gt;3&lt;/i&gt;" in clean_page and "<i>3</i>" not in clean_page
