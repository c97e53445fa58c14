"""The manifest as a contract, on PostgreSQL and SQLite: retired SKUs and their revival,
catalogue fields, completions that send one event each, and the manifest and its summary
in a real bucket, checked against their JSON Schemas."""

from __future__ import annotations

import hashlib
import json
import secrets
from collections.abc import Iterator
from typing import Any

import boto3
import jsonschema
import pytest
import sqlalchemy as sa

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.db import upgrade
from skufleet.producer.services import LocalS3
from skufleet.schemas import ledger
from skufleet.schemas.ledger.manifest import SCHEMA_VERSION, json_schema
from skufleet.schemas.tables import Item, ItemStatus, Run
from tests.test_ledger import item
from tests.test_webhook import Receiver, settings_for

SUCCEEDED, RETIRED = ItemStatus.SUCCEEDED, ItemStatus.RETIRED


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    yield server
    server.stop()


def row(sku: str, prompt: str = "p", brand: str | None = "Acme") -> dict[str, Any]:
    """A staged item with its catalogue fields."""
    fields = ledger.catalogue_fields(f"Title {sku}", "Kitchen", {"brand": brand})
    return {**item(sku, prompt), "fields": fields}


def stage(
    engine: sa.Engine, rows: list[dict[str, Any]], kept: list[str] | None = None
) -> tuple[ledger.Retirement, tuple[int, int, int], int]:
    """Enqueue ``rows`` into run r1 as a whole catalogue (``kept``: SKUs of its rejected
    records): (retirement, (new, changed, in flight), revived)."""
    with ledger.begin(engine) as conn:
        run_id = ledger.upsert_run(conn, "r1", "tiny", 1, "ecommerce", {})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.keep(kept or [])
        retirement = staging.retire_missing()
        merged = staging.merge()
    return retirement, merged, staging.revived


def settle(engine: sa.Engine, statuses: dict[str, ItemStatus], stored: bool = True) -> None:
    """Put the items of these SKUs in these statuses, succeeded ones with a stored object."""
    with ledger.begin(engine) as conn:
        for sku, status in statuses.items():
            done = status is SUCCEEDED and stored
            conn.execute(
                sa.update(Item)
                .where(Item.sku == sku)
                .values(
                    status=status,
                    sha256=hashlib.sha256(sku.encode()).hexdigest() if done else None,
                    byte_size=3 if done else None,
                    image_width=160 if done else None,
                    image_height=188 if done else None,
                    image_format="png" if done else None,
                )
            )


def rows_by_sku(engine: sa.Engine) -> dict[str, Any]:
    with engine.connect() as conn:
        return {r.sku: r for r in conn.execute(sa.select(Item.__table__)).all()}


def test_skus_missing_from_a_new_catalogue_are_retired_and_named(engine: sa.Engine) -> None:
    """Items of SKUs the catalogue no longer has are retired, except running ones (left to
    finish, counted in flight) and those of records it rejected; retired SKUs are not
    counted missing again."""
    stage(engine, [row(sku) for sku in "ABCD"])
    settle(engine, {"A": SUCCEEDED, "B": ItemStatus.RUNNING, "C": ItemStatus.QUEUED})
    settle(engine, {"D": ItemStatus.FAILED})

    retirement, merged, _ = stage(engine, [row("E")], kept=["D"])

    assert retirement == ledger.Retirement(
        missing=3, sample=["A", "B", "C"], retired=2, in_flight=1
    )
    assert merged == (1, 0, 0)
    found = rows_by_sku(engine)
    assert {sku: found[sku].status for sku in "ABCDE"} == {
        "A": "retired",
        "B": "running",
        "C": "retired",
        "D": "failed",
        "E": "pending",
    }
    assert found["A"].sha256 is not None and found["C"].queued_at is None  # object kept
    again, _, _ = stage(engine, [row("E")], kept=["D"])
    assert again == ledger.Retirement(missing=1, sample=["B"], retired=0, in_flight=1)


