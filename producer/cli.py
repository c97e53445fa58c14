"""``skufleet``: the producer and operations command line."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from schemas import ledger
from schemas.errors import (
    EXIT_CODES_HELP,
    ConfigError,
    LedgerUnavailable,
    RetryableError,
    SkufleetError,
    exit_code,
    one_line,
)
from schemas.names import SCHEDULERS
from schemas.output import OutputSpec
from schemas.params import GenerationParams, default_params
from schemas.settings import Settings, load_settings

app = typer.Typer(
    help="Turn catalogues into Stable Diffusion images on a Celery fleet.",
    epilog=EXIT_CODES_HELP,
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Ledger database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep and logs
out = Console()

RATE_WINDOW = timedelta(seconds=60)
"""Items/s in `skufleet status` counts the items finished within this window."""


def fail(exc: SkufleetError) -> NoReturn:
    """One plain line on stderr (URLs without their secrets, no markup read from the
    message) and the exit code of ``exc``'s class: see ``schemas.errors``."""
    err.print(f"[bold red]error:[/] {escape(one_line(exc))}", highlight=False)
    raise typer.Exit(exit_code(exc))


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn skufleet's errors into one plain line on stderr and an exit code."""
    try:
        yield
    except SkufleetError as exc:
        fail(exc)
    except OperationalError as exc:
        # the commands read the ledger themselves: a database lost after the schema check
        fail(LedgerUnavailable(f"the ledger failed: {exc.orig}"))


def port_option(value: int) -> int:
    """A --port given on the command line: 1-65535 (the OS would wrap 99999 around)."""
    if not 1 <= value <= 65535:
        fail(ConfigError(f"--port must be 1-65535, got {value}"))
    return value


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Settings are read from SKUFLEET_* variables once, here, and passed down."""
    try:
        ctx.obj = load_settings()
    except ConfigError as exc:
        fail(exc)


def ledger_engine(settings: Settings) -> Engine:
    """The ledger, checked to be at this code's schema."""
    engine = ledger.create_engine(settings.database_url)
    ledger.require_schema(engine)
    return engine


def parse_size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", value.strip())
    if not match:
        raise ConfigError(f"--size must look like 512x512, got {value!r}")
    return int(match.group(1)), int(match.group(2))


def parse_columns(values: list[str]) -> dict[str, str]:
    mapping = {}
    for value in values:
        name, sep, header = value.partition("=")
        if not sep or not name.strip() or not header.strip():
            raise ConfigError(f"--column must look like sku=ItemID, got {value!r}")
        mapping[name.strip()] = header.strip()
    return mapping


