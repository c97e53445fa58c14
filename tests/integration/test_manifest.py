"""The manifest as a contract, end to end with real worker processes: catalogue fields,
the stored image's real size and format, the complete flag and counts, one event per
change, and retired SKUs with and without --prune."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from PIL import Image

from skufleet.schemas.ledger.manifest import json_schema
from tests.fleet import Fleet, postgres_only
from tests.test_webhook import Receiver

pytestmark = pytest.mark.integration

WORKER = ("--model", "tiny", "--devices", "cpu", "--burst")
PACK = """
name = "contract"
manifest_columns = ["brand", "price"]

[categories.default]
subject = "{{ title }}"
[categories.default.shots.front]
prompt = "{{ subject }}, front view"
[categories.default.shots.labelled]
prompt = "{{ subject }}, labelled"
labels = "points"
format = "webp"
"""


def write(path: Path, rows: list[str]) -> str:
    path.write_text("sku,title,category,brand,points\n" + "\n".join(rows) + "\n")
    return str(path)


def published(fleet: Fleet, run: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's manifest summary and lines, each checked against its JSON Schema, and the
    summary against the lines."""
    body, _ = fleet.read_object(f"{run}/manifest.jsonl")
    summary = json.loads(fleet.read_object(f"{run}/manifest.json")[0])
    jsonschema.validate(summary, json_schema("summary"))
    lines = [json.loads(line) for line in body.decode().splitlines()]
    for line in lines:
        jsonschema.validate(line, json_schema("line"))
    assert (summary["items"], summary["sha256"]) == (len(lines), hashlib.sha256(body).hexdigest())
    assert summary["counts"]["succeeded"] == len(lines)
    return summary, lines


@postgres_only
def test_the_manifest_tells_downstream_systems_what_is_there(fleet: Fleet) -> None:
    """Every line has the row's title, category and the pack's manifest columns, and the
    stored image's real size and format (a labelled shot is wider than drawn); the summary
    says complete with the counts; run.completed is sent once, run.updated after a change;
    a SKU gone from the catalogue is retired (objects kept), pruned with --prune, and
    revived when it comes back."""
    receiver = Receiver()
    fleet.env["SKUFLEET_WEBHOOK_URL"] = receiver.url()
    pack = fleet.tmp_path / "contract.toml"
    pack.write_text(PACK)
    enqueue = ("--run", "m", "--model", "tiny", "--template", str(pack), "--json")
    v1 = write(
        fleet.tmp_path / "v1.csv",
        ["A,Red mug,Kitchen,Acme,handle;glaze", "B,Blue bowl,,Acme,rim", "C,Green rug,Home,,"],
    )
    assert fleet.cli("db", "upgrade").returncode == 0
    assert fleet.cli_json("enqueue", v1, *enqueue)["new"] == 6
    assert fleet.worker(*WORKER).returncode == 0
    for _ in range(2):  # however many passes: one event
        assert fleet.cli("reconcile").returncode == 0

    # 1. the manifest: complete, counted, with catalogue fields and the real images
    summary, lines = published(fleet, "m")
    assert (summary["complete"], summary["counts"]["succeeded"]) == (True, 6)
    by_item = {(x["sku"], x["shot"]): x for x in lines}
    assert {(sku, x["title"], x["category"]) for (sku, _), x in by_item.items()} == {
        ("A", "Red mug", "Kitchen"),
        ("B", "Blue bowl", None),
        ("C", "Green rug", "Home"),
    }
    assert by_item["A", "front"]["fields"] == {"brand": "Acme", "price": None}
    assert by_item["C", "front"]["fields"] == {"brand": None, "price": None}
    for line in lines:
        body, _ = fleet.read_object(line["key"])
        image = Image.open(io.BytesIO(body))
        assert (line["width"], line["height"]) == image.size
        assert line["format"] == image.format.lower()
        assert (line["drawn_width"], line["drawn_height"]) == (64, 64)
    labelled = by_item["A", "labelled"]
    assert labelled["format"] == "webp" and labelled["width"] > 64  # the label panel
    assert (by_item["C", "labelled"]["width"], by_item["A", "front"]["format"]) == (64, "png")
    (completed,) = receiver.bodies()
    assert (completed["event"], completed["complete"], completed["items"]) == (
        "run.completed",
        True,
        6,
    )
    assert completed["counts"] == summary["counts"]

    # 2. C leaves the catalogue, B changes: C retired with its objects kept, B drawn again
    c_keys = [by_item["C", shot]["key"] for shot in ("front", "labelled")]
    v2 = write(
        fleet.tmp_path / "v2.csv", ["A,Red mug,Kitchen,Acme,handle;glaze", "B,Big bowl,,Acme,rim"]
    )
    second = fleet.cli_json("enqueue", v2, *enqueue)
    assert {k: second[k] for k in ("missing", "missing_skus", "retired", "changed", "pruned")} == {
        "missing": 1,
        "missing_skus": ["C"],
        "retired": 2,
        "changed": 2,
        "pruned": 0,
    }
    assert fleet.worker(*WORKER).returncode == 0
    assert fleet.cli("reconcile").returncode == 0
    summary, lines = published(fleet, "m")
    assert sorted({x["sku"] for x in lines}) == ["A", "B"]
    assert (summary["complete"], summary["counts"]["retired"]) == (True, 2)
    assert set(c_keys) <= set(fleet.objects("m/"))
    updated = receiver.bodies()[1]
    assert (updated["event"], updated["counts"]["retired"], updated["items"]) == (
        "run.updated",
        2,
        4,
    )

    # 3. the same catalogue with --prune: C's objects deleted; nothing changed, no event
    third = fleet.cli_json("enqueue", v2, *enqueue, "--prune")
    assert (third["missing"], third["pruned"], third["enqueued"]) == (0, 2, 0)
    assert not set(c_keys) & set(fleet.objects("m/"))
    assert fleet.cli("reconcile").returncode == 0
    assert len(receiver.requests) == 2

    # 4. C comes back unchanged: its objects are gone, so it is drawn again
    fourth = fleet.cli_json("enqueue", v1, *enqueue)
    assert (fourth["revived"], fourth["changed"], fourth["enqueued"]) == (2, 2, 4)
    status = fleet.cli_json("status", "m", "--json")
    assert (status["counts"]["retired"], status["counts"]["queued"]) == (0, 4)
    receiver.stop()
