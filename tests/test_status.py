"""What `skufleet status` and `skufleet runs` tell: failures grouped by kind of error, a pace
and ETA from the run's own recent work, succeeded kept apart from failed, tables that fit."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa
from rich.console import Console

from skufleet.producer.status import (
    Snapshot,
    _Headline,
    eta_seconds,
    format_eta,
    items_per_second,
    run_state,
    runs_table,
    status_view,
)
from skufleet.schemas import ledger
from skufleet.schemas.tables import Item, ItemStatus, Run
from tests.test_ledger import add_run, claim

# --- failures by kind ----------------------------------------------------------------------

SAME_KIND = [
    # the worker's describe_error of a 4xx upload, for two items (worker/storage.py)
    (
        "StorageRefused: upload of 'spring-2026/SKU-1/front.png' refused: An error occurred "
        "(InvalidRequest) when calling the PutObject operation: Bad Request",
        "StorageRefused: upload of 'spring-2026/X 9/e3b0c44298fc1c14/lifestyle.png' refused: "
        "An error occurred (InvalidRequest) when calling the PutObject operation: Bad Request",
        "StorageRefused: upload of … refused: An error occurred (InvalidRequest) when calling "
        "the PutObject operation: Bad Request",
    ),
    # a model error naming the prompt (tests/fixtures/pipelines.py)
    (
        "RuntimeError: poisoned prompt: 'a POISON mug 3'",
        'RuntimeError: poisoned prompt: "a kid\'s POISON cup"',
        "RuntimeError: poisoned prompt: …",
    ),
    # the renderer's key check (worker/render.py), with the item id and its key
    (
        "ItemError: item 123's object key 'r/A/front.png' does not end in .webp, the format "
        "of its image",
        "ItemError: item 98765's object key 'r/B-2/front.png' does not end in .webp, the "
        "format of its image",
        "ItemError: item N's object key … does not end in .webp, the format of its image",
    ),
    # the reconciler's expired lease (schemas/ledger/recovery.py), naming the worker
    (
        "lease expired before its worker finished: gpu0@render-host-a",
        "lease expired before its worker finished: gpu3@render-host-b.internal",
        "lease expired before its worker finished: …",
    ),
    # a released item after a device failure (worker/render.py _release)
    (
        "device failure: DeviceError: out of memory on cuda:0 (NVIDIA H200) for a single "
        "1024×1024 image: CUDA out of memory. Tried to allocate 2.50 GiB",
        "device failure: DeviceError: out of memory on cuda:0 (NVIDIA H200) for a single "
        "768×512 image: CUDA out of memory. Tried to allocate 1.25 GiB",
        "device failure: DeviceError: out of memory on cuda:N (NVIDIA H200) for a single N×N "
        "image: CUDA out of memory. Tried to allocate N GiB",
    ),
    # storage down, with the endpoint's URL quoted by botocore (worker/storage.py)
    (
        "StorageUnavailable: upload of 'r/A/front.png' failed: Could not connect to the "
        'endpoint URL: "http://minio:9000/catalogue/r/A/front.png"',
        "StorageUnavailable: upload of 'r/B/front.png' failed: Could not connect to the "
        "endpoint URL: http://minio:9000/catalogue/r/B/front.png",
        "StorageUnavailable: upload of … failed: Could not connect to the endpoint URL: …",
    ),
    # ids, hashes and tracebacks: only the first line, without what is the item's
    (
        "ValueError: no shot for SKU-00042 (sha256 9f86d081884c7d65)\nTraceback (most recent",
        "ValueError: no shot for AB_77 (sha256 0a08e3b0c44298fc)\n  File x.py",
        "ValueError: no shot for … (sha256 …)",
    ),
]


@pytest.mark.parametrize(("one", "other", "kind"), SAME_KIND)
def test_errors_of_different_items_are_one_kind(one: str, other: str, kind: str) -> None:
    """Two items failing the same way give the same kind, which keeps the error's words and
    none of the item's: keys, prompts, ids, workers, URLs and numbers go."""
    assert ledger.error_kind(one) == ledger.error_kind(other) == kind


