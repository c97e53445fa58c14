"""The ``skufleet`` command tells the user plainly what is wrong."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path

import pytest
import sqlalchemy as sa

from skufleet.producer.db import upgrade
from skufleet.producer.services import free_port
from skufleet.schemas import ledger
from skufleet.schemas.errors import (
    BrokerUnavailable,
    CatalogueError,
    ConfigError,
    ItemError,
    LedgerUnavailable,
    ModelLoadError,
    SchemaMissingError,
    SkufleetError,
    StorageUnavailable,
    exit_code,
)
from skufleet.schemas.tables import Item, ItemStatus, Run
from tests.fleet import BIN, EXAMPLES, Fleet, postgres_only


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
        ("--checks", "dark,glare"): "--checks 'dark,glare': unknown check 'glare'; known: dark",
        ("--threshold", "dark=9"): "--threshold dark=9: dark's threshold must be 0-1",
        ("--threshold", "clip=25"): "--threshold clip=25: the run does not check clip",
        ("--max-rolls", "9"): "--max-rolls 9: must be 0-8",
        ("--candidates", "0"): "--candidates 0: must be 1-8",
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


GATED_PACK = """name = "gated"
[quality]
checks = ["dark", "blank", "safety"]
thresholds = { dark = 0.1, blank = 0.05 }
max_rolls = 4
[categories.default.shots.main]
prompt = "{{ title }}"
"""


def test_enqueue_stores_the_quality_gate_of_the_pack_and_the_flags(
    fleet: Fleet, tmp_path: Path
) -> None:
    """The run's Run.params["quality"] is the pack's [quality] with the flags over it, key
    by key and threshold by threshold; enqueued again with --checks none the gate is off;
    a bad quality flag is one line naming it, exit 2, and leaves the run as it was."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = tmp_path / "c.csv"
    catalogue.write_text("sku,title\nA,Mug\n")
    pack = tmp_path / "gated.toml"
    pack.write_text(GATED_PACK)
    base = ("enqueue", str(catalogue), "--run", "gated", "--model", "tiny", "--template", str(pack))

    summary = fleet.cli_json(*base, "--threshold", "dark=0.2", "--candidates", "2", "--json")

    expected = {
        "checks": ["dark", "blank", "safety"],
        "default_checks": False,
        "thresholds": {"dark": 0.2, "blank": 0.05, "safety": 0.5},
        "max_rolls": 4,
        "candidates": 2,
    }
    assert summary["quality"] == expected
    engine = fleet.engine()
    read = sa.select(Run.params).where(Run.name == "gated")
    with engine.connect() as conn:
        params = conn.execute(read).scalar_one()
    assert params["quality"] == expected and params["batch_size"] == 8
    shown = fleet.cli(*base)
    assert "dark, blank, safety; up to 4 re-rolls, 1 candidate" in shown.stdout, shown.stderr

    bad = fleet.cli(*base, "--checks", "dark,glare")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1, bad.stderr
    assert "--checks 'dark,glare': unknown check 'glare'; known: dark, blank, flat" in bad.stderr
    off = fleet.cli_json(*base, "--checks", "none", "--json")
    assert off["quality"] == {
        "checks": [],
        "default_checks": False,
        "thresholds": {},
        "max_rolls": 0,
        "candidates": 1,
    }
    with engine.connect() as conn:
        assert conn.execute(read).scalar_one()["quality"]["checks"] == []
    engine.dispose()


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


PASSWORD = "s3cr3t-pa55"
"""Put in every URL below; it must never appear in what a command prints."""


def skufleet(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The installed command with ``env`` over this environment, 200 columns wide."""
    return subprocess.run(
        [str(BIN / "skufleet"), *args],
        env={**os.environ, "COLUMNS": "200", **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def error_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The one line a failed command printed, checked: exit ``code``, nothing else on stderr,
    no password anywhere."""
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert PASSWORD not in result.stdout + result.stderr
    return lines[0]


def with_env(fleet: Fleet, **env: str) -> Fleet:
    return dataclasses.replace(fleet, env={**fleet.env, **env})


def test_every_error_class_exits_with_the_documented_code() -> None:
    """0 all done, 1 finished with failures, 2 usage or configuration, 3 a service
    unreachable: one function maps every skufleet error for every entry point."""
    assert [
        exit_code(error)
        for error in (
            SkufleetError(),
            ItemError(),
            ValueError(),
            ConfigError(),
            SchemaMissingError(),
            CatalogueError(),
            ModelLoadError(),
            StorageUnavailable(),
            LedgerUnavailable(),
            BrokerUnavailable(),
        )
    ] == [1, 1, 1, 2, 2, 2, 2, 3, 3, 3]


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("SKUFLEET_REDIS_URL", f"http://:{PASSWORD}@redis.internal:6379/0"),
        ("SKUFLEET_DATABASE_URL", f"mysql://skufleet:{PASSWORD}@db.internal/ledger"),
        ("SKUFLEET_WEBHOOK_URL", f"hooks.example/services/{PASSWORD}"),
    ],
)
def test_a_malformed_service_url_is_one_line_naming_the_variable_and_exit_2(
    tmp_path: Path, variable: str, value: str
) -> None:
    """Any command refuses a malformed setting before doing anything: one line naming the
    variable, exit 2, and the URL's password nowhere."""
    line = error_line(skufleet(tmp_path, "status", "x", **{variable: value}), 2)
    assert line.startswith(f"error: invalid setting {variable}: ")


