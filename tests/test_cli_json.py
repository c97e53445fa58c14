"""Machine-readable output of the run commands: `runs --json` and `cancel --json`."""

from __future__ import annotations

import json

from tests.fleet import Fleet, postgres_only

ONE_SHOT = 'name = "one-shot"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n'


@postgres_only
def test_runs_and_cancel_print_json_lines(fleet: Fleet) -> None:
    """`runs --json` gives one JSON object per run with its counts, model and pack;
    `cancel --json` the number of items it stopped."""
    catalogue = fleet.tmp_path / "c.csv"
    catalogue.write_text("sku,title\nA,Mug\nB,Cup\n")
    pack = fleet.tmp_path / "one-shot.toml"
    pack.write_text(ONE_SHOT)
    assert fleet.cli("db", "upgrade").returncode == 0
    for name in ("first", "second"):
        fleet.cli_json(
            "enqueue", str(catalogue), "--run", name, "--model", "tiny", "--template", str(pack),
            "--json",
        )  # fmt: skip
    assert fleet.cli_json("cancel", "second", "--json") == {"run": "second", "cancelled": 2}
    result = fleet.cli("runs", "--json")
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["run"] for line in lines] == ["second", "first"]  # newest first
    assert lines[0]["counts"]["cancelled"] == 2 and lines[0]["cancelled"] is True
    assert lines[1]["counts"]["queued"] == 2 and lines[1]["model"] == "tiny"
    assert lines[1]["pack"] == "one-shot"
