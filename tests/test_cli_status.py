"""`skufleet status`, `runs`, `retry` and `generate` through the installed command against a
real PostgreSQL ledger: succeeded apart from failed, failures and retries by kind, an ETA
from the run's own pace, 80-column tables, and JSON for scripts."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from skufleet.schemas import ledger
from skufleet.schemas.tables import Item, ItemStatus
from tests.fixtures import stand_in_worker
from tests.fleet import Fleet, postgres_only

RUN = "spring-catalogue-2026-shoes-and-bags"
MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def add_items(fleet: Fleet) -> None:
    """Run RUN with 10 items, as workers would leave them 20 s into the run: 3 succeeded,
    2 failed on the same upload refusal (each naming its own key), 2 queued again after an
    expired lease, 1 running and 2 pending."""
    assert fleet.cli("db", "upgrade").returncode == 0
    engine = fleet.engine()
    now = ledger.utcnow()
    states = [ItemStatus.SUCCEEDED] * 3 + [ItemStatus.FAILED] * 2 + [ItemStatus.QUEUED] * 2
    states += [ItemStatus.RUNNING] + [ItemStatus.PENDING] * 2
    with ledger.begin(engine) as conn:
        run_id = ledger.upsert_run(conn, RUN, MODEL, 0, "ecommerce", {})
        rows: list[dict[str, Any]] = []
        for i, status in enumerate(states):
            error = None
            if status is ItemStatus.FAILED:
                error = (
                    f"StorageRefused: upload of '{RUN}/SKU-{i}/front.png' refused: An error "
                    "occurred (InvalidRequest) when calling the PutObject operation: Bad Request"
                )
            elif status is ItemStatus.QUEUED:
                error = f"lease expired before its worker finished: gpu{i}@render-host"
            drawn = status in (ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.RUNNING)
            finished = status in (ItemStatus.SUCCEEDED, ItemStatus.FAILED)
            rows.append(
                {
                    "run_id": run_id,
                    "sku": f"SKU-{i}",
                    "shot": "front",
                    "prompt": "a mug",
                    "seed": i,
                    "width": 64,
                    "height": 64,
                    "steps": 2,
                    "guidance_scale": 7.5,
                    "status": status,
                    "last_error": error,
                    "attempts": 2 if error else int(drawn),
                    "started_at": now - timedelta(seconds=20) if drawn else None,
                    "finished_at": now - timedelta(seconds=1) if finished else None,
                    "created_at": now,
                    "updated_at": now,
                }
            )
        conn.execute(sa.insert(Item), rows)
        ledger.upsert_run(conn, "r2", "tiny", 0, "one-shot", {})
    engine.dispose()


@postgres_only
def test_status_and_runs_tell_succeeded_from_failed_and_fit_80_columns(fleet: Fleet) -> None:
    """`status` shows 3/10 succeeded and 2 failed apart, one line for the two failures of
    one kind (no key in it), the retrying items with their last error, and an ETA from the
    run's own 20 s; `--json` keeps its keys and adds the figures; `runs` at COLUMNS=80
    keeps every run name whole."""
    added = time.monotonic()
    add_items(fleet)
    narrow = dataclasses.replace(fleet, env={**fleet.env, "COLUMNS": "80"})
    shown = narrow.cli("status", RUN)

    def paced(rate: float, eta: float) -> bool:
        """5 done over the run's 20 s plus however long the commands took to look; 5 to go."""
        window = 20 + (time.monotonic() - added) + 1
        return 5 / window <= rate <= 0.25 + 0.01 and 19.5 <= eta <= 5 / (5 / window) + 1

    assert shown.returncode == 0, shown.stderr
    assert "3/10 succeeded · 2 failed · 5 open (2 retrying) ·" in shown.stdout
    # 5 done in the 20 s since the first claim (plus the command's own start), 5 to go
    pace = re.search(r"· (\d\.\d\d) items/s · ETA 0:00:(\d\d)\n", shown.stdout)
    assert pace, shown.stdout
    assert paced(float(pace[1]), int(pace[2])), pace[0]
    assert "failures by kind" in shown.stdout and "SKU-" not in shown.stdout
    assert " 2  StorageRefused: upload of … refused: An error occurred" in shown.stdout
    assert "retrying: 2 items" in shown.stdout
    assert " 2  lease expired before its worker finished: …" in shown.stdout
    assert "render-host" not in shown.stdout

    figures = fleet.cli_json("status", RUN, "--json")
    assert figures["counts"]["succeeded"] == 3 and figures["counts"]["failed"] == 2
    assert figures["attempts"] == 2 * 4 + 4 and figures["run"] == RUN
    assert (figures["total"], figures["done"], figures["remaining"]) == (10, 5, 5)
    assert paced(figures["items_per_second"], figures["eta_seconds"]), figures
    (failures,) = figures["failures_by_kind"]
    assert failures["count"] == 2 and failures["kind"].startswith("StorageRefused: upload of …")
    assert figures["retrying"]["count"] == 2

    listed = narrow.cli("runs")
    assert listed.returncode == 0, listed.stderr
    assert RUN in listed.stdout and "…" not in listed.stdout
    assert all(len(line.rstrip()) <= 80 for line in listed.stdout.splitlines())
    lines = [json.loads(line) for line in fleet.cli("runs", "--json").stdout.splitlines()]
    assert {line["run"]: line["state"] for line in lines} == {RUN: "running", "r2": "done"}
    assert lines[-1]["model"] == MODEL and lines[-1]["counts"]["failed"] == 2


@postgres_only
def test_retry_json_counts_what_it_queued_and_status_shows_them_retrying(fleet: Fleet) -> None:
    """`retry --failed --json` prints the run and its counts; the two items it queued again
    keep their last error, so `status --json` counts them as retrying, failed no more."""
    add_items(fleet)
    assert fleet.cli_json("retry", RUN, "--failed", "--json") == {
        "run": RUN,
        "retried": 2,
        "enqueued": 4,  # the two retried and the two pending items, in one message of 8
        "messages": 1,
    }
    figures = fleet.cli_json("status", RUN, "--json")
    assert figures["counts"]["failed"] == 0 and figures["failures_by_kind"] == []
    assert figures["retrying"]["count"] == 4
    assert [kind["count"] for kind in figures["retrying"]["by_kind"]] == [2, 2]


@postgres_only
def test_generate_json_prints_the_paths_and_the_missing_images(fleet: Fleet) -> None:
    """`generate --json`: the run, the saved paths and no missing image, exit 0; a prompt
    the stand-in model cannot draw: no path, the missing image with its error, exit 1."""
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.env["SKUFLEET_MAX_ATTEMPTS"] = "1"
    out = fleet.tmp_path / "out"
    common = ("--model", "tiny", "--out", str(out), "--timeout", "120", "--json")
    with fleet.background(*stand_in_worker("--fixture", "poison", burst=False)):
        drawn = fleet.cli("generate", "a red mug", "-n", "2", *common)
        poisoned = fleet.cli("generate", "a POISON mug", "-n", "1", *common)
    assert drawn.returncode == 0, drawn.stderr[-2000:]
    result = json.loads(drawn.stdout)
    assert result["run"].startswith("generate-") and result["missing"] == []
    assert len(result["paths"]) == 2 and all(Path(p).exists() for p in result["paths"])
    assert poisoned.returncode == 1, poisoned.stderr[-2000:]
    failed = json.loads(poisoned.stdout)
    assert failed["paths"] == []
    (missing,) = failed["missing"]
    assert (missing["sku"], missing["status"]) == ("image-01", "failed")
    assert missing["error"].startswith("RuntimeError: poisoned prompt")
