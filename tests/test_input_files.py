"""The producer's commands refuse files they must not write, and bad rows only cost themselves.

These run ``skufleet`` in-process (typer's CliRunner) against a real SQLite ledger and the
test Redis, so a command gets as far as it would in production before it opens a file.
"""

from __future__ import annotations

import gzip
import json
import os
import secrets
from pathlib import Path

import pytest
from typer.testing import CliRunner, Result

from skufleet.producer.cli import app
from skufleet.producer.db import upgrade
from skufleet.schemas import ledger

CATALOGUE = b"sku,title\nA,Blue mug\nB,Red rug\n"


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """SKUFLEET_* settings for an upgraded SQLite ledger and a private queue prefix."""
    database_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = ledger.create_engine(database_url)
    upgrade(engine)
    engine.dispose()
    return {
        "SKUFLEET_DATABASE_URL": database_url,
        "SKUFLEET_REDIS_URL": redis_url,
        "SKUFLEET_QUEUE_PREFIX": f"test-{secrets.token_hex(6)}",
    }


def skufleet(env: dict[str, str], *args: str) -> Result:
    return CliRunner().invoke(app, list(args), env=env)


def enqueue(env: dict[str, str], catalogue: Path, *args: str) -> Result:
    return skufleet(env, "enqueue", str(catalogue), "--run", "r", "--model", "tiny", *args)


def one_error_line(result: Result) -> str:
    """The command failed with exit code 2 and one plain error line, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stderr, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize("alias", ["same path", "another spelling", "symlink", "hard link"])
def test_rejects_that_is_the_catalogue_is_refused_before_anything_is_written(
    env: dict[str, str], tmp_path: Path, alias: str
) -> None:
    """--rejects naming the catalogue itself, by another spelling, or through a symbolic or
    hard link is refused by flag and path, and the catalogue is left as it was."""
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_bytes(CATALOGUE)
    (tmp_path / "sub").mkdir()
    rejects = {
        "same path": catalogue,
        "another spelling": tmp_path / "sub" / ".." / "catalogue.csv",
        "symlink": tmp_path / "rejects.jsonl",
        "hard link": tmp_path / "rejects.jsonl",
    }[alias]
    if alias == "symlink":
        rejects.symlink_to(catalogue)
    elif alias == "hard link":
        os.link(catalogue, rejects)
    line = one_error_line(enqueue(env, catalogue, "--rejects", str(rejects)))
    assert f"--rejects {rejects} is an input of this command" in line
    assert catalogue.read_bytes() == CATALOGUE


def test_rejects_that_is_the_template_pack_is_refused(env: dict[str, str], tmp_path: Path) -> None:
    """The pack is an input too: --rejects over it is refused and the pack kept."""
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_bytes(CATALOGUE)
    pack = tmp_path / "pack.toml"
    pack.write_text('name = "p"\n[categories.default.shots.front]\nprompt = "{{ title }}"\n')
    before = pack.read_bytes()
    line = one_error_line(enqueue(env, catalogue, "--template", str(pack), "--rejects", str(pack)))
    assert f"--rejects {pack} is an input of this command" in line
    assert pack.read_bytes() == before


@pytest.mark.parametrize(
    "command",
    [
        ("enqueue", "CATALOGUE", "--run", "r", "--model", "tiny", "--rejects"),
        ("manifest", "r", "--out"),
        ("presign", "r", "--out"),
    ],
    ids=["enqueue-rejects", "manifest-out", "presign-out"],
)
def test_an_output_file_in_a_missing_directory_is_one_clear_line(
    env: dict[str, str], tmp_path: Path, command: tuple[str, ...]
) -> None:
    """An output file whose directory does not exist is named, with the directory, in one
    error line instead of a traceback."""
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_bytes(CATALOGUE)
    target = tmp_path / "missing" / "out.jsonl"
    args = [str(catalogue) if arg == "CATALOGUE" else arg for arg in command]
    line = one_error_line(skufleet(env, *args, str(target)))
    assert f"{command[-1]} {target}: the directory {target.parent} does not exist" in line


def test_an_output_file_that_is_a_directory_is_one_clear_line(
    env: dict[str, str], tmp_path: Path
) -> None:
    """--out naming a directory says so instead of failing with IsADirectoryError."""
    line = one_error_line(skufleet(env, "manifest", "r", "--out", str(tmp_path)))
    assert f"--out {tmp_path} is a directory" in line


def test_rows_whose_template_fails_are_rejected_and_the_rest_go_in(
    env: dict[str, str], tmp_path: Path
) -> None:
    """A division by zero or a runaway loop in one row's template rejects that row as
    `template` with the error, and the other rows are enqueued."""
    pack = tmp_path / "pack.toml"
    pack.write_text(
        'name = "p"\n[categories.default.shots.front]\nprompt = """{{ title }}, '
        "{{ 100 // (stock|int) }}% off"
        "{% for i in range(loops|int) %}{% for j in range(loops|int) %}{% endfor %}{% endfor %}"
        '"""\n'
    )
    catalogue = tmp_path / "catalogue.csv"
    catalogue.write_text("sku,title,stock,loops\nA,Mug,4,1\nB,Rug,0,1\nC,Hat,5,1000\nD,Cup,10,2\n")
    rejects = tmp_path / "rejects.jsonl"
    result = enqueue(env, catalogue, "--template", str(pack), "--rejects", str(rejects), "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    summary = json.loads(result.stdout)
    assert (summary["read"], summary["accepted"], summary["rejected"]) == (4, 2, 2)
    assert summary["reasons"] == {"template": 2}
    entries = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert [(e["record"], e["reason"]) for e in entries] == [(2, "template"), (3, "template")]
    assert "ZeroDivisionError" in entries[0]["detail"]
    assert "loop iterations and calls" in entries[1]["detail"]


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("catalogue.csv.gz", "is a gzip file, not CSV: decompress it first"),
        ("catalogue.d", "is a directory, not a CSV file"),
    ],
)
def test_enqueue_of_a_file_that_is_not_a_csv_says_what_it_is(
    env: dict[str, str], tmp_path: Path, name: str, message: str
) -> None:
    """A gzipped catalogue or a directory is one error line naming the path and the kind."""
    path = tmp_path / name
    if name.endswith(".gz"):
        path.write_bytes(gzip.compress(CATALOGUE))
    else:
        path.mkdir()
    line = one_error_line(enqueue(env, path))
    assert f"catalogue {path} {message}" in line
