"""Runs over time: incremental re-enqueues, cancel and retry, with real worker processes."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session

from skufleet.schemas.tables import Item
from tests.fleet import Fleet, postgres_only

pytestmark = pytest.mark.integration

WORKER = ("--model", "tiny", "--devices", "cpu", "--burst")


def write(path: Path, rows: list[str]) -> str:
    path.write_text("sku,title,category\n" + "\n".join(rows) + "\n")
    return str(path)


def items(fleet: Fleet) -> dict[tuple[str, str], Item]:
    with Session(fleet.engine()) as session:
        return {(i.sku, i.shot): i for i in session.scalars(sa.select(Item))}


@postgres_only
def test_an_updated_catalogue_renders_only_new_and_changed_items(fleet: Fleet) -> None:
    """Re-enqueuing with one new row and one changed title renders those rows' shots only."""
    assert fleet.cli("db", "upgrade").returncode == 0
    v1 = write(
        fleet.tmp_path / "v1.csv", ["A,Red mug,Kitchen", "B,Blue bowl,Kitchen", "C,Green rug,Home"]
    )
    first = fleet.cli_json("enqueue", v1, "--run", "inc", "--model", "tiny", "--json")
    assert (first["new"], first["enqueued"]) == (6, 6)
    assert fleet.worker(*WORKER).returncode == 0
    before = items(fleet)
    etags = {k: v["ETag"] for k, v in fleet.objects("inc/").items()}

    v2 = write(
        fleet.tmp_path / "v2.csv",
        ["A,Red mug,Kitchen", "B,Large blue bowl,Kitchen", "C,Green rug,Home", "D,Oak shelf,Home"],
    )
    second = fleet.cli_json("enqueue", v2, "--run", "inc", "--model", "tiny", "--json")
    assert {k: second[k] for k in ("read", "items", "new", "changed", "unchanged", "enqueued")} == {
        "read": 4,
        "items": 8,
        "new": 2,
        "changed": 2,
        "unchanged": 4,
        "enqueued": 4,
    }
    assert fleet.worker(*WORKER).returncode == 0

    after = items(fleet)
    assert all(item.status == "succeeded" for item in after.values())
    rendered_again = {key for key in before if after[key].attempts > before[key].attempts}
    assert rendered_again == {("B", "front"), ("B", "lifestyle")}
    assert "large blue bowl" in after[("B", "front")].prompt.lower()
    objects = fleet.objects("inc/")
    assert sorted(objects) == sorted(item.object_key for item in after.values())
    for key, item in after.items():
        changed = key in rendered_again
        if key in before:
            assert (objects[item.object_key]["ETag"] != etags[item.object_key]) == changed


@postgres_only
def test_a_cancelled_run_renders_nothing_until_retried(fleet: Fleet) -> None:
    """cancel: workers skip the queued items; retry: they are queued again and rendered."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = write(fleet.tmp_path / "c.csv", [f"S{i},Item {i},Toys" for i in range(4)])
    fleet.cli_json("enqueue", catalogue, "--run", "stop", "--model", "tiny", "--json")
    result = fleet.cli("cancel", "stop")
    assert result.returncode == 0 and "8 items cancelled" in result.stdout

    assert fleet.worker(*WORKER).returncode == 0  # consumes the messages, renders nothing
    status = fleet.cli_json("status", "stop", "--json")
    assert (status["counts"]["cancelled"], status["attempts"]) == (8, 0)
    assert fleet.objects("stop/") == {}
    assert "cancelled" in fleet.cli("runs").stdout

    retried = fleet.cli_json("retry", "stop", "--json")
    assert (retried["retried"], retried["enqueued"]) == (8, 8)
    assert fleet.worker(*WORKER).returncode == 0
    status = fleet.cli_json("status", "stop", "--json")
    assert (status["counts"]["succeeded"], status["attempts"]) == (8, 8)
    assert len(fleet.objects("stop/")) == 8
