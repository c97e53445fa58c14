"""``skufleet``: the producer and operations command line."""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from schemas import ledger
from schemas.errors import CatalogueError, ConfigError, SkufleetError
from schemas.params import GenerationParams, default_params
from schemas.settings import Settings

app = typer.Typer(
    help="Turn catalogues into Stable Diffusion images on a Celery fleet.",
    no_args_is_help=True,
    add_completion=False,
)
db_app = typer.Typer(help="Ledger database commands.", no_args_is_help=True)
app.add_typer(db_app, name="db")

err = Console(stderr=True, soft_wrap=True)  # error lines stay whole for grep and logs
out = Console()


def fail(exc: SkufleetError) -> NoReturn:
    err.print(f"[bold red]error:[/] {exc}", highlight=False)
    raise typer.Exit(2 if isinstance(exc, ConfigError | CatalogueError) else 1)


@contextlib.contextmanager
def reported() -> Iterator[None]:
    """Turn skufleet's errors into one plain line on stderr and an exit code."""
    try:
        yield
    except SkufleetError as exc:
        fail(exc)


@app.callback()
def _main(ctx: typer.Context) -> None:
    """Settings are read from SKUFLEET_* variables once, here, and passed down."""
    try:
        ctx.obj = Settings()
    except ValueError as exc:
        fail(ConfigError(f"invalid SKUFLEET_* setting: {exc}"))


def parse_size(value: str) -> tuple[int, int]:
    match = re.fullmatch(r"(\d+)[xX](\d+)", value.strip())
    if not match:
        raise ConfigError(f"--size must look like 512x512, got {value!r}")
    return int(match.group(1)), int(match.group(2))


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Create or upgrade the ledger's tables (Alembic)."""
    from producer.db import upgrade

    settings: Settings = ctx.obj
    with reported():
        engine = ledger.create_engine(settings.database_url)
        upgrade(engine)
        ledger.require_schema(engine)
        err.print(f"ledger at {ledger.describe(engine)} is up to date")


@app.command()
def enqueue(
    ctx: typer.Context,
    catalogue: Annotated[Path, typer.Argument(help="Catalogue CSV with at least sku and title.")],
    run: Annotated[str, typer.Option(help="Run name; also the object key prefix.")],
    model: Annotated[str | None, typer.Option(help="Model id or path [SKUFLEET_MODEL].")] = None,
    seed: Annotated[int, typer.Option(help="Run seed; item seeds derive from it.")] = 0,
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = 8,
    size: Annotated[str | None, typer.Option(help="Image size WxH [model default].")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps [model default].")] = None,
    guidance: Annotated[float | None, typer.Option(help="Guidance scale [7.5].")] = None,
    encoding: Annotated[str, typer.Option(help="Catalogue text encoding.")] = "utf-8-sig",
    rejects: Annotated[
        Path | None, typer.Option(help="Write rejected records here as JSON Lines.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as JSON.")] = False,
) -> None:
    """Read a catalogue, record its items in the ledger and queue them for rendering."""
    from producer.enqueue import EnqueueRequest
    from producer.enqueue import enqueue as run_enqueue
    from producer.publish import Publisher

    settings: Settings = ctx.obj
    with reported():
        model = model or settings.model
        params = default_params(model).model_dump()
        if size is not None:
            params["width"], params["height"] = parse_size(size)
        if steps is not None:
            params["steps"] = steps
        if guidance is not None:
            params["guidance_scale"] = guidance
        try:
            generation = GenerationParams(**params)
        except ValueError as exc:
            raise ConfigError(f"invalid generation parameters: {exc}") from exc
        request = EnqueueRequest(
            catalogue=catalogue,
            run=run,
            model=model,
            seed=seed,
            batch_size=batch_size,
            params=generation,
            encoding=encoding,
        )
        engine = ledger.create_engine(settings.database_url)
        publisher = Publisher(settings)
        show_progress = not as_json and err.is_terminal
        with contextlib.ExitStack() as stack:
            sink = stack.enter_context(rejects.open("w", encoding="utf-8")) if rejects else None
            progress_bar = stack.enter_context(
                Progress(
                    SpinnerColumn(),
                    TextColumn("{task.description}"),
                    TimeElapsedColumn(),
                    console=err,
                    disable=not show_progress,
                )
            )
            tasks = {
                stage: progress_bar.add_task(stage, total=None) for stage in ("read", "queued")
            }

            labels = {"read": "records read", "queued": "items queued"}

            def progress(stage: str, count: int) -> None:
                progress_bar.update(
                    tasks[stage], completed=count, description=f"{count:,} {labels[stage]}"
                )

            summary = run_enqueue(
                engine,
                publisher,
                request,
                queue_prefix=settings.queue_prefix,
                rejects=sink,
                progress=progress,
            )
        publisher.close()
    if as_json:
        print(json.dumps(summary.as_dict()))
        return
    table = Table(title=f"run {summary.run}", show_header=False)
    for name in ("read", "accepted", "rejected", "duplicates", "new", "enqueued", "messages"):
        table.add_row(name, f"{getattr(summary, name):,}")
    table.add_row("queue", summary.queue)
    out.print(table)
    for reason, count in sorted(summary.reasons.items()):
        err.print(f"  {count:,} × {reason}" + (f" (see {rejects})" if rejects else ""))


@app.command()
def status(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print counts as JSON.")] = False,
) -> None:
    """Items of a run counted by status."""
    settings: Settings = ctx.obj
    with reported():
        engine = ledger.create_engine(settings.database_url)
        ledger.require_schema(engine)
        with engine.connect() as conn:
            result = ledger.run_status(conn, run)
    if as_json:
        print(json.dumps(result.as_dict()))
        return
    table = Table(title=f"run {run}")
    table.add_column("status")
    table.add_column("items", justify="right")
    for name, count in result.counts.items():
        table.add_row(name, f"{count:,}")
    table.add_row("renders started", f"{result.attempts:,}")
    out.print(table)


@app.command()
def demo(
    ctx: typer.Context,
    catalogue: Annotated[Path, typer.Argument(help="Catalogue CSV.")] = Path(
        "examples/catalogue.csv"
    ),
    model: Annotated[str, typer.Option(help="Model id or path; 'tiny' needs no download.")] = (
        "tiny"
    ),
    directory: Annotated[
        Path, typer.Option("--dir", help="Where services keep data and images land.")
    ] = Path("skufleet-demo"),
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = 4,
) -> None:
    """Start a private fleet (Redis, S3, SQLite, one CPU worker), render a catalogue, stop."""
    from producer.demo import run_demo

    settings: Settings = ctx.obj
    with reported():
        result = run_demo(
            settings,
            catalogue,
            directory=directory,
            model=model,
            params=default_params(model),
            batch_size=batch_size,
            console=err,
        )
    table = Table(title=f"run {result.run}", show_header=False)
    for name in ("succeeded", "failed"):
        table.add_row(name, str(result.counts[name]))
    table.add_row("rejected rows", str(result.summary.rejected + result.summary.duplicates))
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)
    out.print(f"{len(result.images)} images in {directory / 'images' / result.run}/")
    if result.counts["failed"]:
        raise typer.Exit(1)


def main() -> None:
    app(prog_name="skufleet")


if __name__ == "__main__":
    main()