def test_error_kinds_keep_plain_text_and_are_bounded() -> None:
    """Text without item data is its own kind, user text with markup included; no error is
    a kind of its own, and a long one is cut."""
    for text in (
        "flagged by the safety checker; not uploaded",
        "handed back: Stopping: the worker is stopping while the ledger is down",
        "[/] boom [bold]in bold?",
    ):
        assert ledger.error_kind(text) == text
    assert ledger.error_kind(None) == ledger.error_kind("  ") == "no error recorded"
    long = ledger.error_kind("RuntimeError: " + "word " * 100)
    assert len(long) == ledger.reports.KIND_CHARACTERS and long.endswith("…")


# --- pace and ETA --------------------------------------------------------------------------


def test_the_eta_of_a_run_in_its_first_seconds_is_its_own_pace() -> None:
    """8 images finished 6 s into a 1,000-image run: 1.33 items/s and 12 min 24 s left,
    where a fixed 60 s window said 0.13 items/s and over two hours."""
    rate = items_per_second(8, 6.0)
    assert rate == pytest.approx(8 / 6)
    assert format_eta(992, rate) == "0:12:24"
    assert format_eta(992, 8 / 60) == "2:04:00"  # what a fixed minute said


def test_the_eta_is_a_dash_until_there_is_data_and_done_at_the_end() -> None:
    """No finished item, or under a second measured: no rate, ETA —; nothing remaining:
    done, whatever the rate."""
    assert items_per_second(0, 30.0) is None
    assert items_per_second(3, 0.5) is None
    assert format_eta(10, None) == "—" and eta_seconds(10, None) is None
    assert format_eta(0, None) == format_eta(0, 2.0) == "done" and eta_seconds(0, None) == 0
    assert format_eta(8, 1.0) == "0:00:08"  # a run at 1 item/s with 8 left ends in 8 s


# --- the view ------------------------------------------------------------------------------


def counts(**given: int) -> dict[str, int]:
    return {status.value: given.get(status.value, 0) for status in ItemStatus}


def status(**given: int) -> ledger.RunStatus:
    return ledger.RunStatus("r", counts(**given), attempts=0)


def test_the_bar_fills_with_succeeded_and_shows_failed_in_its_own_colour() -> None:
    """5 succeeded, 1 failed, 4 open of 10 on 10 cells: 5 green, 1 red, 4 grey; a single
    failure among 10,000 items still gets its red cell."""
    bar = _Headline("r", status(succeeded=5, failed=1, queued=4)).bar(10)
    cells = [str(span.style) for span in bar.spans for _ in range(span.end - span.start)]
    assert cells == ["green"] * 5 + ["red"] + ["bright_black"] * 4
    rare = _Headline("r", status(succeeded=9999, failed=1)).bar(40)
    assert [str(span.style) for span in rare.spans].count("red") == 1 and len(rare) == 40


def render(renderable: object, width: int = 80) -> str:
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(renderable)
    return console.export_text()


def test_status_counts_succeeded_apart_from_failed_and_shows_retries() -> None:
    """The figures say 5/10 succeeded and 1 failed (never 6/10 done), the open items and
    those retrying, and each kind of failure and retry with its count."""
    snap = Snapshot(
        ledger.RunStatus("r", counts(succeeded=5, failed=1, queued=3, running=1), attempts=12),
        finished_recently=6,
        measured_seconds=3.0,
        failures=[("RuntimeError: poisoned prompt: …", 1)],
        retrying=2,
        retry_reasons=[("lease expired before its worker finished: …", 2)],
    )
    text = render(status_view("r", snap))
    assert "5/10 succeeded · 1 failed · 4 open (2 retrying) · 2.00 items/s · ETA 0:00:02" in text
    assert "6/10" not in text
    assert "failures by kind" in text and "1  RuntimeError: poisoned prompt: …" in text
    assert "retrying: 2 items" in text and "lease expired before its worker finished" in text
    assert snap.as_dict()["retrying"] == {
        "count": 2,
        "by_kind": [{"kind": "lease expired before its worker finished: …", "count": 2}],
    }


