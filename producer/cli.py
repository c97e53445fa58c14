"""``skufleet``: the producer and operations command line.

The app and the commands of a run's life (``db upgrade``, ``enqueue``, ``status``, ``runs``,
``cancel``, ``retry``) are here; the commands around runs live in
:mod:`skufleet.producer.cli_fleet`, the helpers every command shares in
:mod:`skufleet.producer.console`, and what ``status`` and ``runs`` show in
:mod:`skufleet.producer.status`.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from skufleet import __version__
from skufleet.producer import cli_fleet, cli_review
from skufleet.producer.console import (
    err,
    fail,
    ledger_engine,
    out,
    parse_columns,
    parse_overrides,
    reported,
)
from skufleet.schemas import gate, ledger
from skufleet.schemas.errors import (
    EXIT_CODES_HELP,
    ConfigError,
)
from skufleet.schemas.names import SCHEDULERS
from skufleet.schemas.params import DEFAULT_BATCH_SIZE
from skufleet.schemas.settings import Settings, load_settings

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}

app = typer.Typer(
    help="Turn catalogues into Stable Diffusion images on a Celery fleet.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    context_settings=HELP_OPTIONS,
    # help text is plain: "[pack/model default]" and "[SKUFLEET_MODEL]" must not be read
    # as Rich markup and vanish
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Ledger database commands.", no_args_is_help=True, context_settings=HELP_OPTIONS
)
app.add_typer(db_app, name="db")


def _version(shown: bool) -> None:
    if shown:
        print(f"skufleet {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    ctx: typer.Context,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Settings are read from SKUFLEET_* variables once, here, and passed down."""
    try:
        ctx.obj = load_settings()
    except ConfigError as exc:
        fail(exc)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the ledger's tables (Alembic)."""
    from skufleet.producer.db import upgrade

    settings: Settings = ctx.obj
    with reported():
        engine = ledger.create_engine(settings.database_url)
        upgrade(engine)
        ledger.require_schema(engine)
        err.print(f"ledger at {escape(ledger.describe(engine))} is up to date")


