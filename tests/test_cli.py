"""The ``skufleet`` command tells the user plainly what is wrong."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import EXAMPLES, Fleet


def test_commands_before_db_upgrade_say_to_run_it(fleet: Fleet) -> None:
    """status and enqueue on an empty database point at `skufleet db upgrade`."""
    for args in (
        ("status", "nope"),
        ("enqueue", str(EXAMPLES / "catalogue.csv"), "--run", "r", "--model", "tiny"),
    ):
        result = fleet.cli(*args)
        assert result.returncode == 2
        assert "run `skufleet db upgrade`" in result.stderr


def test_status_of_an_unknown_run_names_it(fleet: Fleet) -> None:
    """A typo in the run name is an error naming the run, not an empty table."""
    assert fleet.cli("db", "upgrade").returncode == 0
    result = fleet.cli("status", "nope", "--json")
    assert result.returncode == 2
    assert "no run named 'nope'" in result.stderr


def test_enqueue_refuses_bad_arguments_by_name(fleet: Fleet, tmp_path: Path) -> None:
    """A bad size, run name or catalogue header is named in the error."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = str(EXAMPLES / "catalogue.csv")
    cases = {
        ("--size", "big"): "--size must look like 512x512, got 'big'",
        ("--size", "100x100"): "multiple of 8",
        ("--run", "../escape"): "invalid run name '../escape'",
    }
    for extra, message in cases.items():
        args = ["enqueue", catalogue, "--run", "ok", "--model", "tiny", *extra]
        if extra[0] == "--run":
            args = ["enqueue", catalogue, "--model", "tiny", *extra]
        result = fleet.cli(*args)
        assert result.returncode == 2, result.stderr
        assert message in result.stderr
    headerless = tmp_path / "bad.csv"
    headerless.write_text("id,name\n1,x\n")
    result = fleet.cli("enqueue", str(headerless), "--run", "ok", "--model", "tiny")
    assert result.returncode == 2
    assert "no column 'sku', 'title'; columns found: 'id', 'name'" in result.stderr


def test_rejected_records_are_written_as_json_lines(fleet: Fleet, tmp_path: Path) -> None:
    """--rejects lists each bad record with its number, line, reason and detail."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = tmp_path / "c.csv"
    catalogue.write_text("sku,title\nA,one\nA,dup\n,none\nB,two,extra\n")
    rejects = tmp_path / "rejects.jsonl"
    summary = fleet.cli_json(
        "enqueue",
        str(catalogue),
        "--run",
        "rj",
        "--model",
        "tiny",
        "--rejects",
        str(rejects),
        "--json",
    )
    assert {k: summary[k] for k in ("read", "accepted", "rejected", "duplicates", "enqueued")} == {
        "read": 4,
        "accepted": 1,
        "rejected": 2,
        "duplicates": 1,
        "enqueued": 1,
    }
    lines = rejects.read_text().splitlines()
    assert [line.split('"reason": ')[1].split('"')[1] for line in lines] == [
        "duplicate",
        "invalid_sku",
        "ragged",
    ]
    assert '"record": 2, "line": 3' in lines[0]