def test_usable_share_counts_finished_items_only_and_renders_count_per_stored_image() -> None:
    """Usable = succeeded / (succeeded + needs_review + failed): cancelled, retired and open
    items count for nothing; renders per stored image divides by succeeded + needs_review;
    neither is given before there is anything to divide by."""
    gated = ledger.RunStatus(
        "r",
        counts(succeeded=18, needs_review=1, failed=1, cancelled=5, retired=7, queued=3),
        attempts=25,
        renders=38,
        rerolls=12,
    )
    assert gated.done == 25 and gated.total == 28 and gated.stored == 19
    assert gated.usable_ratio == pytest.approx(0.9) and gated.renders_per_item == 2.0
    assert {k: gated.as_dict()[k] for k in ("needs_review", "renders", "rerolls")} == {
        "needs_review": 1,
        "renders": 38,
        "rerolls": 12,
    }
    assert (gated.as_dict()["usable_ratio"], gated.as_dict()["renders_per_item"]) == (0.9, 2.0)
    fresh = status(queued=4, cancelled=2)
    assert (fresh.usable_ratio, fresh.renders_per_item) == (None, None)
    assert fresh.as_dict()["usable_ratio"] is None and fresh.as_dict()["renders"] == 0


def test_status_shows_the_usable_share_re_rolls_and_what_waits_for_review() -> None:
    """A run with items waiting for review: the figures line counts them, a quality line
    gives the usable share, re-rolls and renders per stored image, and a line says how many
    wait with the command that shows them; `--json` has the same figures."""
    snap = Snapshot(
        ledger.RunStatus(
            "spring",
            counts(succeeded=45, needs_review=4, failed=1),
            attempts=50,
            renders=60,
            rerolls=10,
        ),
        finished_recently=0,
        measured_seconds=0.0,
        failures=[],
        retrying=0,
        retry_reasons=[],
    )
    text = render(status_view("spring", snap))
    assert "45/50 succeeded · 1 failed · 4 to review · 0 open" in text
    assert "quality: 90.0% usable · 10 re-rolls · 60 renders, 1.22 per stored image" in text
    assert "waiting for review: 4 · skufleet review spring" in text
    assert "needs_review" in text and "cancelled" not in text  # the counts table's columns
    assert all(len(line) <= 80 for line in text.splitlines())
    figures = snap.as_dict()
    assert figures["waiting_for_review"] == {"count": 4, "hint": "skufleet review spring"}
    assert (figures["usable_ratio"], figures["rerolls"], figures["renders_per_item"]) == (
        0.9,
        10,
        1.224,
    )
    assert figures["counts"]["needs_review"] == 4 and figures["done"] == 50
    quiet = Snapshot(status(queued=3), 0, 0.0, [], 0, [])
    shown = render(status_view("r", quiet))
    assert "quality:" not in shown and "waiting for review" not in shown
    assert quiet.as_dict()["waiting_for_review"] == {"count": 0, "hint": None}


def summary(name: str, model: str, **given: int) -> ledger.RunSummary:
    status = ledger.RunStatus(name, counts(**given), attempts=0)
    created = datetime(2026, 11, 27, 9, 30, tzinfo=UTC)
    return ledger.RunSummary(name, model, "ecommerce", created, False, status)


def test_runs_fit_80_columns_by_leaving_out_columns_never_cutting_names() -> None:
    """At 80 columns the run names stay whole and the last columns (pack, model) go; at 200
    every column is there; no cell is cut with an ellipsis."""
    model = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    found = [
        summary(
            "spring-catalogue-2026-shoes-and-bags", model, succeeded=10**6, failed=12, queued=40
        ),
        summary("generate-20261127-093000-ab12", "tiny", succeeded=4),
    ]
    narrow = render(runs_table(found, 80), 80)
    assert "spring-catalogue-2026-shoes-and-bags" in narrow and "generate-20261127-093000" in narrow
    assert "…" not in narrow and "stable-diffusion" not in narrow
    assert all(len(line.rstrip()) <= 80 for line in narrow.splitlines())
    assert "running" in narrow and "done" in narrow
    wide = render(runs_table(found, 200), 200)
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in wide and "ecommerce" in wide
    assert "2026-11-27 09:30" in wide and "…" not in wide


