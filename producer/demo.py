"""``skufleet demo``: the whole fleet on one machine, from nothing, in one command.

Starts what is not configured (Redis from ``redis-server``, SeaweedFS as the S3 server, a
SQLite ledger), enqueues a catalogue with the ``tiny`` model (or any ``--model``), runs one
CPU worker in burst mode, shows progress from the ledger, copies the finished images to
``<dir>/images/`` and stops everything it started.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import sqlalchemy as sa
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import Engine

from producer.db import upgrade
from producer.enqueue import EnqueueRequest, EnqueueSummary, enqueue
from producer.publish import Publisher
from producer.services import LocalRedis, LocalS3
from producer.template import TemplatePack
from schemas import ledger
from schemas.errors import ConfigError
from schemas.settings import Settings
from schemas.tables import Item, ItemStatus, Run


@dataclass
class DemoResult:
    run: str
    summary: EnqueueSummary
    counts: dict[str, int]
    images: list[Path]
    seconds: float


def _stack_settings(
    settings: Settings, directory: Path, stack: contextlib.ExitStack, console: Console
) -> tuple[Settings, dict[str, str]]:
    """Settings for the demo: configured services are used, the others started privately.

    Returns the settings and the environment a worker process needs (with the private S3
    server's credentials, when one was started).
    """
    env: dict[str, str] = {}
    overrides: dict[str, object] = {}
    if "SKUFLEET_REDIS_URL" not in os.environ:
        redis = LocalRedis(directory / "redis").start()
        stack.callback(redis.stop)
        overrides["redis_url"] = redis.url
        console.print(f"started Redis at {redis.url}")
    if "SKUFLEET_S3_ENDPOINT_URL" not in os.environ:
        s3 = LocalS3(directory / "s3").start()
        stack.callback(s3.stop)
        env.update(s3.env())
        overrides["s3_endpoint_url"] = s3.endpoint_url
        console.print(f"started SeaweedFS S3 at {s3.endpoint_url}")
    if "SKUFLEET_DATABASE_URL" not in os.environ:
        overrides["database_url"] = f"sqlite:///{directory / 'ledger.db'}"
    settings = settings.model_copy(update=overrides)
    env.update(
        {
            "SKUFLEET_REDIS_URL": settings.redis_url,
            "SKUFLEET_DATABASE_URL": settings.database_url,
            "SKUFLEET_S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
            "SKUFLEET_S3_BUCKET": settings.s3_bucket,
        }
    )
    return settings, env


def _counts(engine: Engine, run: str) -> dict[str, int]:
    with engine.connect() as conn:
        return ledger.run_status(conn, run).counts


def _download(
    settings: Settings, env: dict[str, str], engine: Engine, run: str, target: Path
) -> list[Path]:
    import boto3

    from worker.storage import Storage

    session = boto3.Session(
        aws_access_key_id=env.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY"),
    )
    storage = Storage(settings, session)
    with engine.connect() as conn:
        keys = (
            conn.execute(
                sa.select(Item.object_key)
                .join(Run)
                .where(Run.name == run, Item.status == ItemStatus.SUCCEEDED)
                .order_by(Item.id)
            )
            .scalars()
            .all()
        )
    paths = []
    for key in filter(None, keys):
        path = target / key
        path.parent.mkdir(parents=True, exist_ok=True)
        storage.client.download_file(settings.s3_bucket, key, str(path))
        paths.append(path)
    return paths


def run_demo(
    settings: Settings,
    catalogue: Path,
    *,
    directory: Path,
    model: str,
    pack: TemplatePack,
    batch_size: int,
    console: Console,
    timeout: float = 1800.0,
) -> DemoResult:
    """Run the demo end to end; every process it starts is stopped before it returns."""
    started = time.monotonic()
    directory.mkdir(parents=True, exist_ok=True)
    run = "demo-" + datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    with contextlib.ExitStack() as stack:
        # 1. services: configured ones are used, missing ones started here
        settings, worker_env = _stack_settings(settings, directory, stack, console)
        engine = ledger.create_engine(settings.database_url)
        stack.callback(engine.dispose)
        upgrade(engine)

        # 2. the catalogue goes into the ledger and onto the queue
        publisher = Publisher(settings)
        stack.callback(publisher.close)
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
            f"{summary.accepted} rows of {catalogue} "
            f"({summary.rejected} rejected, {summary.duplicates} duplicates)"
        )

        # 3. one CPU worker drains the queue and exits (burst)
        log_path = directory / "worker.log"
        log = stack.enter_context(log_path.open("ab"))
        worker = subprocess.Popen(
            [
                str(Path(sys.executable).parent / "skufleet-worker"),
                "--model",
                model,
                "--devices",
                "cpu",
                "--burst",
            ],
            env={**os.environ, **worker_env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        stack.callback(_stop, worker)
        total = summary.items
        with Progress(
            TextColumn("rendering"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as progress:
            task = progress.add_task("render", total=total)
            while worker.poll() is None:
                counts = _counts(engine, run)
                progress.update(task, completed=counts["succeeded"] + counts["failed"])
                if time.monotonic() - started > timeout:
                    raise ConfigError(f"demo did not finish within {timeout:.0f}s; see {log_path}")
                time.sleep(0.5)
            counts = _counts(engine, run)
            progress.update(task, completed=counts["succeeded"] + counts["failed"])
        if worker.returncode != 0:
            raise ConfigError(f"the worker exited with code {worker.returncode}; see {log_path}")

        # 4. finished images are copied out of the bucket
        images = _download(settings, worker_env, engine, run, directory / "images")
    return DemoResult(run, summary, counts, images, time.monotonic() - started)


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
