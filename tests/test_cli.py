"""The ``skufleet`` command tells the user plainly what is wrong."""

from __future__ import annotations

import json
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


def test_rejects_and_long_prompts_are_written_as_json_lines(fleet: Fleet, tmp_path: Path) -> None:
    """--rejects lists each bad record (number, line, reason, detail) and each prompt that
    SD 1.5 would cut at 77 tokens; the long-prompt item is still enqueued."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = tmp_path / "c.csv"
    long_title = " ".join(f"word{i}" for i in range(60))
    catalogue.write_text(f"sku,title\nA,one\nA,dup\n,none\nB,two,extra\nC,{long_title}\n")
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
    assert {
        k: summary[k]
        for k in ("read", "accepted", "rejected", "duplicates", "items", "long_prompts", "enqueued")
    } == {
        "read": 5,
        "accepted": 2,
        "rejected": 2,
        "duplicates": 1,
        "items": 4,
        "long_prompts": 2,
        "enqueued": 4,  # two shots per accepted row
    }
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(e["record"], e["line"], e["reason"]) for e in entries] == [
        (2, 3, "duplicate"),
        (3, 4, "invalid_sku"),
        (4, 5, "ragged"),
        (5, 6, "prompt_too_long"),
        (5, 6, "prompt_too_long"),
    ]
    assert entries[3]["accepted"] is True
    assert "shot 'front'" in entries[3]["detail"] and "SD 1.5 reads 77" in entries[3]["detail"]
    assert "word59" in entries[3]["detail"]  # the part that would be cut is shown


def test_column_mapping_from_the_command_line(fleet: Fleet, tmp_path: Path) -> None:
    """--column sku=ItemID maps a catalogue's own headers; a wrong mapping names the column."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = tmp_path / "c.csv"
    catalogue.write_text("ItemID,Product Name\nX-1,Blue mug\n")
    summary = fleet.cli_json(
        "enqueue",
        str(catalogue),
        "--run",
        "mapped",
        "--model",
        "tiny",
        "--column",
        "sku=ItemID",
        "--column",
        "title=Product Name",
        "--json",
    )
    assert (summary["accepted"], summary["items"]) == (1, 2)
    result = fleet.cli(
        "enqueue", str(catalogue), "--run", "mapped", "--model", "tiny", "--column", "sku=Item_Id"
    )
    assert result.returncode == 2
    assert "column mapping sku='Item_Id'" in result.stderr and "'ItemID'" in result.stderr


def test_template_errors_and_unknown_categories_reject_their_rows(
    fleet: Fleet, tmp_path: Path
) -> None:
    """A row whose category has no template, or whose template names a missing field, is
    rejected with its record, line and the field; the other rows go in."""
    assert fleet.cli("db", "upgrade").returncode == 0
    pack = tmp_path / "pack.toml"
    pack.write_text("""
name = "strict"
[categories.mugs.shots.main]
prompt = "{{ title }}"
[categories.rugs.shots.main]
prompt = "{{ title }} in {{ material }}"
""")
    catalogue = tmp_path / "c.csv"
    catalogue.write_text("sku,title,category\nA,Blue mug,Mugs\nB,Wool rug,Rugs\nC,Hat,Hats\n")
    rejects = tmp_path / "rejects.jsonl"
    summary = fleet.cli_json(
        "enqueue",
        str(catalogue),
        "--run",
        "strict",
        "--model",
        "tiny",
        "--template",
        str(pack),
        "--rejects",
        str(rejects),
        "--json",
    )
    assert (summary["accepted"], summary["rejected"], summary["items"]) == (1, 2, 1)
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(e["record"], e["line"], e["reason"]) for e in entries] == [
        (2, 3, "template"),
        (3, 4, "unknown_category"),
    ]
    assert "'material' is undefined" in entries[0]["detail"]
    assert "'Hats'" in entries[1]["detail"] and "mugs, rugs" in entries[1]["detail"]