def test_runs_show_items_waiting_for_review_where_the_terminal_has_room() -> None:
    """A run done but for items waiting for review is in state `review`, one with failures
    too `failed`; the `review` column comes right after `open` when it fits 80 columns (a
    million items beside a long name leave it out: `runs --json` has it)."""
    found = [
        summary("spring-catalogue-2026-shoes-and-bags", "tiny", succeeded=180, needs_review=3),
        summary("generate-20261127-093000-ab12", "tiny", succeeded=2, needs_review=1, failed=1),
        summary("summer", "tiny", succeeded=4),
    ]
    assert [run_state(run) for run in found] == ["review", "failed", "done"]
    narrow = render(runs_table(found, 80), 80)
    assert all(len(line.rstrip()) <= 80 for line in narrow.splitlines())
    assert "spring-catalogue-2026-shoes-and-bags" in narrow and "review" in narrow
    header = narrow.splitlines()[0].split()
    assert header[: header.index("review") + 1] == [
        "run",
        "state",
        "succeeded",
        "failed",
        "open",
        "review",
    ]
    found[0] = summary(found[0].name, "tiny", succeeded=10**6, needs_review=3)
    crowded = render(runs_table(found, 80), 80)
    assert all(len(line.rstrip()) <= 80 for line in crowded.splitlines())
    assert crowded.splitlines()[0].split() == ["run", "state", "succeeded", "failed", "open"]


# --- the ledger's figures ------------------------------------------------------------------


def set_times(engine: sa.Engine, ids: list[int], **values: datetime) -> None:
    with engine.begin() as conn:
        conn.execute(sa.update(Item).where(Item.id.in_(ids)).values(**values))


def test_the_pace_is_measured_from_the_runs_first_claim_within_the_window(
    engine: sa.Engine,
) -> None:
    """A run whose items were claimed 10 s ago, two finished: 2 items over 10 s. Claimed 5
    minutes ago: over the last minute only."""
    ids = add_run(engine, 4)
    claim(engine, ids, "gpu0@a")
    now = ledger.utcnow()
    set_times(engine, ids, started_at=now - timedelta(seconds=10))
    with engine.begin() as conn:  # two stored a second ago, as the worker's finish leaves them
        conn.execute(
            sa.update(Item)
            .where(Item.id.in_(ids[:2]))
            .values(status=ItemStatus.SUCCEEDED, finished_at=now - timedelta(seconds=1))
        )
    with ledger.connect(engine) as conn:
        finished, seconds = ledger.recent_finishes(conn, "r1", now, timedelta(seconds=60))
    assert finished == 2 and seconds == pytest.approx(10, abs=0.5)
    set_times(engine, ids, started_at=now - timedelta(minutes=5))
    with ledger.connect(engine) as conn:
        assert ledger.recent_finishes(conn, "r1", now, timedelta(seconds=60)) == (2, 60.0)


def test_the_ledger_sums_renders_and_re_rolls_and_the_pace_counts_items_for_review(
    engine: sa.Engine,
) -> None:
    """run_status and list_runs add up every item's renders and re-rolls (a retired one's
    too); an item finished as needs_review counts in the pace like a succeeded one."""
    ids = add_run(engine, 4)
    now = ledger.utcnow()
    columns = [
        (ItemStatus.SUCCEEDED, 1, 0),
        (ItemStatus.SUCCEEDED, 3, 2),
        (ItemStatus.NEEDS_REVIEW, 3, 2),
        (ItemStatus.RETIRED, 2, 1),
    ]
    with engine.begin() as conn:
        for item_id, (state, renders, rerolls) in zip(ids, columns, strict=True):
            conn.execute(
                sa.update(Item)
                .where(Item.id == item_id)
                .values(
                    status=state,
                    renders=renders,
                    rerolls=rerolls,
                    started_at=now - timedelta(seconds=10),
                    finished_at=now - timedelta(seconds=1),
                )
            )
    with ledger.connect(engine) as conn:
        found = ledger.run_status(conn, "r1")
        (listed,) = ledger.list_runs(conn)
        finished, _ = ledger.recent_finishes(conn, "r1", now, timedelta(seconds=60))
    assert (found.renders, found.rerolls, found.needs_review) == (9, 5, 1)
    assert listed.status == found
    assert found.usable_ratio == pytest.approx(2 / 3) and found.renders_per_item == 3.0
    assert finished == 3  # two succeeded and the one for review; the retired one is not


