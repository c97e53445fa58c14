"""Exit codes tell the truth: a command that finished with failures exits 1, through the
real installed commands against real services."""

from __future__ import annotations

import subprocess

import sqlalchemy as sa

from skufleet.schemas.tables import Item, ItemStatus
from tests.fixtures import stand_in_worker
from tests.fleet import BIN, Fleet, postgres_only

ONE_SHOT = 'name = "one-shot"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n'


def enqueue(fleet: Fleet, rows: str) -> subprocess.CompletedProcess[str]:
    catalogue = fleet.tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title\n" + rows)
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(ONE_SHOT)
    assert fleet.cli("db", "upgrade").returncode == 0
    return fleet.cli(
        "enqueue", str(catalogue), "--run", "r", "--model", "tiny", "--template", str(pack),
        "--rejects", str(fleet.tmp_path / "rejects.jsonl"), "--json",
    )  # fmt: skip


@postgres_only
def test_an_enqueue_that_accepts_no_record_creates_no_run_and_exits_1(fleet: Fleet) -> None:
    """Every row rejected (empty and control-character SKUs): one line, exit 1, the rejects
    written, and no run left behind, empty and marked done."""
    result = enqueue(fleet, ",No SKU\n\x01bad,Control\n")
    assert result.returncode == 1, result.stderr
    assert "no record of" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert len((fleet.tmp_path / "rejects.jsonl").read_text().splitlines()) == 2
    missing = fleet.cli("status", "r")
    assert missing.returncode == 2 and "no run named 'r'" in missing.stderr


@postgres_only
def test_status_watch_exits_1_when_the_run_ends_with_failures(fleet: Fleet) -> None:
    """`status --watch` returns once every item is done: 0 when all succeeded, 1 when any
    failed."""
    assert enqueue(fleet, "A,Mug\nB,Cup\n").returncode == 0
    engine = fleet.engine()
    with engine.begin() as conn:
        conn.execute(sa.update(Item).values(status=ItemStatus.SUCCEEDED))
    assert fleet.cli("status", "r", "--watch").returncode == 0
    with engine.begin() as conn:
        conn.execute(
            sa.update(Item).where(Item.sku == "B").values(status=ItemStatus.FAILED, last_error="x")
        )
    engine.dispose()
    assert fleet.cli("status", "r", "--watch").returncode == 1
    assert fleet.cli("status", "r").returncode == 0  # a look is not a verdict


@postgres_only
def test_generate_exits_1_when_an_image_fails(fleet: Fleet) -> None:
    """`skufleet generate` of a prompt the (stand-in) model cannot draw: the fleet fails the
    item after its attempts, the command prints no path and exits 1."""
    assert fleet.cli("db", "upgrade").returncode == 0
    fleet.env["SKUFLEET_MAX_ATTEMPTS"] = "1"
    with fleet.background(*stand_in_worker("--fixture", "poison", burst=False)):
        result = fleet.run(
            str(BIN / "skufleet"), "generate", "a POISON mug", "-n", "1", "--model", "tiny",
            "--out", str(fleet.tmp_path), "--timeout", "120",
        )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert result.stdout.strip() == "" and "1 of 1 images failed" in result.stderr


def test_version_and_short_help() -> None:
    """`--version` prints the installed version; `-h` is `--help` on every command, and
    the help shows every default."""
    version = subprocess.run([str(BIN / "skufleet"), "--version"], capture_output=True, text=True)
    assert version.returncode == 0 and version.stdout.startswith("skufleet ")
    for args in ([], ["enqueue"], ["db"]):
        shown = subprocess.run([str(BIN / "skufleet"), *args, "-h"], capture_output=True, text=True)
        assert shown.returncode == 0 and "Usage:" in shown.stdout, args
    # defaults stay visible: bracketed text in help is not read as markup
    enqueue = subprocess.run(
        [str(BIN / "skufleet"), "enqueue", "-h"], capture_output=True, text=True
    )
    assert "WxH [pack/model default]" in enqueue.stdout and "[default: 8]" in enqueue.stdout


def test_usage_errors_are_one_line_naming_the_flag_and_exit_2() -> None:
    """A bad value, an unknown option or command and a missing argument are each one line
    on stderr that names what was wrong, with exit code 2 and no traceback or usage block."""
    cases = {
        ("enqueue", "c.csv", "--run", "r", "--steps", "many"): "'--steps'",
        ("runs", "--bogus"): "--bogus",
        ("nosuch",): "'nosuch'",
        ("enqueue",): "'catalogue'",
    }
    for args, named in cases.items():
        result = subprocess.run([str(BIN / "skufleet"), *args], capture_output=True, text=True)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2, (args, result.stderr)
        assert len(lines) == 1 and lines[0].startswith("error: ") and named in lines[0], lines
        assert "Traceback" not in result.stderr and not result.stdout