def test_a_retired_sku_that_comes_back_is_succeeded_again_only_with_its_object_and_content(
    engine: sa.Engine,
) -> None:
    """Back in the catalogue unchanged, a retired item whose object the ledger still holds is
    succeeded again (nothing drawn); one whose object was pruned, or whose content changed,
    is pending and drawn again."""
    stage(engine, [row("KEPT"), row("PRUNED"), row("CHANGED")])
    settle(engine, {"KEPT": SUCCEEDED, "PRUNED": SUCCEEDED, "CHANGED": SUCCEEDED})
    retirement, _, _ = stage(engine, [row("OTHER")])
    assert retirement.retired == 3
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, "r1")
        listed = ledger.retired_objects(conn, run_id, 10)
        assert [key.split("/")[1] for _, key in listed] == ["KEPT", "PRUNED", "CHANGED"]
        pruned = [item_id for item_id, key in listed if "/PRUNED/" in key]
        assert ledger.forget_objects(conn, pruned) == 1
        assert len(ledger.retired_objects(conn, run_id, 10)) == 2
    kept_before = rows_by_sku(engine)["KEPT"]

    _, merged, revived = stage(
        engine, [row("KEPT"), row("PRUNED"), row("CHANGED", "a new prompt"), row("OTHER")]
    )

    assert (merged, revived) == ((0, 1, 0), 2)
    found = rows_by_sku(engine)
    assert {sku: found[sku].status for sku in ("KEPT", "PRUNED", "CHANGED")} == {
        "KEPT": "succeeded",
        "PRUNED": "pending",
        "CHANGED": "pending",
    }
    assert (found["KEPT"].sha256, found["KEPT"].image_width) == (kept_before.sha256, 160)
    assert found["CHANGED"].sha256 is None and found["CHANGED"].image_format is None


def test_catalogue_fields_follow_the_catalogue_without_drawing_again(engine: sa.Engine) -> None:
    """A new brand for an unchanged item updates the fields its manifest line carries and
    leaves its status, object and attempts alone."""
    stage(engine, [row("A")])
    settle(engine, {"A": SUCCEEDED})
    before = rows_by_sku(engine)["A"]

    _, merged, _ = stage(engine, [row("A", brand="Zenith")])

    after = rows_by_sku(engine)["A"]
    assert merged == (0, 0, 0)
    assert (after.status, after.sha256, after.attempts) == ("succeeded", before.sha256, 0)
    assert json.loads(after.fields) == {
        "title": "Title A",
        "category": "Kitchen",
        "fields": {"brand": "Zenith"},
    }


def test_a_completion_is_counted_once_per_change(engine: sa.Engine) -> None:
    """The first completion is number 1; one that publishes the same digest is not counted
    (no event), another digest is the next number; a run reopened meanwhile counts none."""
    stage(engine, [row("A")])
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, "r1")
        assert ledger.record_completion(conn, run_id, "a") is None  # not completed
        conn.execute(sa.update(Item).values(status=SUCCEEDED))
        assert ledger.complete_run(conn, run_id)
        assert ledger.record_completion(conn, run_id, "a") == 1
        assert ledger.record_completion(conn, run_id, "a") is None
        assert ledger.record_completion(conn, run_id, "b") == 2
        ledger.reopen_run(conn, run_id)
        assert ledger.record_completion(conn, run_id, "c") is None


def stored_run(engine: sa.Engine, s3: LocalS3, bucket: Bucket, skus: str) -> int:
    """Run r1 with one succeeded item per SKU, each object really in the bucket."""
    stage(engine, [row(sku) for sku in skus])
    settle(engine, dict.fromkeys(skus, SUCCEEDED))
    with engine.begin() as conn:
        conn.execute(sa.update(Item).values(image_width=64, image_height=64))
        keys = conn.execute(sa.select(Item.object_key)).scalars().all()
        run_id = int(conn.execute(sa.select(Run.id)).scalar_one())
    for key in keys:
        s3.client().put_object(Bucket=bucket.name, Key=key, Body=b"png")
    return run_id