def test_retrying_items_are_open_ones_with_an_earlier_error(engine: sa.Engine) -> None:
    """An item back on the queue after a retryable error and one released by a failed
    device are retrying, grouped by kind; a running first attempt and a failed item are
    not."""
    ids = add_run(engine, 4)
    drawn = claim(engine, ids, "gpu0@a")
    for one in drawn[:2]:
        error = f"StorageRefused: upload of 'r1/SKU-{one.id}/main.png' refused: 400"
        assert ledger.fail(engine, one, error, retry=True, max_attempts=3) is ItemStatus.QUEUED
    assert ledger.fail(engine, drawn[2], "ItemError: bad", retry=False, max_attempts=3)
    with ledger.connect(engine) as conn:
        count, kinds = ledger.retrying(conn, "r1")
        failures = ledger.failure_reasons(conn, "r1")
    assert (count, kinds) == (2, [("StorageRefused: upload of … refused: N", 2)])
    assert failures == [("ItemError: bad", 1)]


def test_runs_for_dashboards_are_the_open_ones_and_those_active_lately(engine: sa.Engine) -> None:
    """``list_runs(active_since=…)`` keeps a run with open items however old, a run done
    today, and leaves out a run done and untouched for two days."""
    for name in ("old-open", "old-done", "new-done"):
        add_run(engine, 1, name)
    old = ledger.utcnow() - timedelta(days=2)
    with engine.begin() as conn:
        conn.execute(sa.update(Run).values(created_at=old, updated_at=old))
        done = sa.select(Run.id).where(Run.name.in_(["old-done", "new-done"]))
        conn.execute(
            sa.update(Item).where(Item.run_id.in_(done)).values(status=ItemStatus.SUCCEEDED)
        )
        conn.execute(
            sa.update(Run).where(Run.name == "new-done").values(completed_at=ledger.utcnow())
        )
    with ledger.connect(engine) as conn:
        recent = ledger.list_runs(conn, active_since=ledger.utcnow() - timedelta(days=1))
        every = ledger.list_runs(conn)
    assert sorted(run.name for run in recent) == ["new-done", "old-open"]
    assert len(every) == 3


class _Broker:
    """A stand-in for the Publisher the exporter asks for queue lengths."""

    def queue_length(self, queue: str) -> int:
        return 0


def test_the_exporter_serves_each_runs_review_items_re_rolls_and_usable_share(
    engine: sa.Engine,
) -> None:
    """`skufleet metrics` has a gauge per run for its items waiting for review, its
    re-rolls, its renders and its usable share (no sample before an item is finished)."""
    from skufleet.producer.metrics import FleetCollector
    from skufleet.schemas.settings import Settings

    ids = add_run(engine, 4)
    add_run(engine, 1, "fresh")
    with engine.begin() as conn:
        states = ["succeeded", "succeeded", "needs_review", "failed"]
        for item_id, state in zip(ids, states, strict=True):
            conn.execute(
                sa.update(Item).where(Item.id == item_id).values(status=state, renders=2, rerolls=1)
            )
    collector = FleetCollector(Settings(), engine, _Broker())  # type: ignore[arg-type]
    samples = {
        (sample.name, sample.labels.get("run")): sample.value
        for family in collector.collect()
        for sample in family.samples
    }
    assert samples[("skufleet_run_needs_review_items", "r1")] == 1
    assert samples[("skufleet_run_rerolls", "r1")] == 4
    assert samples[("skufleet_run_renders", "r1")] == 8
    assert samples[("skufleet_run_usable_ratio", "r1")] == 0.5
    assert samples[("skufleet_items", "r1")] is not None
    assert ("skufleet_run_usable_ratio", "fresh") not in samples
    assert samples[("skufleet_run_needs_review_items", "fresh")] == 0
