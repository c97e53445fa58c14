"""The ``skufleet`` commands around the runs: what downstream systems read (``manifest``,
``presign``), one-off images (``generate``), and the long-running services of a fleet
(``flower``, ``metrics``, ``reconcile --watch``) and of the demo (``demo``). Registered on
the app by :mod:`skufleet.producer.cli`."""

from __future__ import annotations

import contextlib
import json
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from skufleet.producer.console import (
    err,
    ledger_engine,
    out,
    parse_overrides,
    port_option,
    reported,
)
from skufleet.schemas import gate, ledger
from skufleet.schemas.errors import (
    ConfigError,
    RetryableError,
    one_line,
)
from skufleet.schemas.settings import Settings


@dataclass(frozen=True)
class GateOptions:
    """The quality gate's flags (``schemas.gate.from_flags``), their defaults said as the
    command has them: ``enqueue``'s come after the pack's ``[quality]``."""

    checks: Any
    threshold: Any
    max_rolls: Any
    candidates: Any

    @classmethod
    def said(cls, before: str) -> GateOptions:
        defaults = ",".join(gate.DEFAULT_CHECKS)
        return cls(
            typer.Option(
                help="Quality checks, comma-separated (dark, blank, flat, duplicate, safety, "
                f"clip), or none for no gate [{before}{defaults}]."
            ),
            typer.Option(
                help="Hold a check to another threshold: dark=0.1 (repeatable) "
                f"[{before}the check's own]."
            ),
            typer.Option(
                help="Times an item whose every candidate failed a check is drawn again, "
                f"0-{gate.MAX_ROLLS} [{before}{gate.DEFAULT_MAX_ROLLS}]."
            ),
            typer.Option(
                help=f"Images drawn per item, 1-{gate.MAX_CANDIDATES}, the best one kept "
                f"[{before}{gate.DEFAULT_CANDIDATES}]."
            ),
        )


ENQUEUE_GATE = GateOptions.said("pack, else ")
GENERATE_GATE = GateOptions.said("")


def manifest(
    ctx: typer.Context,
    run: Annotated[str, typer.Argument(help="Run name.")],
    out_file: Annotated[
        Path | None, typer.Option("--out", help="Write here instead of standard output.")
    ] = None,
    upload: Annotated[
        bool,
        typer.Option(
            "--upload", help="Write <run>/manifest.jsonl and <run>/manifest.json to the bucket."
        ),
    ] = False,
) -> None:
    """JSON Lines, one per succeeded item: run, sku, shot, key, seed (of the stored image),
    roll, quality scores and verdict, sha256, bytes, prompt, negative prompt, model and
    generation parameters; items waiting for review are left out until approved. Written to
    the bucket by itself when a run completes; --upload writes it again now."""
    from skufleet.producer.paths import check_output, open_output

    settings: Settings = ctx.obj
    with reported():
        if out_file:
            check_output(out_file, flag="--out")
        engine = ledger_engine(settings)
        if upload:
            from skufleet.producer.bucket import Bucket
            from skufleet.producer.downstream import write_manifest

            key, count = write_manifest(engine, Bucket(settings), run)
            err.print(f"{count:,} items written to {escape(f's3://{settings.s3_bucket}/{key}')}")
            return
        with contextlib.ExitStack() as stack:
            sink = (
                stack.enter_context(open_output(out_file, flag="--out"))
                if out_file
                else (sys.stdout)
            )
            conn = stack.enter_context(ledger.connect(engine))
            count = 0
            for record in ledger.manifest(conn, run):
                sink.write(json.dumps(record, ensure_ascii=False) + "\n")
                count += 1
    if out_file:
        err.print(f"{count:,} items written to {escape(str(out_file))}")


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
    from skufleet.producer.bucket import Bucket
    from skufleet.producer.downstream import presigned
    from skufleet.producer.paths import check_output, open_output

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
    from skufleet.producer.flower import serve

    settings: Settings = ctx.obj
    with reported():
        serve(settings, address=address, port=port)