def parse_overrides(model: str, size: str | None, **given: Any) -> dict[str, Any]:
    """Generation and output parameters given on the command line, checked."""
    overrides = {name: value for name, value in given.items() if value is not None}
    if size is not None:
        overrides["width"], overrides["height"] = parse_size(size)
    output = {k: overrides[k] for k in ("format", "quality", "max_side") if k in overrides}
    generation = {k: v for k, v in overrides.items() if k not in output}
    try:
        GenerationParams(**{**default_params(model).model_dump(), **generation})
        OutputSpec(**output)
    except ValueError as exc:
        raise ConfigError(f"invalid generation parameters: {exc}") from exc
    return overrides


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the ledger's tables (Alembic)."""
    from producer.db import upgrade

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
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = 8,
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
    max_side: Annotated[
        int | None, typer.Option(help="Shrink images so the longer side fits (thumbnails).")
    ] = None,
    encoding: Annotated[str, typer.Option(help="Catalogue text encoding.")] = "utf-8",
    rejects: Annotated[
        Path | None,
        typer.Option(help="Write rejected records and too-long prompts here as JSON Lines."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Read a catalogue, record its items in the ledger and queue them for rendering.

    Enqueuing a run again with an updated catalogue renders only new items and items whose
    prompt or parameters changed.
    """
    from producer.enqueue import EnqueueRequest
    from producer.enqueue import enqueue as run_enqueue
    from producer.paths import check_output, open_output
    from producer.publish import Publisher
    from producer.template import TemplatePack

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
            pack=pack,
            overrides=parse_overrides(
                model,
                size,
                steps=steps,
                guidance_scale=guidance,
                scheduler=scheduler,
                format=output_format,
                quality=quality,
                max_side=max_side,
            ),
            encoding=encoding,
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
        "long_prompts",
        "enqueued",
        "messages",
    ):
        table.add_row(name.replace("_", " "), f"{getattr(summary, name):,}")
    table.add_row("queue", escape(summary.queue))
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


def _status_view(engine: Engine, run: str) -> tuple[Group, ledger.RunStatus]:
    with engine.connect() as conn:
        status = ledger.run_status(conn, run)
        recent = ledger.finished_since(conn, run, ledger.utcnow() - RATE_WINDOW)
        reasons = ledger.failure_reasons(conn, run)
    rate = recent / RATE_WINDOW.total_seconds()
    remaining = status.total - status.done
    eta = (
        f"{timedelta(seconds=round(remaining / rate))}"
        if rate and remaining
        else ("done" if not remaining else "—")
    )
    bar = Progress(
        TextColumn("run {task.description}", markup=False),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(f"{rate:.2f} items/s · ETA {eta}"),
    )
    bar.add_task(run, total=status.total or 1, completed=status.done)
    table = Table(show_header=True, box=None)
    for name in status.counts:
        table.add_column(name, justify="right")
    table.add_column("renders started", justify="right")
    table.add_row(*(f"{n:,}" for n in status.counts.values()), f"{status.attempts:,}")
    parts: list[Any] = [bar, table]
    if reasons:
        failures = Table(title="failures by reason", show_header=False, box=None)
        for reason, count in reasons:
            failures.add_row(f"{count:,}", escape(reason))
        parts.append(failures)
    return Group(*parts), status


@app.command()
def status(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print counts as JSON.")] = False,
    watch: Annotated[
        bool, typer.Option("--watch", help="Refresh until every item is done.")
    ] = False,
) -> None:
    """Progress of a run: items by status, items/s, ETA and failures by reason."""
    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        if as_json:
            with engine.connect() as conn:
                print(json.dumps(ledger.run_status(conn, run).as_dict()))
            return
        view, current = _status_view(engine, run)
        if not watch:
            out.print(view)
            return
        with Live(view, console=out, refresh_per_second=1) as live:
            while current.done < current.total:
                time.sleep(2)
                view, current = _status_view(engine, run)
                live.update(view)


@app.command()
def runs(ctx: typer.Context) -> None:
    """Every run with its progress, newest first."""
    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with engine.connect() as conn:
            found = ledger.list_runs(conn)
    table = Table(box=None)
    for name in ("run", "state", "succeeded", "failed", "open", "model", "pack", "created"):
        numeric = name in ("succeeded", "failed", "open")
        table.add_column(
            name,
            justify="right" if numeric else "left",
            no_wrap=name in ("run", "state", "succeeded", "created"),
        )
    for run in found:
        counts = run.status.counts
        open_items = run.status.total - run.status.done
        state = "cancelled" if run.cancelled else ("done" if not open_items else "running")
        table.add_row(
            escape(run.name),
            state,
            f"{counts['succeeded']:,}/{run.status.total:,}",
            f"{counts['failed']:,}",
            f"{open_items:,}",
            escape(run.model),
            escape(run.template),
            f"{run.created_at:%Y-%m-%d %H:%M}",
        )
    out.print(table)


@app.command()
def cancel(ctx: typer.Context, run: Annotated[str, typer.Argument(help="Run name.")]) -> None:
    """Stop a run: its pending and queued items are cancelled and skipped by the workers."""
    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with engine.begin() as conn:
            cancelled = ledger.cancel_run(conn, ledger.run_id(conn, run))
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
    from producer.enqueue import retry as retry_run
    from producer.publish import Publisher

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


@app.command()
def manifest(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of standard output.")
    ] = None,
    upload: Annotated[
        bool, typer.Option("--upload", help="Write it to the bucket as <run>/manifest.jsonl.")
    ] = False,
) -> None:
    """JSON Lines, one per succeeded item: run, sku, shot, key, seed, sha256, bytes, prompt,
    negative prompt, model and generation parameters. Written to the bucket by itself when
    a run completes; --upload writes it again now."""
    from producer.paths import check_output, open_output

    settings: Settings = ctx.obj
    with reported():
        if out_file:
            check_output(out_file, flag="--out")
        engine = ledger_engine(settings)
        if upload:
            from producer.bucket import Bucket
            from producer.downstream import write_manifest

            key, count = write_manifest(engine, Bucket(settings), run)
            err.print(f"{count:,} items written to {escape(f's3://{settings.s3_bucket}/{key}')}")
            return
        with contextlib.ExitStack() as stack:
            sink = (
                stack.enter_context(open_output(out_file, flag="--out"))
                if out_file
                else (sys.stdout)
            )
            conn = stack.enter_context(engine.connect())
            count = 0
            for record in ledger.manifest(conn, run):
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    if out_file:
        err.print(f"{count:,} items written to {escape(str(out_file))}")


@app.command()
def presign(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    expires: Annotated[int, typer.Option(help="Seconds each URL stays valid.")] = 7 * 24 * 3600,
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of standard output.")
    ] = None,
) -> None:
    """Presigned URLs of a run's images, one JSON line each (sku, shot, key, url): downstream
    systems read the private bucket with them, no credentials needed."""
    from producer.bucket import Bucket
    from producer.downstream import presigned
    from producer.paths import check_output, open_output

    settings: Settings = ctx.obj
    with reported():
        if not 1 <= expires <= 7 * 24 * 3600:
            raise ConfigError(f"--expires must be 1-604800 seconds (S3's limit), got {expires}")
        if out_file:
            check_output(out_file, flag="--out")
        engine = ledger_engine(settings)
        with contextlib.ExitStack() as stack:
            sink = (
                stack.enter_context(open_output(out_file, flag="--out"))
                if out_file
                else (sys.stdout)
            )
            for record in presigned(engine, Bucket(settings), run, expires):
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")


@app.command()
def flower(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=port_option)] = 5555,
) -> None:
    """Flower, the live dashboard of the workers and tasks, on the configured broker.

    Basic authentication comes from SKUFLEET_FLOWER_BASIC_AUTH (user:password, passwords of
    12 characters or more) and guards every endpoint, /metrics and /healthcheck included;
    without it Flower starts only on the loopback address. Its state persists in
    SKUFLEET_CACHE_DIR and it serves Prometheus metrics on /metrics.
    """
    from producer.flower import serve

    settings: Settings = ctx.obj
    with reported():
        serve(settings, address=address, port=port)


@app.command()
def metrics(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=port_option)] = 9808,
) -> None:
    """Prometheus metrics Flower lacks: queue depth per queue, items by status per run,
    images/s and seconds per image per device (served on /metrics)."""
    from prometheus_client import REGISTRY, start_http_server

    from producer.metrics import FleetCollector
    from producer.publish import Publisher
    from schemas.names import ops_queue

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        publisher = Publisher(settings)
        # the broker answers at start; a later outage only leaves its samples out
        publisher.queue_length(ops_queue(settings.queue_prefix))
        REGISTRY.register(FleetCollector(settings, engine, publisher))
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
        err.print(f"metrics on http://{escape(address)}:{port}/metrics")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


@app.command()
def generate(
    ctx: typer.Context,
    prompt: Annotated[str, typer.Argument(help="What to draw.")],
    negative: Annotated[str, typer.Option(help="What to keep out.")] = "",
    count: Annotated[int, typer.Option("-n", "--count", help="How many images.")] = 4,
    seed: Annotated[int, typer.Option(help="Seed of the first image; the rest follow.")] = 0,
    model: Annotated[str | None, typer.Option(help="Model id or path [SKUFLEET_MODEL].")] = None,
    size: Annotated[str | None, typer.Option(help="Image size WxH [model default].")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [model default].")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Where the images are saved.")] = Path("."),
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the fleet.")] = 3600,
) -> None:
    """A handful of images of one prompt through the fleet: queue them, wait, save them."""
    from producer.generate import generate as run_generate

    settings: Settings = ctx.obj
    with reported():
        model = model or settings.model
        overrides = parse_overrides(model, size, steps=steps)
        paths = run_generate(
            settings,
            ledger_engine(settings),
            prompt,
            negative=negative,
            count=count,
            seed=seed,
            model=model,
            overrides=overrides,
            out_dir=out_dir,
            timeout=timeout,
            console=err,
        )
    for path in paths:
        print(path)  # one path a line, unwrapped, for scripts


@app.command()
def reconcile(
    ctx: typer.Context,
    run: Annotated[str | None, typer.Argument(help="Only this run [every run].")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="Keep reconciling until stopped.")] = False,
    interval: Annotated[
        float | None, typer.Option(help="Seconds between passes [SKUFLEET_RECONCILE_SECONDS].")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON line per pass.")] = False,
) -> None:
    """Requeue items whose lease expired or whose message was lost; fail those past the cap."""
    from producer.publish import Publisher
    from producer.reconcile import reconcile as reconcile_pass

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        with Publisher(settings) as publisher, contextlib.suppress(KeyboardInterrupt):
            while True:
                try:
                    report = reconcile_pass(engine, publisher, settings, run)
                except RetryableError as exc:
                    if not watch:
                        raise
                    # Redis or the database is away (a restart, a failover): try next pass
                    err.print(f"reconcile: skipped a pass: {escape(one_line(exc))}")
                else:
                    if as_json:
                        print(json.dumps(report.as_dict()), flush=True)
                    else:
                        err.print(f"reconcile: {escape(str(report))}")
                if not watch:
                    break
                time.sleep(interval or settings.reconcile_seconds)


@app.command()
def beat(ctx: typer.Context) -> None:
    """Celery beat: send the reconciler task to the workers every SKUFLEET_RECONCILE_SECONDS.

    Run exactly one per fleet (two would reconcile twice as often, harmlessly).
    """
    from celery import Celery

    from producer.publish import Publisher
    from schemas.names import TASK_RECONCILE, ops_queue

    settings: Settings = ctx.obj
    with reported(), Publisher(settings) as publisher:
        # Celery beat would wait for an unreachable broker for ever: say so and stop now
        publisher.queue_length(ops_queue(settings.queue_prefix))
    app = Celery("skufleet-beat", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        beat_schedule={
            "reconcile": {
                "task": TASK_RECONCILE,
                "schedule": settings.reconcile_seconds,
                # a pass nobody took in time is dropped: the next one does the same work
                "options": {
                    "queue": ops_queue(settings.queue_prefix),
                    "expires": settings.reconcile_seconds,
                },
            }
        },
    )
    settings.cache_dir.mkdir(parents=True, exist_ok=True)
    app.Beat(loglevel="INFO", schedule=str(settings.cache_dir / "beat-schedule")).run()


@app.command()
def demo(
    ctx: typer.Context,
    catalogue: Annotated[Path, typer.Argument(help="Catalogue CSV.")] = Path(
        "examples/catalogue.csv"
    ),
    model: Annotated[
        str, typer.Option(help="Model id or path; 'tiny' needs no download.")
    ] = "tiny",
    template: Annotated[str, typer.Option(help="Template pack name or path.")] = "ecommerce",
    directory: Annotated[
        Path, typer.Option("--dir", help="Where services keep data and images land.")
    ] = Path("skufleet-demo"),
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = 4,
    keep: Annotated[
        bool, typer.Option("--keep", help="Leave the stack running afterwards.")
    ] = False,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop a stack left running by --keep.")
    ] = False,
) -> None:
    """Start a private fleet (Redis, S3, SQLite, Flower, a worker per device), render a
    catalogue with it, copy the images out, and stop it all."""
    from producer import demo as demo_module
    from producer.template import TemplatePack

    settings: Settings = ctx.obj
    with reported():
        if stop:
            report = demo_module.stop(directory)
            for pid, why in report.refused:
                err.print(f"left pid {pid} alone: it is not the process the demo started ({why})")
            out.print(
                f"stopped {len(report.stopped)} processes of the demo in {escape(str(directory))}"
                + (f" ({len(report.gone)} had exited already)" if report.gone else "")
            )
            if report.refused:
                raise typer.Exit(1)
            return
        result = demo_module.run_demo(
            settings,
            catalogue,
            directory=directory,
            model=model,
            pack=TemplatePack.load(template),
            batch_size=batch_size,
            console=err,
            keep=keep,
        )
    table = Table(title=f"run {escape(result.run)}", show_header=False)
    for name in ("succeeded", "failed"):
        table.add_row(name, str(result.counts[name]))
    table.add_row("rejected rows", str(result.summary.rejected + result.summary.duplicates))
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)
    out.print(f"{len(result.images)} images in {escape(str(directory / 'images' / result.run))}/")
    if keep:
        out.print(
            f"the stack is still running (Flower at {escape(str(result.flower))}); stop it with: "
            f"skufleet demo --stop --dir {escape(str(directory))}"
        )
    if result.counts["failed"]:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="skufleet")


if __name__ == "__main__":
    main()