def published(s3: LocalS3, bucket: Bucket) -> tuple[dict[str, Any], list[dict[str, Any]], bytes]:
    """The summary, the lines and the raw body of run r1's manifest in the bucket."""
    client = s3.client()
    body = client.get_object(Bucket=bucket.name, Key="r1/manifest.jsonl")["Body"].read()
    summary = json.loads(
        client.get_object(Bucket=bucket.name, Key="r1/manifest.json")["Body"].read()
    )
    return summary, [json.loads(line) for line in body.decode().splitlines()], body


def test_the_manifest_keeps_its_schemas_and_each_change_sends_one_event(
    engine: sa.Engine, redis_url: str, s3: LocalS3, receiver: Receiver
) -> None:
    """A completion writes manifest.jsonl and manifest.json, both valid against their
    versioned JSON Schemas (every field the code writes is in the schema), and sends
    run.completed; completing again with nothing changed sends nothing; retiring a SKU and
    completing again sends run.updated with the new counts; pruning deletes the retired
    objects only."""
    name = f"test-{secrets.token_hex(6)}"
    s3.client().create_bucket(Bucket=name)
    settings = settings_for(redis_url, receiver.url()).model_copy(
        update={"s3_endpoint_url": s3.endpoint_url, "s3_bucket": name}
    )
    session = boto3.Session(aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    bucket = Bucket(settings, session)
    run_id = stored_run(engine, s3, bucket, "AB")
    line_schema, summary_schema = json_schema("line"), json_schema("summary")

    assert downstream.complete(settings, engine, bucket, run_id)

    summary, lines, body = published(s3, bucket)
    jsonschema.validate(summary, summary_schema)
    assert set(summary) == set(summary_schema["properties"])
    assert (summary["schema_version"], summary["complete"], summary["items"]) == (1, True, 2)
    assert (summary["bytes"], summary["sha256"]) == (len(body), hashlib.sha256(body).hexdigest())
    for line in lines:
        jsonschema.validate(line, line_schema)
        assert set(line) == set(line_schema["properties"])
    assert [(x["sku"], x["title"], x["category"], x["fields"]) for x in lines] == [
        ("A", "Title A", "Kitchen", {"brand": "Acme"}),
        ("B", "Title B", "Kitchen", {"brand": "Acme"}),
    ]
    assert (lines[0]["width"], lines[0]["height"], lines[0]["format"]) == (64, 64, "png")
    (first,) = receiver.bodies()
    assert (first["event"], first["complete"], first["completion"], first["items"]) == (
        "run.completed",
        True,
        1,
        2,
    )
    assert first["counts"] == summary["counts"] and first["counts"]["succeeded"] == 2
    assert (first["summary"], first["schema_version"]) == ("r1/manifest.json", SCHEMA_VERSION)

    # the same catalogue enqueued again: complete again, nothing to tell
    stage(engine, [row("A"), row("B")])
    assert downstream.complete(settings, engine, bucket, run_id)
    assert len(receiver.requests) == 1

    # B leaves the catalogue: its item is retired, out of the manifest, its object kept
    stage(engine, [row("A")])
    assert downstream.complete(settings, engine, bucket, run_id)
    summary, lines, _ = published(s3, bucket)
    assert [x["sku"] for x in lines] == ["A"]
    assert (summary["counts"]["retired"], summary["items"], summary["complete"]) == (1, 1, True)
    updated = receiver.bodies()[1]
    assert (updated["event"], updated["completion"]) == ("run.updated", 2)
    assert (updated["counts"]["retired"], updated["counts"]["succeeded"]) == (1, 1)

    assert downstream.prune_retired(engine, bucket, run_id) == 1
    left = s3.client().list_objects_v2(Bucket=name, Prefix="r1/")["Contents"]
    assert sorted(o["Key"] for o in left) == [
        "r1/A/main.png",
        "r1/manifest.json",
        "r1/manifest.jsonl",
    ]
    assert downstream.prune_retired(engine, bucket, run_id) == 0


SCORES = {
    "dark": {"score": 0.91, "threshold": 0.06, "passed": True},
    "duplicate": {"score": 31.0, "threshold": 6.0, "passed": True},
}


def gated(engine: sa.Engine, sku: str, **values: Any) -> None:
    """Set the quality gate's columns of SKU ``sku``'s item, as a worker's finish (or a
    reviewer) would leave them."""
    if isinstance(values.get("quality"), dict):
        values["quality"] = json.dumps(values["quality"], sort_keys=True)
    with engine.begin() as conn:
        conn.execute(sa.update(Item).where(Item.sku == sku).values(**values))


def test_items_for_review_are_in_no_line_and_lines_carry_the_stored_images_seed_and_scores(
    engine: sa.Engine, redis_url: str, s3: LocalS3, receiver: Receiver
) -> None:
    """A run with a checked image (A), one re-rolled twice (B: its line's seed is the
    seed of roll 2, not the item's), one waiting for review (C), one stored without the
    gate (D): C is in no line, every line and the summary are valid against their schemas,
    the run is complete (needs_review is not open) and the summary and the event count C;
    the event counts the re-rolls. Approved, C joins the manifest: run.updated."""
    name = f"test-{secrets.token_hex(6)}"
    s3.client().create_bucket(Bucket=name)
    settings = settings_for(redis_url, receiver.url()).model_copy(
        update={"s3_endpoint_url": s3.endpoint_url, "s3_bucket": name}
    )
    session = boto3.Session(aws_access_key_id=s3.access_key, aws_secret_access_key=s3.secret_key)
    bucket = Bucket(settings, session)
    run_id = stored_run(engine, s3, bucket, "ABCD")
    failed = {**SCORES, "dark": {"score": 0.01, "threshold": 0.06, "passed": False}}
    common = {"image_seed": 1, "roll": 0, "renders": 1, "rerolls": 0}
    gated(engine, "A", **common, verdict="passed", quality=SCORES)
    gated(engine, "B", image_seed=3141592653, roll=2, renders=3, rerolls=2, verdict="passed")
    gated(engine, "B", quality=SCORES)
    gated(engine, "C", status=ItemStatus.NEEDS_REVIEW, roll=2, renders=3, rerolls=2)
    gated(engine, "C", image_seed=27182818, verdict="failed", quality=failed)
    line_schema, summary_schema = json_schema("line"), json_schema("summary")

    assert downstream.complete(settings, engine, bucket, run_id)

    summary, lines, _ = published(s3, bucket)
    jsonschema.validate(summary, summary_schema)
    assert summary["counts"]["needs_review"] == 1 and summary["counts"]["succeeded"] == 3
    assert (summary["complete"], summary["items"]) == (True, 3)
    for line in lines:
        jsonschema.validate(line, line_schema)
        assert set(line) == set(line_schema["properties"])
    by_sku = {line["sku"]: line for line in lines}
    assert sorted(by_sku) == ["A", "B", "D"]
    assert [by_sku[sku]["seed"] for sku in "ABD"] == [1, 3141592653, 1]
    assert [by_sku[sku]["roll"] for sku in "ABD"] == [0, 2, None]
    assert [by_sku[sku]["verdict"] for sku in "ABD"] == ["passed", "passed", None]
    assert by_sku["A"]["quality"] == SCORES and by_sku["D"]["quality"] == {}
    (event,) = receiver.bodies()
    assert event["counts"] == summary["counts"]
    assert (event["needs_review"], event["rerolls"], event["renders"]) == (1, 4, 7)
    assert event["usable_ratio"] == 0.75

    # a reviewer approves C (and so reopens the run): in the manifest now, with its own
    # seed and its failed scores
    gated(engine, "C", status=SUCCEEDED, verdict="approved")
    with engine.begin() as conn:
        conn.execute(sa.update(Run).values(completed_at=None))
    assert downstream.complete(settings, engine, bucket, run_id)
    summary, lines, _ = published(s3, bucket)
    approved = next(line for line in lines if line["sku"] == "C")
    jsonschema.validate(approved, line_schema)
    assert (approved["seed"], approved["verdict"], approved["quality"]) == (
        27182818,
        "approved",
        failed,
    )
    assert summary["counts"]["needs_review"] == 0 and summary["items"] == 4
    updated = receiver.bodies()[1]
    assert (updated["event"], updated["needs_review"], updated["usable_ratio"]) == (
        "run.updated",
        0,
        1.0,
    )


def test_the_manifest_schemas_refuse_what_the_contract_excludes() -> None:
    """The schemas are strict where downstream systems rely on them: a known format, a
    64-hex sha256, every status counted."""
    line_schema = json_schema("line")
    good = {
        "schema_version": 1, "run": "r", "sku": "A", "shot": "front", "key": "r/A/front.png",
        "format": "png", "width": 160, "height": 188, "bytes": 10, "sha256": "0" * 64,
        "title": "Mug", "category": None, "fields": {"brand": None}, "seed": 1, "prompt": "p",
        "negative_prompt": "", "model": "tiny", "drawn_width": 64, "drawn_height": 64,
        "steps": 2, "guidance_scale": 7.5, "scheduler": "default",
    }  # fmt: skip
    jsonschema.validate(good, line_schema)
    checked = {"roll": 1, "verdict": "approved", "quality": SCORES}
    jsonschema.validate({**good, **checked}, line_schema)  # optional: lines before 0007 lack them
    for change in (
        {"format": "gif"},
        {"sha256": "xyz"},
        {"schema_version": 2},
        {"width": 0},
        {"verdict": "failed"},  # a failed image is not in the manifest
        {"roll": -1},
        {"quality": {"dark": {"score": 0.5}}},
    ):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({**good, **change}, line_schema)
    summary = {
        "schema_version": 1, "run": "r", "complete": True, "items": 0, "manifest": "r/m",
        "bytes": 0, "sha256": "0" * 64, "generated_at": "2026-12-03T00:00:00Z",
        "counts": {status.value: 0 for status in ItemStatus},
    }  # fmt: skip
    jsonschema.validate(summary, json_schema("summary"))
    assert "needs_review" in json_schema("summary")["properties"]["counts"]["properties"]
    del summary["counts"]["needs_review"]  # summaries written before revision 0007
    jsonschema.validate(summary, json_schema("summary"))
    del summary["counts"]["retired"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(summary, json_schema("summary"))


def test_upgrading_records_what_is_known_of_stored_images(database_url: str) -> None:
    """Revision 0006 gives stored images their format from their output spec, and their size
    where it is the drawn size (no labels, no max_side); a labelled one's stays unknown. A
    completed run counts one completion, so its next one sends run.updated."""
    engine = ledger.create_engine(database_url)
    upgrade(engine, "0005")
    now = ledger.utcnow()
    outputs = {"PLAIN": "{}", "WEBP": '{"format": "webp"}', "LABELLED": '{"labels": ["a"]}'}
    with engine.begin() as conn:
        conn.execute(
            sa.insert(Run).values(
                id=1, name="mig", model="tiny", seed=0, template="ecommerce", params={},
                stats={}, completed_at=now, created_at=now, updated_at=now,
            )
        )  # fmt: skip
        for sku, output in outputs.items():
            conn.execute(
                sa.insert(Item).values(
                    run_id=1, sku=sku, shot="main", prompt="p", negative_prompt="", seed=1,
                    width=64, height=96, steps=2, guidance_scale=7.5, output=output,
                    status=SUCCEEDED, attempts=1, object_key=f"mig/{sku}/main.png",
                    byte_size=3, sha256="0" * 64, created_at=now, updated_at=now,
                )
            )  # fmt: skip
    upgrade(engine)
    ledger.require_schema(engine)
    with engine.connect() as conn:
        found = {
            r.sku: (r.image_format, r.image_width, r.image_height, r.fields)
            for r in conn.execute(sa.select(Item.__table__))
        }
        completions = conn.execute(sa.select(Run.completions)).scalar_one()
    assert found == {
        "PLAIN": ("png", 64, 96, "{}"),
        "WEBP": ("webp", 64, 96, "{}"),
        "LABELLED": ("png", None, None, "{}"),
    }
    assert completions == 1
    engine.dispose()