def metrics(
    ctx: typer.Context,
    address: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.", callback=port_option)] = 9808,
) -> None:
    """Prometheus metrics Flower lacks: queue depth per queue, items by status per run,
    failures and retries by kind, and the quality gate's items waiting for review, re-rolls,
    renders and usable share per run, for open runs and those active in the last day (served
    on /metrics; per-device rates come from each worker's --metrics-port)."""
    from prometheus_client import REGISTRY, start_http_server

    from skufleet.producer.metrics import FleetCollector
    from skufleet.producer.publish import Publisher
    from skufleet.schemas.names import render_queue

    settings: Settings = ctx.obj
    with reported():
        engine = ledger_engine(settings)
        publisher = Publisher(settings)
        # the broker answers at start; a later outage only leaves its samples out
        publisher.queue_length(render_queue(settings.queue_prefix, settings.model))
        REGISTRY.register(FleetCollector(settings, engine, publisher))
        try:
            start_http_server(port, addr=address)
        except OSError as exc:
            raise ConfigError(f"cannot listen on {address}:{port}: {exc.strerror}") from exc
        err.print(f"metrics on http://{escape(address)}:{port}/metrics")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)


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
    checks: Annotated[str | None, GENERATE_GATE.checks] = None,
    threshold: Annotated[list[str] | None, GENERATE_GATE.threshold] = None,
    max_rolls: Annotated[int | None, GENERATE_GATE.max_rolls] = None,
    candidates: Annotated[int | None, GENERATE_GATE.candidates] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the run, saved paths and missing images as JSON.")
    ] = False,
) -> None:
    """A handful of images of one prompt through the fleet: queue them, wait, save them."""
    from skufleet.producer.generate import generate as run_generate

    settings: Settings = ctx.obj
    with reported():
        model = model or settings.model
        overrides = parse_overrides(model, size, steps=steps)
        quality = gate.resolve(
            flags=gate.from_flags(checks, threshold or (), max_rolls, candidates)
        )
        generated = run_generate(
            settings,
            ledger_engine(settings),
            prompt,
            negative=negative,
            count=count,
            seed=seed,
            model=model,
            overrides=overrides,
            quality=quality,
            out_dir=out_dir,
            timeout=timeout,
            console=err,
        )
    if as_json:
        print(json.dumps(generated.as_dict(), ensure_ascii=False))
    else:
        for path in generated.paths:
            print(path)  # one path a line, unwrapped, for scripts
    if generated.missing:
        raise typer.Exit(1)  # finished with failures: the exit-code policy of every command


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
    from skufleet.producer.publish import Publisher
    from skufleet.producer.reconcile import reconcile as reconcile_pass

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


def demo(
    ctx: typer.Context,
    catalogue: Annotated[
        Path | None,
        typer.Argument(help="Catalogue CSV [the example catalogue that ships with skufleet]."),
    ] = None,
    model: Annotated[
        str, typer.Option(help="Model id or path; 'tiny' needs no download.")
    ] = "tiny",
    template: Annotated[str, typer.Option(help="Template pack name or path.")] = "ecommerce",
    directory: Annotated[
        Path, typer.Option("--dir", help="Where services keep data and images land.")
    ] = Path("skufleet-demo"),
    batch_size: Annotated[int, typer.Option(help="Items per render message.")] = 4,
    delimiter: Annotated[
        str | None,
        typer.Option(help="Field delimiter: comma, semicolon, tab or pipe [the header's]."),
    ] = None,
    keep: Annotated[
        bool,
        typer.Option("--keep", help="Leave the stack running; <dir>/skufleet.env describes it."),
    ] = False,
    use_configured: Annotated[
        bool,
        typer.Option(
            "--use-configured",
            help="Use the Redis, ledger and S3 that SKUFLEET_* name (and upgrade that ledger) "
            "instead of private ones.",
        ),
    ] = False,
    stop: Annotated[
        bool, typer.Option("--stop", help="Stop a stack left running by --keep.")
    ] = False,
) -> None:
    """Start a private fleet in --dir (Redis, S3, SQLite, Flower, a worker per device),
    render a catalogue with it, copy the images out, and stop it all. Configured SKUFLEET_*
    services are left alone unless --use-configured."""
    from skufleet.producer import demo as demo_module
    from skufleet.producer.catalogue import parse_delimiter
    from skufleet.producer.template import EXAMPLES, TemplatePack

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
            catalogue or EXAMPLES / "catalogue.csv",
            directory=directory,
            model=model,
            pack=TemplatePack.load(template),
            batch_size=batch_size,
            console=err,
            keep=keep,
            use_configured=use_configured,
            delimiter=parse_delimiter(delimiter) if delimiter is not None else None,
        )
    table = Table(title=f"run {escape(result.run)}", show_header=False)
    for name in ("succeeded", "failed"):
        table.add_row(name, str(result.counts[name]))
    table.add_row("rejected rows", str(result.summary.rejected + result.summary.duplicates))
    table.add_row("seconds", f"{result.seconds:.1f}")
    out.print(table)
    out.print(f"{len(result.images)} images in {escape(str(directory / 'images' / result.run))}/")
    if result.env_file is not None:
        out.print(
            f"the stack is still running (Flower at {escape(str(result.flower))}); use it from "
            "a shell with:"
        )
        print(f"source {shlex.quote(str(result.env_file))}", flush=True)  # whole, to copy
        out.print(f"stop it with: skufleet demo --stop --dir {escape(str(directory))}")
    if result.counts["failed"]:
        raise typer.Exit(1)
