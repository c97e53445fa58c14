"""``skufleet generate``: a handful of images of one prompt, through the same fleet.

The images are items of a run of their own (``generate-<time>-<hex>``), so they are rendered
by the same workers, recorded in the ledger and stored in the bucket like any catalogue's;
this command waits for them and copies them to a local folder.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from sqlalchemy.engine import Engine

from skufleet.producer.bucket import Bucket
from skufleet.producer.enqueue import publish_pending
from skufleet.producer.progress import wait_for_run
from skufleet.producer.publish import Publisher
from skufleet.producer.seed import SEED_SPACE
from skufleet.schemas import gate, ledger
from skufleet.schemas.errors import ConfigError
from skufleet.schemas.names import render_queue
from skufleet.schemas.params import layer
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import ItemStatus

MAX_IMAGES = 64


@dataclass(frozen=True)
class Generated:
    run: str
    """The run the images were items of (``skufleet status`` takes it)."""
    paths: list[Path]
    """The images saved, one per item that succeeded."""
    missing: list[dict[str, Any]]
    """Images that failed, wait for review (failed a quality check) or were cancelled (sku,
    shot, status, error): the command then exits 1."""

    def as_dict(self) -> dict[str, Any]:
        """``generate --json``."""
        return {
            "run": self.run,
            "paths": [str(path) for path in self.paths],
            "missing": self.missing,
        }


def generate(
    settings: Settings,
    engine: Engine,
    prompt: str,
    *,
    negative: str = "",
    count: int = 4,
    seed: int = 0,
    model: str,
    overrides: dict[str, Any],
    quality: dict[str, Any] | None = None,
    out_dir: Path,
    timeout: float,
    console: Console,
) -> Generated:
    """Queue ``count`` images of ``prompt`` (seeds ``seed``, ``seed + 1``, …), wait for the
    fleet to draw them, and save them in ``out_dir``; returns their paths. ``quality``: the
    run's quality-gate settings (``schemas.gate.resolve``; the defaults when None); an image
    that fails a check waits for review and is not saved."""
    if not 1 <= count <= MAX_IMAGES:
        raise ConfigError(f"-n must be 1-{MAX_IMAGES}, got {count}")
    if not prompt.strip():
        raise ConfigError("the prompt is empty")
    if not 0 <= seed <= SEED_SPACE - count:
        raise ConfigError(f"--seed must be 0-{SEED_SPACE - count}, got {seed}")
    layered = layer(model, flags=overrides)
    run = f"generate-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"
    rows = [
        {
            "sku": f"image-{i + 1:02d}",
            "shot": "main",
            "prompt": prompt.strip(),
            "negative_prompt": negative.strip(),
            "seed": seed + i,
            "output": layered.spec().to_json(),
            **layered.params.model_dump(),
        }
        for i in range(count)
    ]
    # 1. the items, then their messages
    with ledger.begin(engine) as conn:
        params = {**overrides, "quality": quality or gate.resolve()}
        run_id = ledger.upsert_run(conn, run, model, seed, "generate", params)
        staging = ledger.ItemStaging(conn, run_id)
        staging.add(rows)
        staging.merge()
    queue = render_queue(settings.queue_prefix, model)
    with Publisher(settings) as publisher:
        publish_pending(engine, publisher, run_id, model, queue, batch_size=count)

    # 2. wait for the fleet, showing progress from the ledger
    with Progress(
        TextColumn(f"run {run}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        task = progress.add_task(run, total=count)
        counts = wait_for_run(
            engine,
            run,
            count,
            deadline=time.monotonic() + timeout,
            late=(
                f"no result after {timeout:.0f}s: are workers for model {model!r} running? "
                f"(they consume {queue}); the run {run} stays queued"
            ),
            on_progress=lambda done: progress.update(task, completed=done),
        )

    # 3. the images, out of the bucket
    bucket = Bucket(settings)
    paths = []
    with ledger.connect(engine) as conn:
        records = list(ledger.manifest(conn, run))
        missing = ledger.missing_items(conn, run)
    for record in records:
        path = out_dir / f"{run}-{record['sku']}.{record['key'].rsplit('.', 1)[-1]}"
        bucket.download(record["key"], path)
        paths.append(path)
    if counts[ItemStatus.FAILED]:
        console.print(
            f"{counts[ItemStatus.FAILED]} of {count} images failed; see `skufleet status {run}`"
        )
    if counts[ItemStatus.NEEDS_REVIEW]:
        console.print(
            f"{counts[ItemStatus.NEEDS_REVIEW]} of {count} images failed a quality check and "
            f"wait for review; see `skufleet review {run}`"
        )
    if counts[ItemStatus.CANCELLED]:
        console.print(f"{counts[ItemStatus.CANCELLED]} of {count} images were cancelled")
    return Generated(run, paths, missing)
