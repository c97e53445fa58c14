"""Real worker processes: heartbeats during a long batch, a device taken out of rotation,
and the reconciler around them."""

from __future__ import annotations

import base64
import json
import secrets
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from celery import Celery
from sqlalchemy.orm import Session

from skufleet.producer.services import free_port, wait_until
from skufleet.schemas.tables import Item, ItemStatus
from tests.fixtures import stand_in_worker
from tests.fleet import Fleet, postgres_only

pytestmark = pytest.mark.integration

ONE_SHOT_PACK = """
name = "one-shot"
[categories.default.shots.main]
prompt = "{{ title }}"
"""


def enqueue(fleet: Fleet, rows: int, batch: int) -> None:
    catalogue = fleet.tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title\n" + "".join(f"S{i},Item {i}\n" for i in range(rows)))
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(ONE_SHOT_PACK)
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.cli_json(
        "enqueue",
        str(catalogue),
        "--run",
        "r",
        "--model",
        "tiny",
        "--template",
        str(pack),
        "--batch-size",
        str(batch),
        "--json",
    )


def start_stand_in(
    fleet: Fleet, name: str, *fixture: str, burst: bool = True
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        stand_in_worker(*fixture, name=name, burst=burst),
        env=fleet.env,
        cwd=fleet.tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def statuses(fleet: Fleet) -> list[str]:
    with Session(fleet.engine()) as session:
        return [str(s) for s in session.scalars(sa.select(Item.status))]


@postgres_only
def test_a_worker_busy_with_a_long_batch_stays_online(fleet: Fleet) -> None:
    """During a 12 s batch, `celery inspect ping` answers and Flower lists the worker alive
    at every check, a second apart: heartbeats flow while the GPU thread is busy."""
    enqueue(fleet, rows=2, batch=2)
    name = f"hb{secrets.token_hex(3)}"
    port = free_port()
    user, password = "ops", secrets.token_urlsafe(12)
    flower = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "celery",
            "--broker",
            fleet.env["SKUFLEET_REDIS_URL"],
            "flower",
            f"--port={port}",
            "--address=127.0.0.1",
            f"--basic-auth={user}:{password}",
        ],
        env=fleet.env,
        cwd=fleet.tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    worker = start_stand_in(fleet, name, "--fixture", "standin", "--sleep", "12")
    token = base64.b64encode(f"{user}:{password}".encode()).decode()

    def flower_alive() -> dict[str, bool]:
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/workers?status=true",
            headers={"Authorization": f"Basic {token}"},
        )
        with urllib.request.urlopen(request, timeout=3) as response:
            return dict(json.load(response))

    app = Celery(broker=fleet.env["SKUFLEET_REDIS_URL"], set_as_current=False)
    try:
        wait_until(lambda: "running" in statuses(fleet), 90, "the long batch to start")
        wait_until(
            lambda: any(k.startswith(name) for k in flower_alive()), 20, "Flower to see the worker"
        )
        checks = []
        while "running" in statuses(fleet):
            pong = app.control.ping(timeout=1.0)
            alive = {k: v for k, v in flower_alive().items() if k.startswith(name)}
            checks.append((any(name in key for reply in pong for key in reply), alive))
            time.sleep(1)
        assert len(checks) >= 6, checks
        assert all(ping for ping, _ in checks), checks
        assert all(alive and all(alive.values()) for _, alive in checks), checks
        assert worker.wait(60) == 0
        assert statuses(fleet) == ["succeeded", "succeeded"]
    finally:
        for process in (worker, flower):
            if process.poll() is None:
                process.kill()
        app.close()


@postgres_only
def test_a_device_out_of_memory_for_one_image_leaves_the_rotation(fleet: Fleet) -> None:
    """The worker stops consuming and exits 4 with a clear line for its supervisor; its
    items are back on the queue for other workers, their attempts not used up."""
    enqueue(fleet, rows=3, batch=3)
    worker = start_stand_in(fleet, f"oom{secrets.token_hex(3)}", "--fixture", "oom", "--fits", "0")
    output, _ = worker.communicate(timeout=120)
    assert worker.returncode == 4, output[-3000:]
    assert "out of rotation" in output and "out of memory" in output
    with Session(fleet.engine()) as session:
        found = list(session.scalars(sa.select(Item)))
    assert {i.status for i in found} == {ItemStatus.QUEUED}
    assert all(i.attempts - i.attempts_before_retry == 0 for i in found)


@postgres_only
def test_the_reconciler_requeues_stranded_items_and_completes_the_run(fleet: Fleet) -> None:
    """`skufleet reconcile --watch` (the fleet's one reconciler, in every topology) queues
    again items stranded by a dead worker (running with an expired lease); a worker renders
    them, and the reconciler's next pass writes the finished run's manifest."""
    enqueue(fleet, rows=2, batch=2)
    with Session(fleet.engine()) as session, session.begin():
        session.execute(
            sa.update(Item).values(
                status=ItemStatus.RUNNING,
                attempts=1,
                worker="gone@nowhere",
                lease_expires_at=datetime(2000, 1, 1, tzinfo=UTC),
            )
        )
    fleet.env["SKUFLEET_RECONCILE_SECONDS"] = "1"
    reconciler = subprocess.Popen(
        [str(Path(sys.executable).parent / "skufleet"), "reconcile", "--watch", "--json"],
        env=fleet.env,
        cwd=fleet.tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    worker = start_stand_in(
        fleet, f"rec{secrets.token_hex(3)}", "--fixture", "standin", burst=False
    )
    try:
        wait_until(
            lambda: statuses(fleet) == ["succeeded", "succeeded"],
            90,
            "the reconciler to requeue the stranded items",
        )
        wait_until(
            lambda: bool(fleet.objects("r/manifest")) or _manifest(fleet), 30, "the manifest"
        )
    finally:
        for process in (reconciler, worker):
            process.kill()
    passes = [json.loads(line) for line in reconciler.communicate()[0].splitlines() if line]
    assert sum(p["expired"] for p in passes) == 2 and sum(p["completed"] for p in passes) == 1
    assert [r["sku"] for r in fleet.manifest("r")] == ["S0", "S1"]
    with Session(fleet.engine()) as session:
        attempts = list(session.scalars(sa.select(Item.attempts)))
    assert attempts == [2, 2]


def _manifest(fleet: Fleet) -> bool:
    try:
        fleet.read_object("r/manifest.jsonl")
    except Exception:
        return False
    return True
