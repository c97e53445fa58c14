"""Messages a worker cannot use never stop it: a real worker process, real Redis.

Anyone who can write to Redis can put anything on a render queue. Undecodable items are set
aside on a dead-letter list, mis-shaped or unknown messages are dropped with one log line,
and the worker goes on with the real work.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import redis
from celery import Celery

from skufleet.schemas.names import TASK_RENDER, render_queue
from skufleet.worker.transport import DEAD_LETTER_SUFFIX
from tests.fixtures import stand_in_worker
from tests.fleet import Fleet, postgres_only

pytestmark = pytest.mark.integration

ONE_SHOT_PACK = 'name = "one-shot"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n'

UNDECODABLE = [
    b"\xff\xfe not json at all",
    b"[1, 2, 3]",
    b'{"no": "properties"}',
    json.dumps(
        {
            "body": "!!! not base64 !!!",
            "content-type": "application/json",
            "properties": {"delivery_tag": "x", "body_encoding": "base64", "delivery_info": {}},
            "headers": {"task": TASK_RENDER, "id": "forged"},
        }
    ).encode(),
]


@postgres_only
def test_undecodable_and_misshaped_messages_never_stop_a_worker(fleet: Fleet) -> None:
    """Raw bytes, JSON that is no envelope, a body that is not base64, render messages with
    the wrong arguments and an unknown task, all queued ahead of real work: the worker sets
    the undecodable ones aside, drops the rest with a line each, renders every real item and
    exits 0."""
    queue = render_queue(fleet.settings.queue_prefix, "tiny")
    client = redis.Redis.from_url(fleet.env["SKUFLEET_REDIS_URL"])
    # 1. garbage first: BRPOP takes the oldest item, so these reach the worker before the work
    for raw in UNDECODABLE:
        client.lpush(queue, raw)
    sender = Celery("forger", broker=fleet.env["SKUFLEET_REDIS_URL"], set_as_current=False)
    sender.conf.update(task_serializer="json", accept_content=["json"])
    for args, kwargs in (([], {}), (["x"], {}), ([{"run_id": "x"}], {}), ([{}], {"bogus": 1})):
        sender.send_task(TASK_RENDER, args=args, kwargs=kwargs, queue=queue)
    sender.send_task("skufleet.no-such-task", args=[{}], queue=queue)
    sender.close()
    # 2. the real work
    catalogue = fleet.tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title\n" + "".join(f"S{i},Item {i}\n" for i in range(6)))
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(ONE_SHOT_PACK)
    assert fleet.cli("db", "upgrade").returncode == 0
    summary = fleet.cli_json(
        "enqueue", str(catalogue), "--run", "r", "--model", "tiny", "--template", str(pack),
        "--batch-size", "3", "--json",
    )  # fmt: skip
    assert summary["enqueued"] == 6

    worker = subprocess.run(
        stand_in_worker("--fixture", "standin"),
        env=fleet.env,
        cwd=fleet.tmp_path,
        capture_output=True,
        text=True,
        timeout=180,
    )
    log = worker.stdout + worker.stderr
    assert worker.returncode == 0, log[-3000:]
    assert "Unrecoverable error" not in log
    assert fleet.cli_json("status", "r", "--json")["counts"]["succeeded"] == 6
    parked = client.lrange(queue + DEAD_LETTER_SUFFIX, 0, -1)
    assert sorted(parked) == sorted(UNDECODABLE)
    assert log.count("set aside an undecodable message") == len(UNDECODABLE)
    assert log.count("dropping render message") + log.count("dropping malformed") == 4
    assert "skufleet.no-such-task" in log