@app.command()
def enqueue(
    ctx: typer.Context,
    catalogue: Annotated[Path, typer.Argument(help="Catalogue CSV with at least sku and title.")],
    run: Annotated[str, typer.Option(help="Run name; also the object key prefix.")],
    model: Annotated[str | None, typer.Option(help="Model id or path [SKUFLEET_MODEL].")] = None,
    template: Annotated[
        str, typer.Option(help="Template pack: ecommerce, education, medical or a TOML path.")
    ] = "ecommerce",
    column: Annotated[
        list[str] | None,
        typer.Option(help="Map a catalogue header to a skufleet name: sku=ItemID (repeatable)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Run seed; item seeds derive from it.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = DEFAULT_BATCH_SIZE,
    size: Annotated[str | None, typer.Option(help="Image size WxH [pack/model default].")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [pack/model default].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale [pack default].")] = None,
    scheduler: Annotated[
        str | None, typer.Option(help=f"Sampler: {', '.join(SCHEDULERS)} [pack default].")
    ] = None,
    output_format: Annotated[
        str | None, typer.Option("--format", help="png, webp or jpeg [pack default: png].")
    ] = None,
    quality: Annotated[int | None, typer.Option(help="WebP/JPEG quality 1-100 [90].")] = None,
    compression: Annotated[
        str | None,
        typer.Option(help="PNG compression: standard or fast (~10x less CPU, ~12% larger)."),
    ] = None,
    max_side: Annotated[
        int | None, typer.Option(help="Shrink images so the longer side fits (thumbnails).")
    ] = None,
    encoding: Annotated[str, typer.Option(help="Catalogue text encoding.")] = "utf-8",
    delimiter: Annotated[
        str | None,
        typer.Option(help="Field delimiter: comma, semicolon, tab or pipe [the header's]."),
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option(help="Write rejected records and too-long prompts here as JSON Lines."),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option(help="Delete the objects of the run's retired items from the bucket."),
    ] = False,
    checks: Annotated[str | None, cli_fleet.ENQUEUE_GATE.checks] = None,
    threshold: Annotated[list[str] | None, cli_fleet.ENQUEUE_GATE.threshold] = None,
    max_rolls: Annotated[int | None, cli_fleet.ENQUEUE_GATE.max_rolls] = None,
    candidates: Annotated[int | None, cli_fleet.ENQUEUE_GATE.candidates] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Read a catalogue, record its items in the ledger and queue them for rendering.

    Enqueuing a run again with an updated catalogue renders only new items and items whose
    prompt or parameters changed; the items of SKUs it no longer has are retired (their
    objects are kept unless --prune is given).
    """
    from skufleet.producer.bucket import Bucket
    from skufleet.producer.catalogue import parse_delimiter
    from skufleet.producer.enqueue import EnqueueRequest
    from skufleet.producer.enqueue import enqueue as run_enqueue
    from skufleet.producer.paths import check_output, open_output
    from skufleet.producer.publish import Publisher
    from skufleet.producer.template import TemplatePack

    settings: Settings = ctx.obj
    with reported():
        model = model or settings.model
        pack = TemplatePack.load(template).with_columns(parse_columns(column or []))
        inputs = (catalogue, Path(pack.source))
        if rejects:  # before the ledger: a refused --rejects leaves every file as it was
            check_output(rejects, inputs, flag="--rejects")
        request = EnqueueRequest(
            catalogue=catalogue,
            run=run,
            model=model,
            seed=seed,
            batch_size=batch_size,
            prune=prune,
            pack=pack,
            overrides=parse_overrides(
                model,
                size,
                steps=steps,
                guidance_scale=guidance,
                scheduler=scheduler,
                format=output_format,
                quality=quality,
                compression=compression,
                max_side=max_side,
            ),
            encoding=encoding,
            delimiter=parse_delimiter(delimiter) if delimiter is not None else None,
            quality=gate.from_flags(checks, threshold or (), max_rolls, candidates),
        )
        engine = ledger_engine(settings)
        with contextlib.ExitStack() as stack:
            publisher = stack.enter_context(Publisher(settings))
            sink = (
                stack.enter_context(open_output(rejects, inputs, flag="--rejects"))
                if rejects
                else None
            )
            bar = stack.enter_context(
                Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    console=err,
                    disable=as_json or not err.is_terminal,
                )
            )
            labels = {"read": "records read", "queued": "items queued"}
            tasks = {stage: bar.add_task(label, total=None) for stage, label in labels.items()}

            def progress(stage: str, count: int) -> None:
                bar.update(tasks[stage], description=f"{count:,} {labels[stage]}")

            summary = run_enqueue(
                engine,
                publisher,
                request,
                queue_prefix=settings.queue_prefix,
                report=sink,
                progress=progress,
                bucket=Bucket(settings) if prune else None,
            )
    if as_json:
        print(json.dumps(summary.as_dict()))
        return
    table = Table(title=f"run {escape(summary.run)}", show_header=False)
    for name in (
        "read",
        "accepted",
        "rejected",
        "duplicates",
        "items",
        "new",
        "changed",
        "unchanged",
        "in_flight",
        "missing",
        "retired",
        "revived",
        *(("pruned",) if prune else ()),
        "long_prompts",
        "enqueued",
        "messages",
    ):
        table.add_row(name.replace("_", " "), f"{getattr(summary, name):,}")
    table.add_row("queue", escape(summary.queue))
    table.add_row("quality gate", escape(gate.describe(summary.quality)))
    out.print(table)
    for reason, count in sorted(summary.reasons.items()):
        see = f" (see {escape(str(rejects))})" if rejects else ""
        err.print(f"  {count:,} × {escape(reason)}{see}")
    if summary.long_prompts:
        err.print(
            f"  {summary.long_prompts:,} items have prompts over 77 CLIP tokens, which "
            "SD 1.5 cuts" + (f" (see {escape(str(rejects))})" if rejects else "; see --rejects")
        )
    if summary.in_flight:
        err.print(
            f"  {summary.in_flight:,} changed items are rendering now with their old "
            "content; enqueue again once they finish"
        )
    if summary.missing:
        more = summary.missing - len(summary.missing_skus)
        err.print(
            f"  {summary.missing:,} SKUs are no longer in the catalogue "
            f"({escape(', '.join(summary.missing_skus))}{f' and {more:,} more' if more else ''})"
            f": {summary.retired:,} items retired"
            + ("" if prune else ", their objects kept (--prune deletes them)")
        )
    if summary.missing_in_flight:
        err.print(
            f"  {summary.missing_in_flight:,} items of those SKUs are rendering now; enqueue "
            "again once they finish to retire them"
        )


@app.command()
def status(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    as_json: Annotated[
        bool, typer.Option("--json", help="Print counts, pace, ETA, failures as JSON.")
    ] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh until every item is done.")
    ] = False,
) -> None:
    """Progress of a run: items by status, items/s, ETA, retries and failures by kind, and
    the quality gate: usable share, re-rolls, renders per image, items waiting for review."""
    from skufleet.producer.status import snapshot, status_view

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        current = snapshot(engine, run)
        if as_json:
            print(json.dumps(current.as_dict(), ensure_ascii=False))
            return
        if not watch:
            out.print(status_view(run, current))
            return
        with Live(status_view(run, current), console=out, refresh_per_second=1) as live:
            while current.status.done < current.status.total:
                time.sleep(2)
                current = snapshot(engine, run)
                live.update(status_view(run, current))
    if current.status.counts["failed"]:
        raise typer.Exit(1)  # the run finished with failures


@app.command()
def runs(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per run.")] = False,
) -> None:
    """Every run with its progress, newest first."""
    from skufleet.producer.status import run_state, runs_table

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with ledger.connect(engine) as conn:
            found = ledger.list_runs(conn)
    if as_json:
        for run in found:
            line = {
                **run.status.as_dict(),
                "state": run_state(run),
                "model": run.model,
                "pack": run.template,
                "created": run.created_at.isoformat(),
                "cancelled": run.cancelled,
            }
            print(json.dumps(line, ensure_ascii=False))
        return
    out.print(runs_table(found, out.width))


@app.command()
def cancel(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the count as JSON.")] = False,
) -> None:
    """Stop a run: its pending and queued items are cancelled and skipped by the workers."""
    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with ledger.begin(engine) as conn:
            cancelled = ledger.cancel_run(conn, ledger.find_run_id(conn, run))
    if as_json:
        print(json.dumps({"run": run, "cancelled": cancelled}, ensure_ascii=False))
        return
    out.print(f"run {escape(run)}: {cancelled:,} items cancelled; running items finish")


@app.command()
def retry(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    failed: Annotated[
        bool, typer.Option("--failed", help="Only failed items (not cancelled ones).")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print counts as JSON.")] = False,
) -> None:
    """Queue a run's failed and cancelled items again, each with a fresh attempt budget."""
    from skufleet.producer.enqueue import retry as retry_run
    from skufleet.producer.publish import Publisher

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with Publisher(settings) as publisher:
            result = retry_run(
                engine, publisher, run, failed_only=failed, queue_prefix=settings.queue_prefix
            )
    if as_json:
        print(json.dumps(result))
    else:
        out.print(
            f"run {escape(run)}: {result['retried']:,} items retried, {result['enqueued']:,} "
            f"queued in {result['messages']:,} messages"
        )


for command in (
    cli_fleet.manifest,
    cli_fleet.presign,
    cli_fleet.flower,
    cli_fleet.metrics,
    cli_fleet.generate,
    cli_fleet.reconcile,
    cli_fleet.demo,
    cli_review.review,
    cli_review.reroll,
):
    app.command()(command)


def main() -> None:
    """Run the CLI. A usage error (a bad flag or value) is one line naming it, exit code 2,
    instead of click's usage block."""
    try:
        code = app(prog_name="skufleet", standalone_mode=False)
    except typer.TyperException as exc:  # typer's click errors: usage, bad value, no file
        message = " ".join(exc.format_message().split())
        err.print(f"error: {message} (see -h)", markup=False, highlight=False)
        raise SystemExit(exc.exit_code) from None
    except typer.Abort:
        err.print("aborted", markup=False)
        raise SystemExit(130) from None
    raise SystemExit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