def test_an_unreachable_database_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """db upgrade, status and runs against a PostgreSQL that refuses: one line naming the
    database with its password masked, exit 3."""
    url = f"postgresql+psycopg://skufleet:{PASSWORD}@127.0.0.1:{free_port()}/ledger"
    for args in (("db", "upgrade"), ("status", "x"), ("runs",)):
        line = error_line(skufleet(tmp_path, *args, SKUFLEET_DATABASE_URL=url), 3)
        assert "cannot reach the ledger at postgresql+psycopg://skufleet:***@127.0.0.1" in line


@postgres_only
def test_an_unreachable_broker_is_one_line_and_exit_3(fleet: Fleet) -> None:
    """enqueue with Redis refusing: one line, exit 3, the Redis password nowhere."""
    assert fleet.cli("db", "upgrade").returncode == 0
    broken = with_env(fleet, SKUFLEET_REDIS_URL=f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0")
    result = broken.cli("enqueue", str(EXAMPLES / "catalogue.csv"), "--run", "r", "--model", "tiny")
    assert "cannot publish to the broker" in error_line(result, 3)


@postgres_only
def test_an_unreachable_s3_endpoint_is_one_line_and_exit_3(fleet: Fleet) -> None:
    """manifest --upload with the S3 endpoint refusing: one line, exit 3, the endpoint
    shown with its password masked (botocore quotes the URL it could not reach)."""
    assert fleet.cli("db", "upgrade").returncode == 0
    catalogue = str(EXAMPLES / "catalogue.csv")
    assert fleet.cli("enqueue", catalogue, "--run", "r", "--model", "tiny").returncode == 0
    broken = with_env(
        fleet,
        SKUFLEET_S3_ENDPOINT_URL=f"http://ak:{PASSWORD}@127.0.0.1:{free_port()}",
        SKUFLEET_S3_MAX_ATTEMPTS="1",
    )
    line = error_line(broken.cli("manifest", "r", "--upload"), 3)
    assert "cannot upload 'r/manifest.jsonl'" in line and "http://ak:***@127.0.0.1" in line


@pytest.mark.parametrize(
    "args",
    [("metrics", "--port", "99999"), ("metrics", "--port", "0"), ("flower", "--port", "70000")],
)
def test_ports_outside_1_to_65535_are_refused_in_one_line(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A port the OS would wrap around (99999 is 34463) is a usage error: one line, exit 2."""
    line = error_line(skufleet(tmp_path, *args), 2)
    assert line == f"error: --port must be 1-65535, got {args[2]}"


def test_user_text_is_shown_literally_never_read_as_rich_markup(tmp_path: Path) -> None:
    """Run names, models, packs and failure reasons holding [/], [bold] or [link=…] are
    printed as they are, not taken for Rich markup (where [/] alone crashed the command)."""
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    engine = ledger.create_engine(url)
    upgrade(engine)
    reason = "[/] boom [bold]in bold?"
    with engine.begin() as conn:
        run = ledger.upsert_run(conn, "r1", "[bold]tiny[/bold]", 0, "[link=https://x.example]p", {})
        now = ledger.utcnow()
        conn.execute(
            sa.insert(Item).values(
                run_id=run,
                sku="[/]",
                shot="front",
                prompt="p",
                seed=1,
                width=64,
                height=64,
                steps=2,
                guidance_scale=7.5,
                status=ItemStatus.FAILED,
                last_error=reason,
                created_at=now,
                updated_at=now,
            )
        )
    engine.dispose()
    env = {"SKUFLEET_DATABASE_URL": url}
    for name in ("[/]", "[bold]x[/bold]", "[link=https://x.example]x"):
        assert f"no run named '{name}'" in error_line(skufleet(tmp_path, "status", name, **env), 2)
    status = skufleet(tmp_path, "status", "r1", **env)
    assert status.returncode == 0, status.stderr
    assert reason in status.stdout
    runs = skufleet(tmp_path, "runs", **env)
    assert runs.returncode == 0, runs.stderr
    assert "[bold]tiny[/bold]" in runs.stdout and "[link=https://x.example]p" in runs.stdout
