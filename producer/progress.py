"""Waiting for a run: the ledger polled until every item of it is done.

Done means at rest (``ledger.TERMINAL``): succeeded, failed or cancelled. A cancelled item
is never drawn, so a wait that counted only images would wait for it until its deadline.
``skufleet generate`` and ``skufleet demo`` both wait here.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError

POLL_SECONDS = 0.5
"""Seconds between two looks at the ledger."""


def wait_for_run(
    engine: Engine,
    run_name: str,
    total: int,
    *,
    deadline: float,
    late: str,
    on_progress: Callable[[int], None] | None = None,
    worker: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> dict[str, int]:
    """Poll the ledger until ``total`` items of run ``run_name`` are done (succeeded, failed
    or cancelled); their counts by status.

    ``on_progress(done)`` is called after every look. Raises ConfigError saying ``late``
    once ``deadline`` (a ``time.monotonic()`` value) has passed, or when ``worker``, the
    process drawing the run, has exited with an error; both messages point at ``log``
    where one is given.
    """
    see = f"; see {log}" if log is not None else ""
    while True:
        with ledger.connect(engine) as conn:
            status = ledger.run_status(conn, run_name)
        if on_progress is not None:
            on_progress(status.done)
        if status.done >= total:
            return status.counts
        if worker is not None and worker.poll() is not None and worker.returncode != 0:
            raise ConfigError(f"the worker exited with code {worker.returncode}{see}")
        if time.monotonic() > deadline:
            raise ConfigError(f"{late}{see}")
        time.sleep(POLL_SECONDS)
