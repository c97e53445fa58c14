"""Catalogues separated by commas, semicolons, tabs or pipes are read as such, and
command-line mistakes are one line naming the flag: through the real ``skufleet`` binary."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.catalogue import Catalogue, Record, parse_delimiter
from skufleet.producer.db import upgrade
from skufleet.producer.lines import detect_delimiter
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from tests.fleet import BIN

ROWS = [["sku", "title", "color"], ["M-1", "Mug, blue", "blue"], ["R-2", "Rug", "red; dark"]]
"""Fields that hold the other delimiters: only the file's own one may split them."""


def write(path: Path, delimiter: str) -> Path:
    """ROWS with ``delimiter``, quoting the fields that hold it (as spreadsheets do)."""
    lines = []
    for row in ROWS:
        lines.append(delimiter.join(f'"{f}"' if delimiter in f else f for f in row))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    """The environment of a `skufleet` process: an upgraded SQLite ledger, the test Redis
    under a private queue prefix, nothing else configured."""
    database_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = ledger.create_engine(database_url)
    upgrade(engine)
    engine.dispose()
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith(("SKUFLEET_", "AWS_"))},
        "SKUFLEET_DATABASE_URL": database_url,
        "SKUFLEET_REDIS_URL": redis_url,
        "SKUFLEET_QUEUE_PREFIX": f"test-{secrets.token_hex(6)}",
    }


def skufleet(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "skufleet"), *args], env=env, capture_output=True, text=True, timeout=120
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command failed with exit code 2 and one plain error line, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


@pytest.mark.parametrize(
    ("header", "delimiter"),
    [
        ("sku,title,color", ","),
        ("sku;title;color", ";"),
        ("sku\ttitle\tcolor", "\t"),
        ("sku|title|color", "|"),
        ("sku;title;Name, long", ";"),  # csv.Sniffer would take the comma here
        ('"sku;id",title,color', ","),  # quoted delimiters do not count
        ("sku", ","),  # one column: nothing to tell, a comma
        ("sku,title;x|y", ","),  # a tie goes to the comma, then ; tab |
    ],
)
def test_the_delimiter_is_the_one_the_header_line_uses_most(header: str, delimiter: str) -> None:
    """Comma, semicolon, tab or pipe, counted outside quotes on the header line."""
    assert detect_delimiter(header) == delimiter


def test_catalogues_with_any_delimiter_give_the_same_records(tmp_path: Path) -> None:
    """The same rows separated by each delimiter read back as the same records."""
    read = []
    for name, char in (("comma", ","), ("semicolon", ";"), ("tab", "\t"), ("pipe", "|")):
        with Catalogue(write(tmp_path / f"{name}.csv", char)) as catalogue:
            assert catalogue.delimiter == char
            read.append([r.fields for r in catalogue if isinstance(r, Record)])
    assert read[0] == [dict(zip(ROWS[0], row, strict=True)) for row in ROWS[1:]]
    assert all(records == read[0] for records in read)


def test_delimiter_names_and_characters_are_accepted_and_others_refused() -> None:
    """--delimiter takes comma, semicolon, tab, pipe or the character itself (\\t for a tab);
    anything else is an error naming the flag."""
    for given, char in (("semicolon", ";"), ("TAB", "\t"), ("\\t", "\t"), ("\t", "\t"), ("|", "|")):
        assert parse_delimiter(given) == char
    with pytest.raises(ConfigError, match=r"^--delimiter must be comma, semicolon, tab or pipe"):
        parse_delimiter(":")


@pytest.mark.parametrize("delimiter", [";", "\t"])  # comma: every other test; pipe: above
def test_enqueue_reads_a_catalogue_in_any_delimiter_without_a_flag(
    env: dict[str, str], tmp_path: Path, delimiter: str
) -> None:
    """`skufleet enqueue` takes the header's delimiter: both rows go in, with their fields
    whole (a title holding a comma, a color holding a semicolon)."""
    catalogue = write(tmp_path / "catalogue.csv", delimiter)
    result = skufleet(env, "enqueue", str(catalogue), "--run", "d", "--model", "tiny", "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert (summary["accepted"], summary["rejected"]) == (2, 0)
    engine = sa.create_engine(env["SKUFLEET_DATABASE_URL"])
    with engine.connect() as conn:
        prompts = [row[0] for row in conn.execute(sa.text("SELECT prompt FROM items"))]
    engine.dispose()
    assert any("Mug, blue" in prompt for prompt in prompts), prompts


def test_enqueue_delimiter_flag_wins_over_the_header(env: dict[str, str], tmp_path: Path) -> None:
    """--delimiter reads the file as told: the right one works, a wrong one stops before any
    work with one line saying how the header was split."""
    catalogue = write(tmp_path / "catalogue.csv", ";")
    args = ("enqueue", str(catalogue), "--run", "d", "--model", "tiny", "--json")
    assert skufleet(env, *args, "--delimiter", ";").returncode == 0
    line = one_error_line(skufleet(env, *args, "--delimiter", "tab"))
    assert "has no column 'sku', 'title'" in line and "(split at tabs)" in line
    assert "--delimiter" in line


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--delimiter", "colon"), "error: --delimiter must be comma, semicolon, tab or pipe"),
        (("--steps", "0"), "error: --steps 0: input should be greater than or equal to 1"),
        (("--size", "100x10"), "error: --size 100x10: width should be a multiple of 8"),
        (("--quality", "500"), "error: --quality must be 1-100, got 500"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(
    tmp_path: Path, flags: tuple[str, ...], message: str
) -> None:
    """A bad value is refused before the ledger is opened, in one line that starts with the
    flag and its value: never pydantic's multi-part report."""
    catalogue = write(tmp_path / "catalogue.csv", ",")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SKUFLEET_", "AWS_"))}
    result = skufleet(env, "enqueue", str(catalogue), "--run", "d", *flags)
    line = one_error_line(result)
    assert line.startswith(message), line
    assert "validation error" not in line and "pydantic" not in line
