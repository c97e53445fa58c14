"""The ``skufleet`` commands of human review: ``review`` (the contact-sheet server, or a
static export of it) and ``reroll`` (reject items by SKU and draw them again). Registered on
the app by :mod:`skufleet.producer.cli`."""

from __future__ import annotations

import csv
import getpass
import json
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import sqlalchemy as sa
import typer
from rich.markup import escape
from sqlalchemy.engine import Connection

from skufleet.producer.console import err, ledger_engine, out, port_option, reported
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item

DELIMITERS = ",;\t|"
"""Field delimiters a --file may use; its header line tells which."""


def default_reviewer() -> str:
    """``user@host``: who decides, where no --reviewer or login says otherwise."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid, no USER/LOGNAME
        user = "unknown"
    return f"{user}@{socket.gethostname() or 'localhost'}"


def _reviewer(given: str | None) -> str:
    if given is None:
        return default_reviewer()
    name = given.strip()
    if not name or len(name) > 255 or not name.isprintable():
        raise ConfigError(f"--reviewer must be 1-255 printable characters, got {given!r}")
    return name


def review(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=port_option)] = 5556,
    export: Annotated[
        Path | None,
        typer.Option(
            "--export",
            help="Write the contact sheet as one static, read-only HTML file here (a "
            "directory: its sheet.html) instead of serving it.",
        ),
    ] = None,
    reviewer: Annotated[
        str | None,
        typer.Option(help="Name recorded with each decision [the login's user, else user@host]."),
    ] = None,
) -> None:
    """Review a run's stored images in the browser: a contact sheet by category and SKU with
    each check's score; approve (a) or reject (r) each image, j/k or the arrows to move.

    A rejected image is drawn again with the item's next seed; an approved one that failed a
    check joins the manifest. Basic authentication comes from SKUFLEET_FLOWER_BASIC_AUTH, as
    for Flower, and guards every page; without it the server listens on the loopback address
    only. --export writes the sheet, thumbnails embedded, to share or archive.
    """
    settings: Settings = ctx.obj
    with reported():
        name = _reviewer(reviewer)
        if export is not None:
            from skufleet.producer.bucket import Bucket
            from skufleet.producer.review import export as write_export

            result = write_export(ledger_engine(settings), Bucket(settings), run, export)
            missing = result["missing"]
            note = f" ({missing:,} without an image in the bucket)" if missing else ""
            out.print(
                f"run {escape(run)}: {result['items']:,} images written to "
                f"{escape(result['path'])}{note}"
            )
            return
        from skufleet.producer.review import serve

        def announce(url: str, authenticated: bool) -> None:
            guard = "basic auth on every page" if authenticated else "no auth: loopback only"
            err.print(f"review of run {escape(run)} on {escape(url)} ({guard}); Ctrl-C stops it")

        serve(settings, run, address=address, port=port, reviewer_default=name, announce=announce)


def _delimiter(header: str) -> str:
    counts = {d: header.count(d) for d in DELIMITERS}
    best = max(counts, key=lambda d: counts[d])
    return best if counts[best] else ","


def read_rejects(path: Path) -> Iterator[tuple[int, str, str | None]]:
    """``(line, sku, shot or None)`` for each row of a CSV with a ``sku`` column and an
    optional ``shot`` column (empty: every shot of the SKU). Each problem is one ConfigError
    naming the file, the line, the column and the value."""
    where = f"--file {path}"
    try:
        handle = path.open(encoding="utf-8-sig", newline="")
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc.strerror}") from None
    with handle:
        try:
            header = handle.readline()
            handle.seek(0)
            reader = csv.DictReader(handle, delimiter=_delimiter(header), strict=True)
            columns = [c.strip() for c in reader.fieldnames or []]
            if "sku" not in columns:
                found = ", ".join(repr(c) for c in columns) or "none"
                raise ConfigError(f"{where}: no 'sku' column in its header line (found {found})")
            reader.fieldnames = columns
            for row in reader:
                line = reader.line_num
                if None in row:  # more fields than the header names
                    raise ConfigError(
                        f"{where}, line {line}: {len(columns) + len(row[None])} fields, the "
                        f"header names {len(columns)}"
                    )
                sku = (row.get("sku") or "").strip()
                shot = (row.get("shot") or "").strip() or None
                if not sku:
                    if not any((v or "").strip() for v in row.values()):
                        continue  # a blank line
                    raise ConfigError(f"{where}, line {line}: column 'sku' is empty")
                if not sku.isprintable():
                    raise ConfigError(
                        f"{where}, line {line}: column 'sku' has a control character: {sku!r}"
                    )
                yield line, sku, shot
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        except csv.Error as exc:
            raise ConfigError(f"{where}: not a CSV file ({exc})") from None


def reroll(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    sku: Annotated[
        list[str] | None, typer.Option("--sku", help="A SKU to draw again (repeatable).")
    ] = None,
    shot: Annotated[
        str | None,
        typer.Option(help="Only this shot of each --sku (and of --file rows without a shot)."),
    ] = None,
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            help="CSV of items to draw again: a 'sku' column and an optional 'shot' column.",
        ),
    ] = None,
    reviewer: Annotated[
        str | None, typer.Option(help="Name recorded with each rejection [user@host].")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the counts as JSON.")] = False,
) -> None:
    """Reject stored images by SKU (and shot) and draw them again with each item's next seed:
    each rejection is recorded with the reviewer's name, then the items are queued.

    Exits 1 when an item named has no stored image to reject (it is pending, rendering or
    failed); the others are still rejected and queued.
    """
    from skufleet.producer.publish import Publisher
    from skufleet.producer.review import reject

    settings: Settings = ctx.obj
    with reported():
        name = _reviewer(reviewer)
        if not sku and file is None:
            raise ConfigError("name the items to draw again with --sku or --file")
        if shot is not None and not shot.strip():
            raise ConfigError("--shot must not be empty")
        wanted: list[tuple[str, tuple[str, str | None]]] = [
            (f"--sku {s!r}", (s, shot)) for s in sku or []
        ]
        if file is not None:
            wanted += [
                (f"--file {file}, line {line}: column 'sku' value {s!r}", (s, sh or shot))
                for line, s, sh in read_rejects(file)
            ]
        if not wanted:
            raise ConfigError(f"--file {file}: no rows below its header line")
        engine = ledger_engine(settings)
        ids: list[int] = []
        with ledger.connect(engine) as conn:
            run_id = ledger.find_run_id(conn, run)
            for where, pair in wanted:
                try:
                    found = ledger.find_items(conn, run_id, [pair])
                except ConfigError as exc:
                    raise ConfigError(f"{where}: {exc}") from None
                ids += [i for i in found if i not in ids]
            named = _names(conn, run_id, ids)
        with Publisher(settings) as publisher:
            result = reject(engine, publisher, run, ids, name, settings.queue_prefix)
    skipped = [{"item_id": i, **named[i]} for i in result["skipped_ids"]]
    if as_json:
        summary = {k: v for k, v in result.items() if k not in ("skipped_ids", "statuses")}
        print(json.dumps({**summary, "requested": len(ids), "skipped": skipped}))
    else:
        out.print(
            f"run {escape(run)}: {result['decided']:,} items rejected by {escape(name)}, "
            f"{result['enqueued']:,} queued in {result['messages']:,} messages"
        )
        for item in skipped:
            err.print(
                f"  skipped SKU {escape(repr(item['sku']))} shot {escape(repr(item['shot']))}: "
                f"it is {item['status']}, with no stored image to reject"
            )
    if skipped:
        raise typer.Exit(1)  # not everything named was rejected


def _names(conn: Connection, run_id: int, ids: list[int]) -> dict[int, dict[str, str]]:
    """SKU, shot and status of each item, for what a reroll reports."""
    found: dict[int, dict[str, str]] = {}
    for start in range(0, len(ids), 1000):
        rows = conn.execute(
            sa.select(Item.id, Item.sku, Item.shot, Item.status).where(
                Item.run_id == run_id, Item.id.in_(ids[start : start + 1000])
            )
        )
        found.update(
            {int(r.id): {"sku": r.sku, "shot": r.shot, "status": str(r.status)} for r in rows}
        )
    return found
