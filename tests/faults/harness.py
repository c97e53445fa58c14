"""A real fleet to break: private Redis, a fresh PostgreSQL database, the session's S3 server,
stand-in worker processes, and the reconciler, each a separate process.

The workers run the real worker code (Celery, ledger, storage, background storing) around a
stand-in pipeline that sleeps and draws a flat colour (tests/fixtures). Faults are real: a
SIGKILL, a broker killed and restarted, PUTs answered 503 or cut off, database connections
terminated. After each scenario :meth:`FaultFleet.invariants` checks the README's
invariants and returns the figures the scenario prints.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from skufleet.producer.services import (
    LocalRedis,
    LocalS3,
    kill_group,
    signal_group,
    spawn_group,
    wait_until,
)
from skufleet.schemas import ledger
from skufleet.schemas.tables import Item, ItemStatus
from tests.fixtures import stand_in_worker
from tests.fleet import Fleet

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
FULL = os.environ.get("SKUFLEET_FAULTS") == "full"
"""`bench/faults.py` sets SKUFLEET_FAULTS=full: hundreds of items and more faults."""
RESULTS: list[dict[str, Any]] = []
"""Figures of every scenario run in this process, for bench/faults.py to collect."""


@dataclass
class Figures:
    """What a scenario measured; printed, and collected by bench/faults.py."""

    scenario: str
    items: int
    succeeded: int
    failed: int
    faults: int
    extra_renders: int
    """Renders started beyond one per item (attempts − items)."""
    extra_bound: int
    """I4's bound: faults × 2 batches (one drawing, one being stored), plus the cap for each
    dead-lettered item."""
    objects: int
    seconds: float
    fault_free_seconds: float
    recovery_seconds: float
    """From the last fault to the end of the run."""
    recovery_budget_seconds: float
    """I5: the run must end within fault_free_seconds plus this."""
    notes: dict[str, Any] = field(default_factory=dict)

    def report(self) -> str:
        RESULTS.append(asdict(self))
        line = json.dumps(asdict(self))
        print(f"\nFAULTS {line}")
        return line


class FaultFleet:
    """Context manager: the services, ``workers`` worker processes and a reconciler."""

    def __init__(
        self,
        tmp_path: Path,
        s3: LocalS3,
        database_url: str,
        *,
        fixture: tuple[str, ...] = ("--fixture", "standin", "--sleep", "0.2"),
        workers: int = 2,
        lease: int = 4,
        visibility: int = 8,
        lost_after: int = 4,
        reconcile_every: float = 0.5,
        max_attempts: int = 5,
        appendonly: bool = False,
        s3_endpoint: str | None = None,
        worker_database_url: str | None = None,
        reconciler: bool = True,
    ) -> None:
        self.tmp_path = tmp_path
        self.s3 = s3
        self.database_url = database_url
        self.fixture = fixture
        self.worker_count = workers
        self.redis = LocalRedis(tmp_path / "redis", appendonly=appendonly)
        self.bucket = f"faults-{secrets.token_hex(5)}"
        self.run = "faults"
        self.env = {
            **os.environ,
            **s3.env(),
            "SKUFLEET_DATABASE_URL": database_url,
            "SKUFLEET_REDIS_URL": self.redis.url,
            "SKUFLEET_S3_BUCKET": self.bucket,
            "SKUFLEET_S3_ENDPOINT_URL": s3_endpoint or s3.endpoint_url,
            "SKUFLEET_LEASE_SECONDS": str(lease),
            "SKUFLEET_VISIBILITY_TIMEOUT": str(visibility),
            "SKUFLEET_LOST_AFTER_SECONDS": str(lost_after),
            "SKUFLEET_RECONCILE_SECONDS": str(reconcile_every),
            "SKUFLEET_MAX_ATTEMPTS": str(max_attempts),
            "SKUFLEET_RETRY_BACKOFF_SECONDS": "0.2",
            "PYTHONPATH": str(ROOT),
        }
        self.commands = Fleet(env=self.env, s3=s3, bucket=self.bucket, tmp_path=tmp_path)
        """The integration tests' harness, for the commands run against this fleet."""
        self.worker_env = {**self.env, "SKUFLEET_DATABASE_URL": worker_database_url or database_url}
        """The workers' environment: their ledger may be reached through an outage proxy."""
        self.with_reconciler = reconciler
        self.workers: dict[int, subprocess.Popen[bytes]] = {}
        self.reconciler: subprocess.Popen[bytes] | None = None
        self.engine = ledger.create_engine(database_url)
        self.items = 0
        self.batch_size = 1

    # --- lifecycle -------------------------------------------------------------------------

    def __enter__(self) -> FaultFleet:
        self.redis.start()
        self.cli("db", "upgrade")
        s3 = self.s3.client()
        s3.create_bucket(Bucket=self.bucket)
        for index in range(self.worker_count):
            self.start_worker(index)
        if self.with_reconciler:
            self.reconciler = self._spawn(
                [str(BIN / "skufleet"), "reconcile", "--watch", "--json"], "reconciler"
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for process in [*self.workers.values(), self.reconciler]:
            if process is not None:
                kill_group(process)
        self.redis.stop()
        self.engine.dispose()

    def _spawn(
        self, command: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = self.tmp_path / f"{name}.log"
        return spawn_group(command, log=log, env=env or self.env, cwd=self.tmp_path)

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    def reconciled(self, field: str) -> int:
        """Total of one field over the reconciler's passes so far (its JSON lines)."""
        total = 0
        for line in self.log("reconciler").splitlines():
            if line.startswith("{"):
                total += int(json.loads(line).get(field, 0))
        return total

    def cli(self, *args: str) -> str:
        """``skufleet ARGS`` against this fleet; its output (the command must succeed)."""
        result = self.commands.cli(*args)
        assert result.returncode == 0, f"skufleet {' '.join(args)}: {result.stderr[-3000:]}"
        return result.stdout

    # --- the run ---------------------------------------------------------------------------

    def enqueue(self, titles: list[str], batch_size: int, *, pack: str | None = None) -> None:
        """Enqueue one item per title (a one-shot pack), SKUs S00000…"""
        catalogue = self.tmp_path / "catalogue.csv"
        catalogue.write_text(
            "sku,title\n" + "".join(f"S{i:05d},{t}\n" for i, t in enumerate(titles))
        )
        template = self.tmp_path / "one-shot.toml"
        template.write_text(
            pack or 'name = "one-shot"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n'
        )
        summary = json.loads(
            self.cli(
                "enqueue",
                str(catalogue),
                "--run",
                self.run,
                "--model",
                "tiny",
                "--template",
                str(template),
                "--batch-size",
                str(batch_size),
                "--json",
            )
        )
        self.items = int(summary["items"])
        self.batch_size = batch_size

    def counts(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return ledger.run_status(conn, self.run).counts

    def wait_done(self, timeout: float, tick: Callable[[float], None] | None = None) -> float:
        """Seconds until every item is succeeded or failed; ``tick(elapsed)`` injects faults."""
        started = time.monotonic()
        while True:
            elapsed = time.monotonic() - started
            counts = self.counts()
            if counts["succeeded"] + counts["failed"] == self.items:
                return elapsed
            if elapsed > timeout:
                raise AssertionError(f"run not finished after {timeout:.0f}s: {counts}")
            # no scenario targets the reconciler: without it lost messages stay lost
            if self.reconciler is not None and self.reconciler.poll() is not None:
                raise AssertionError(
                    f"the reconciler exited with code {self.reconciler.returncode}:\n"
                    + self.log("reconciler")[-3000:]
                )
            if tick is not None:
                tick(elapsed)
            time.sleep(0.2)

    # --- faults ----------------------------------------------------------------------------

    def start_worker(self, index: int) -> None:
        command = stand_in_worker(*self.fixture, name=f"w{index}", burst=False)
        self.workers[index] = self._spawn(command, f"worker-{index}", self.worker_env)

    def wait_ready(self, timeout: float = 60) -> None:
        """Until every worker has said it consumes its queue."""
        wait_until(
            lambda: all(" ready on " in self.log(f"worker-{i}") for i in self.workers),
            timeout,
            "the workers",
        )

    def kill_worker(self, index: int) -> None:
        """SIGKILL: no clean-up, no ack, no goodbye."""
        kill_group(self.workers[index])

    def busy_workers(self) -> list[int]:
        """Workers that hold running items right now (mid-batch)."""
        with self.engine.connect() as conn:
            holders = set(
                conn.execute(
                    sa.select(Item.worker).where(Item.status == ItemStatus.RUNNING).distinct()
                ).scalars()
            )
        return [
            i
            for i, p in self.workers.items()
            if p.poll() is None and any(str(h).startswith(f"w{i}@") for h in holders)
        ]

    def restart_dead_workers(self) -> int:
        """What a supervisor does: start again every worker that died; returns how many."""
        dead = [i for i, p in self.workers.items() if p.poll() is not None]
        for index in dead:
            self.start_worker(index)
        return len(dead)

    def stop_workers(self, timeout: float = 60) -> list[int]:
        """SIGTERM every worker (a warm shutdown), all at once, and wait; their exit codes."""
        for process in self.workers.values():
            signal_group(process, signal.SIGTERM)
        return [process.wait(timeout) for process in self.workers.values()]

    def restart_redis(self) -> None:
        """Kill the broker outright and start it again on the same port."""
        self.redis.kill()
        self.redis.start()

    def terminate_connections(self) -> int:
        """pg_terminate_backend on every connection to the run's database but this one."""
        name = sa.make_url(self.database_url).database
        admin = sa.create_engine(sa.make_url(self.database_url).set(database="postgres"))
        with admin.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> pg_backend_pid()"
                ),
                {"name": name},
            ).scalar_one()
        admin.dispose()
        return int(killed)

    # --- invariants ------------------------------------------------------------------------

    def invariants(
        self,
        scenario: str,
        *,
        faults: int,
        seconds: float,
        last_fault: float,
        fault_free: float,
        budget: float,
        dead_lettered: int = 0,
        max_attempts: int = 5,
        **notes: Any,
    ) -> Figures:
        """Check I1-I5 and return the figures. ``budget`` is the recovery time the scenario
        allows on top of the fault-free time (I5)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(
                    Item.status,
                    Item.object_key,
                    Item.byte_size,
                    Item.sha256,
                    Item.attempts,
                    Item.last_error,
                )
            ).all()
        succeeded = [r for r in rows if r.status == ItemStatus.SUCCEEDED]
        failed = [r for r in rows if r.status == ItemStatus.FAILED]
        # I1 no loss: every item is succeeded or failed with a reason
        assert len(succeeded) + len(failed) == self.items == len(rows)
        assert all(r.last_error for r in failed)
        # I2 no duplicates / I3 no orphans: the run's objects are exactly the succeeded rows,
        # each with the recorded size and sha256
        client = self.s3.client()
        objects: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket):
            objects.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
        # the run's completion wrote its manifest: one line per succeeded item, and its
        # summary beside it
        objects.pop(f"{self.run}/manifest.json", None)
        manifest = f"{self.run}/manifest.jsonl"
        if manifest in objects:
            del objects[manifest]
            body = client.get_object(Bucket=self.bucket, Key=manifest)["Body"].read()
            assert len(body.decode().splitlines()) == len(succeeded)
        assert all(key.startswith(f"{self.run}/") for key in objects)
        assert sorted(objects) == sorted(r.object_key for r in succeeded)
        for row in succeeded:
            body = client.get_object(Bucket=self.bucket, Key=row.object_key)["Body"].read()
            assert len(body) == row.byte_size == objects[row.object_key]
            assert hashlib.sha256(body).hexdigest() == row.sha256
        # I4 bounded re-execution: a fault costs at most the batch being drawn and the one
        # being stored in the background (the overlap), and a dead-lettered item its cap
        extra = sum(r.attempts for r in rows) - len(rows)
        bound = faults * 2 * self.batch_size + dead_lettered * max_attempts
        assert extra <= bound, f"{extra} renders beyond one per item, bound {bound}"
        # I5 liveness: done within the fault-free time plus the stated recovery budget
        assert seconds <= fault_free + budget, f"{seconds:.1f}s > {fault_free:.1f}s + {budget}s"
        return Figures(
            scenario=scenario,
            items=len(rows),
            succeeded=len(succeeded),
            failed=len(failed),
            faults=faults,
            extra_renders=extra,
            extra_bound=bound,
            objects=len(objects),
            seconds=round(seconds, 1),
            fault_free_seconds=round(fault_free, 1),
            recovery_seconds=round(max(0.0, seconds - last_fault), 1),
            recovery_budget_seconds=budget,
            notes=notes,
        )
