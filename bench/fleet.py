"""Fleet benchmark: real worker processes, real services, a stand-in device.

    python bench/fleet.py                 # the full run, ~5 minutes on two cores
    python bench/fleet.py --smoke         # 16 items at 128×128, 1 and 2 workers: ~1 minute

Each worker is the real worker process (``skufleet.worker.process``: Celery, ledger claims
and leases, the quality gate, encoding, SHA-256, uploads, the ledger's finish) around a
stand-in device (``bench/standin.py``): a set time per image, photographs cropped per item
for pixels, so what the host does per image is what it does for real output. Items are
enqueued with ``skufleet enqueue`` into a fresh PostgreSQL database, through a private
``redis-server``, and stored in a private SeaweedFS S3 server, all started here.

What it measures, in one run:

1. encoding: ms (one thread) and KB per 512×512 photo for PNG levels 1, 3, 6 (the worker's
   standard path) and 9, the worker's fast PNG path (``compression = "fast"``), lossless
   WebP (default effort and method 0), WebP and JPEG at quality 90;
2. one worker at 512×512, batches of 8, with a device of 0 (instant), 25 and 50 ms per
   image: images/s; the device's busy share (its seconds over the run's wall time, first
   claim to last finish); how long the device sat idle between batches, and what the
   worker did meanwhile (its claim and quality checks, timed inside the worker process by
   ``standin.profile``); host CPU per image in the worker (its own process, less what the
   stand-in spent making pixels); and CPU per item in PostgreSQL, Redis and the S3 server
   (less each one's idle rate, measured before any worker starts). Then the instant device
   again with the standard PNG path, for comparison;
3. 1, 2, 4 and 8 workers at 128×128 with a 200 ms device (slow enough that these two cores
   are not the limit: every run reports the share of the machine's CPU in use): images/s
   against workers ÷ device time, in steady state (each worker's images over its own first
   claim to last finish, summed) and over the whole run (the drain at the end included);
4. from the per-item costs of the 50 ms run (20 images/s, an H100-class GPU's rate), each
   service's capacity in items/s per core, and the GPUs one core of it serves.

CPU is read from ``/proc`` before and after each run: each worker's, redis-server's and
SeaweedFS's process group (started here, so theirs alone), and PostgreSQL's backends of the
benchmark's database, told by their process titles (the server is shared: other
databases' backends are not counted, the WAL writer's and checkpointer's work for every
database is reported apart, as ``postgres_shared``).

Prints progress to stderr, the JSON to stdout, then Markdown tables (for the README) to
stderr, and writes ``bench/results/fleet-<date>.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
BENCH = Path(__file__).resolve().parent
for folder in (ROOT, BENCH):
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))

from standin import PhotoSource  # noqa: E402

from skufleet.producer.db import upgrade  # noqa: E402
from skufleet.producer.services import (  # noqa: E402
    LocalRedis,
    LocalS3,
    free_port,
    spawn_group,
    stop_group,
    wait_until,
)
from skufleet.schemas import ledger  # noqa: E402
from skufleet.schemas.output import OutputSpec  # noqa: E402
from skufleet.schemas.tables import Item, ItemStatus, Run  # noqa: E402
from skufleet.worker.postprocess import process  # noqa: E402

MODEL = "tiny"
"""The model name the stand-in workers serve (nothing is loaded: only the queue's name)."""
GPU_IMAGES_PER_SECOND = 20.0
GPU_ASSUMPTION = (
    "one H100-class GPU draws 20 images/s: SD 1.5 at 512×512, 30 steps with guidance, "
    "~51 ms an image at the physical limit (50.7 TFLOP an image at 989 dense fp16 TFLOPS)"
)
TICK = os.sysconf("SC_CLK_TCK")
CORES = os.cpu_count() or 1
PACK = 'name = "bench"\n[categories.default.shots.main]\nprompt = "{{ title }}"\n'
METADATA = {
    "prompt": "professional product photo of a leather hiking boot, white background",
    "negative_prompt": "blurry, low quality, watermark, text",
    "seed": "1234567",
    "steps": "30",
    "guidance_scale": "7.5",
    "scheduler": "default",
    "model": "stable-diffusion-v1-5/stable-diffusion-v1-5",
    "sku": "SKU-0000001",
}
"""What the worker embeds in an image (worker.store), for the encoding rows that embed."""
DONE = (ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW, ItemStatus.FAILED)
SETTLE_SECONDS = 1.0
"""After every worker said it is ready, before the first reading."""
PARTS = ("encoding", "sweep", "comparison", "scaling")
IDLE_SECONDS = 3.0
"""The services' idle rate is read over this long, before any worker starts."""


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def fast_png_available() -> bool:
    """Whether this checkout's OutputSpec has the fast PNG path (``compression``)."""
    return "compression" in {f.name for f in dataclasses.fields(OutputSpec)}


def output_spec(compression: str) -> OutputSpec:
    if compression == "standard":
        return OutputSpec()
    return OutputSpec(**{"format": "png", "compression": compression})  # type: ignore[arg-type]


# --- CPU time from /proc ------------------------------------------------------------------


@dataclass(frozen=True)
class Proc:
    pid: int
    pgid: int
    comm: str
    ticks: float
    """utime + stime, in seconds (whole clock ticks: 10 ms), threads that ended included."""
    reaped: float
    """cutime + cstime, in seconds: the children it has waited for."""


def processes() -> list[Proc]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                stat = f.read().decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        rest = stat[stat.rindex(")") + 2 :].split()
        ticks = (int(rest[11]) + int(rest[12])) / TICK
        reaped = (int(rest[13]) + int(rest[14])) / TICK
        found.append(Proc(int(entry.name), int(rest[2]), comm, ticks, reaped))
    return found


def cpu_seconds(proc: Proc) -> float:
    """A process's CPU seconds, to the nanosecond: the sum of its threads' run time
    (``/proc/PID/task/*/schedstat``) where no thread of it has ended, else its clock ticks;
    plus what its reaped children used."""
    precise = 0.0
    try:
        for task in os.scandir(f"/proc/{proc.pid}/task"):
            with open(f"{task.path}/schedstat") as f:
                precise += int(f.read().split()[0]) / 1e9
    except (OSError, ValueError):
        precise = 0.0
    own = precise if precise >= proc.ticks - 2 / TICK else proc.ticks
    return own + proc.reaped


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) clock ticks of every core since boot, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle, iowait
    return sum(values[:8]) - idle, sum(values[:8])


@dataclass
class Reading:
    """CPU seconds of each group of processes, at one moment."""

    at: float
    cpu: dict[str, float]
    machine: tuple[int, int]

    def minus(self, before: Reading) -> dict[str, float]:
        return {k: self.cpu.get(k, 0.0) - before.cpu.get(k, 0.0) for k in self.cpu}

    def machine_seconds(self, before: Reading) -> float:
        """CPU seconds every process of the machine used between the two readings."""
        return (self.machine[0] - before.machine[0]) / TICK

    def machine_share(self, before: Reading) -> float:
        busy = self.machine[0] - before.machine[0]
        total = self.machine[1] - before.machine[1]
        return busy / total if total else 0.0


def postgres_title(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


class Meter:
    """Reads the CPU seconds of the benchmark's processes: each process group of ``groups``
    (name → leaders' pids), and PostgreSQL's: the backends of ``database`` (told by their
    process titles; ``postgres``) and, apart, the server's own background processes (WAL
    writer, checkpointer, background writer; ``postgres_shared``, which work for every
    database), never other databases' backends.

    PostgreSQL's figure is cumulative over every process seen by any reading: a backend
    that exits between readings (the enqueue's) keeps the time last read of it, so reading
    often while one may exit loses little."""

    def __init__(self, groups: dict[str, set[int]], database: str) -> None:
        self.groups = groups
        self.database = database
        self._postgres: dict[int, tuple[str, float]] = {}
        """pid → ("postgres" or "postgres_shared", CPU seconds when last read)."""

    def _kind(self, pid: int) -> str | None:
        """``postgres`` for a backend of the benchmark's database, ``postgres_shared`` for
        the server's own processes, None for the postmaster and other databases'."""
        title = postgres_title(pid) + " "
        if title.startswith("/") or not title.strip():
            return None  # the postmaster: its reaped children are everyone's
        if "(" in title or "[local]" in title or "worker" in title:
            # a client backend, an autovacuum worker
            return "postgres" if f" {self.database} " in title else None
        return "postgres_shared"  # checkpointer, background writer, WAL writer, launchers

    def read(self) -> Reading:
        now = time.monotonic()
        cpu = dict.fromkeys([*self.groups, "postgres", "postgres_shared"], 0.0)
        for proc in processes():
            if proc.comm == "postgres":
                if proc.pid not in self._postgres:
                    kind = self._kind(proc.pid)
                    if kind is None:
                        continue
                    self._postgres[proc.pid] = (kind, 0.0)
                self._postgres[proc.pid] = (self._postgres[proc.pid][0], cpu_seconds(proc))
                continue
            for name, leaders in self.groups.items():
                if proc.pgid in leaders:
                    cpu[name] += cpu_seconds(proc)
        for kind, seconds in self._postgres.values():
            cpu[kind] += seconds
        cpu["bench"] = time.process_time()  # this process, every thread
        return Reading(now, cpu, machine_jiffies())


# --- encoding -------------------------------------------------------------------------------


def encoding_table(size: int, count: int) -> dict[str, Any]:
    """Every candidate encoding on the same ``count`` photos: ms and CPU ms per image on one
    thread, KB per image, and whether the pixels read back exactly."""
    source = PhotoSource()
    arrays = [source.image(seed * 7919 + 11, size, size) for seed in range(count)]
    images = [Image.fromarray(a) for a in arrays]

    def pillow(**options: Any) -> Any:
        def encode(image: Image.Image) -> bytes:
            buffer = io.BytesIO()
            image.save(buffer, **options)
            return buffer.getvalue()

        return encode

    def worker(spec: OutputSpec) -> Any:
        return lambda image: process(image, spec, METADATA).body

    rows: list[tuple[str, Any, bool]] = [
        ("PNG level 1 (Pillow)", pillow(format="PNG", compress_level=1), True),
        ("PNG level 3 (Pillow)", pillow(format="PNG", compress_level=3), True),
        ("PNG level 6 (Pillow; the worker's standard path)", pillow(format="PNG"), True),
        ("PNG level 9 (Pillow)", pillow(format="PNG", compress_level=9), True),
        ("worker standard path (postprocess.process: PNG 6, metadata)", worker(OutputSpec()), True),
    ]
    notes = []
    if fast_png_available():
        rows.append(
            (
                'worker fast PNG path (postprocess.process, compression="fast")',
                worker(output_spec("fast")),
                True,
            )
        )
    else:
        notes.append(
            'the worker\'s fast PNG path (OutputSpec(compression="fast")) is not in this '
            "checkout: its row is skipped"
        )
    rows += [
        ("WebP lossless (Pillow, default effort)", pillow(format="WEBP", lossless=True), True),
        (
            "WebP lossless, method 0 (Pillow)",
            pillow(format="WEBP", lossless=True, method=0),
            True,
        ),
        ("WebP quality 90 (Pillow)", pillow(format="WEBP", quality=90), False),
        ("JPEG quality 90 (Pillow)", pillow(format="JPEG", quality=90), False),
    ]
    results = []
    for name, encode, lossless in rows:
        encode(images[0])  # warm: first-use costs (tables, imports) are not per image
        wall = cpu = 0.0
        total = 0
        exact = True
        for image, pixels in zip(images, arrays, strict=True):
            started, started_cpu = time.perf_counter(), time.thread_time()
            body = encode(image)
            wall += time.perf_counter() - started
            cpu += time.thread_time() - started_cpu
            total += len(body)
            if lossless:
                with Image.open(io.BytesIO(body)) as decoded:
                    exact = exact and decoded.convert("RGB").tobytes() == pixels.tobytes()
        results.append(
            {
                "encoding": name,
                "ms_per_image": round(1000 * wall / count, 2),
                "cpu_ms_per_image": round(1000 * cpu / count, 2),
                "kb_per_image": round(total / count / 1024, 1),
                "lossless": exact if lossless else False,
            }
        )
        log(f"  {name}: {results[-1]['ms_per_image']} ms, {results[-1]['kb_per_image']} KB")
    started = time.perf_counter()
    for image in images:
        hashlib.sha256(image.tobytes()).hexdigest()
    sha_ms = 1000 * (time.perf_counter() - started) / count
    return {
        "size": f"{size}x{size}",
        "images": count,
        "photos": "the stand-in's images: scikit-image's sample photographs, cropped per item",
        "rows": results,
        "sha256_ms_per_raw_image": round(sha_ms, 3),
        "notes": notes,
    }


# --- the fleet -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scenario:
    name: str
    workers: int
    size: int
    seconds_per_image: float
    items: int
    batch_size: int
    compression: str


@dataclass
class Services:
    work: Path
    redis: LocalRedis
    s3: LocalS3
    database_url: str
    database: str
    bucket: str
    background: dict[str, float]
    """Idle CPU seconds per second of each service, with no worker running."""

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            **self.s3.env(),
            "SKUFLEET_DATABASE_URL": self.database_url,
            "SKUFLEET_REDIS_URL": self.redis.url,
            "SKUFLEET_S3_BUCKET": self.bucket,
            "SKUFLEET_QUEUE_PREFIX": "bench",
            "PYTHONPATH": str(ROOT),
            "CUDA_VISIBLE_DEVICES": "",
        }

    def groups(self, workers: list[subprocess.Popen[bytes]] | None = None) -> dict[str, set[int]]:
        assert self.redis.process is not None and self.s3.process is not None
        return {
            "redis": {self.redis.process.pid},
            "s3": {self.s3.process.pid},
            "workers": {w.pid for w in workers or []},
        }


@contextmanager
def services(postgres_url: str) -> Iterator[Services]:
    """A private redis-server and SeaweedFS, a fresh PostgreSQL database, one bucket."""
    work = Path(tempfile.mkdtemp(prefix="skufleet-fleet-bench-"))
    name = f"skufleet_bench_fleet_{secrets.token_hex(4)}"
    admin = sa.create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    redis = LocalRedis(work / "redis")
    s3 = LocalS3(work / "s3")
    try:
        log("starting redis-server and SeaweedFS …")
        redis.start()
        s3.start()
        database_url = sa.make_url(postgres_url).set(database=name).render_as_string(False)
        engine = ledger.create_engine(database_url)
        upgrade(engine)
        engine.dispose()
        bucket = f"fleet-{secrets.token_hex(4)}"
        s3.client().create_bucket(Bucket=bucket)
        found = Services(work, redis, s3, database_url, name, bucket, {})
        time.sleep(1.0)  # SeaweedFS settles after its first bucket
        meter = Meter(found.groups(), name)
        before = meter.read()
        time.sleep(IDLE_SECONDS)
        after = meter.read()
        seconds = after.at - before.at
        found.background = {
            key: value / seconds for key, value in after.minus(before).items() if key != "workers"
        }
        log(
            "idle CPU, ms/s: "
            + ", ".join(f"{k} {1000 * v:.1f}" for k, v in found.background.items())
        )
        yield found
    finally:
        redis.stop()
        s3.stop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()
        shutil.rmtree(work, ignore_errors=True)


def write_catalogue(path: Path, items: int) -> None:
    adjectives = ["red", "oak", "steel", "linen", "wool", "leather", "glass", "bamboo"]
    nouns = ["boot", "tote", "kettle", "lamp", "rug", "mug", "vase", "clock", "chair"]
    lines = ["sku,title"]
    for i in range(items):
        lines.append(f"SKU-{i:06d},{adjectives[i % 8]} {nouns[(i // 8) % 9]} model {i}")
    path.write_text("\n".join(lines) + "\n")


SCRAPED = (
    "skufleet_worker_device_busy_seconds_total",
    "skufleet_worker_images_total",
    "skufleet_worker_check_seconds_total",
)


def scrape(port: int) -> dict[str, float]:
    """The worker's device-busy seconds, images and quality-check seconds, from its
    Prometheus metrics (the figures a dashboard would take its rates from)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return {}
    found: dict[str, float] = {}
    for line in text.splitlines():
        for metric in SCRAPED:
            if line.startswith(metric + "{"):
                found[metric] = found.get(metric, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def ledger_figures(database_url: str, run: str) -> dict[str, Any]:
    """What the ledger says of the run: counts by status, renders, bytes, the wall time from
    the first claim to the last finish, and each worker's own (its first claim to its last
    finish)."""
    engine = ledger.create_engine(database_url)
    with engine.connect() as conn:
        run_id = conn.execute(sa.select(Run.id).where(Run.name == run)).scalar_one()
        rows = conn.execute(
            sa.select(
                Item.status,
                Item.worker,
                sa.func.count(),
                sa.func.sum(Item.renders),
                sa.func.sum(Item.rerolls),
                sa.func.min(Item.started_at),
                sa.func.max(Item.finished_at),
                sa.func.sum(Item.byte_size),
            )
            .where(Item.run_id == run_id)
            .group_by(Item.status, Item.worker)
        ).all()
    engine.dispose()
    counts: dict[str, int] = {}
    workers: dict[str, dict[str, Any]] = {}
    for status, worker, count, _, _, started, finished, _ in rows:
        counts[str(status)] = counts.get(str(status), 0) + int(count)
        if status in (ItemStatus.SUCCEEDED, ItemStatus.NEEDS_REVIEW) and worker:
            entry = workers.setdefault(
                str(worker).split("@")[0], {"images": 0, "started": started, "finished": finished}
            )
            entry["images"] += int(count)
            entry["started"] = min(entry["started"], started)
            entry["finished"] = max(entry["finished"], finished)
    started = min(r[5] for r in rows if r[5] is not None)
    finished = max(r[6] for r in rows if r[6] is not None)
    return {
        "counts": counts,
        "images": sum(w["images"] for w in workers.values()),
        "renders": sum(int(r[3] or 0) for r in rows),
        "rerolls": sum(int(r[4] or 0) for r in rows),
        "bytes": sum(int(r[7] or 0) for r in rows),
        "wall_seconds": (finished - started).total_seconds(),
        "workers": {
            name: {
                "images": w["images"],
                "wall_seconds": (w["finished"] - w["started"]).total_seconds(),
            }
            for name, w in sorted(workers.items())
        },
    }


def done_count(engine: sa.Engine, run: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                sa.select(sa.func.count())
                .select_from(Item)
                .join(Run, Run.id == Item.run_id)
                .where(Run.name == run, Item.status.in_(DONE))
            ).scalar_one()
        )


def measure(found: Services, scenario: Scenario, timeout: float) -> dict[str, Any]:
    """Start the scenario's workers, enqueue its items once they are idle, wait until every
    item is done; the figures."""
    run = f"{scenario.name}-{secrets.token_hex(3)}"
    folder = found.work / run
    folder.mkdir()
    catalogue = folder / "catalogue.csv"
    write_catalogue(catalogue, scenario.items)
    (folder / "pack.toml").write_text(PACK)
    env = found.env
    workers: list[subprocess.Popen[bytes]] = []
    ports = [free_port() for _ in range(scenario.workers)]
    stats = [folder / f"standin-{i}.json" for i in range(scenario.workers)]
    logs = [folder / f"worker-{i}.log" for i in range(scenario.workers)]
    engine = ledger.create_engine(found.database_url)
    try:
        for i in range(scenario.workers):
            command = [
                sys.executable,
                str(BENCH / "standin.py"),
                "--seconds-per-image",
                str(scenario.seconds_per_image),
                "--size",
                str(scenario.size),
                "--stats",
                str(stats[i]),
                "--profile",
                "--",
                "--model",
                MODEL,
                "--device",
                "cpu",
                "--name",
                f"w{i}",
                "--metrics-port",
                str(ports[i]),
            ]
            workers.append(spawn_group(command, log=logs[i], env=env, cwd=folder))

        def ready() -> bool:
            for worker, path in zip(workers, logs, strict=True):
                if worker.poll() is not None:
                    raise SystemExit(f"a worker exited:\n{path.read_text()[-3000:]}")
                if " ready." not in path.read_text(errors="replace"):
                    return False
            return True

        started = time.monotonic()
        wait_until(ready, 180, f"{scenario.workers} workers")
        startup = time.monotonic() - started
        time.sleep(SETTLE_SECONDS)

        meter = Meter(found.groups(workers), found.database)
        before = meter.read()
        command = [
            str(Path(sys.executable).parent / "skufleet"),
            "enqueue",
            str(catalogue),
            "--run",
            run,
            "--model",
            MODEL,
            "--template",
            str(folder / "pack.toml"),
            "--batch-size",
            str(scenario.batch_size),
            "--size",
            f"{scenario.size}x{scenario.size}",
            "--json",
        ]
        if scenario.compression != "standard":
            command += ["--compression", scenario.compression]
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        output = folder / "enqueue.out"
        with output.open("wb") as sink:
            enqueue = subprocess.Popen(
                command, env=env, cwd=folder, stdout=sink, stderr=subprocess.STDOUT
            )
            while enqueue.poll() is None:  # its PostgreSQL backend ends with it
                meter.read()
                time.sleep(0.05)
        enqueued = meter.read()
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        if enqueue.returncode:
            raise SystemExit(f"skufleet enqueue failed:\n{output.read_text()[-3000:]}")
        summary = json.loads(output.read_text().strip().splitlines()[-1])
        summary["cli_cpu_seconds"] = (reaped.ru_utime + reaped.ru_stime) - (
            children.ru_utime + children.ru_stime
        )

        # until the stand-ins have drawn every item (their files, at no cost to the
        # services), then until the ledger says every item is done
        deadline = time.monotonic() + timeout
        while sum(_stand_in(path).get("images", 0) for path in stats) < scenario.items:
            for worker, path in zip(workers, logs, strict=True):
                if worker.poll() is not None:
                    raise SystemExit(f"a worker exited:\n{path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise SystemExit(f"{scenario.name}: not drawn after {timeout:.0f}s")
            time.sleep(0.1)
        while done_count(engine, run) < scenario.items:
            if time.monotonic() > deadline:
                raise SystemExit(f"{scenario.name}: not done after {timeout:.0f}s")
            time.sleep(0.05)
        after = meter.read()

        figures = ledger_figures(found.database_url, run)
        drawn = [_stand_in(path) for path in stats]
        metrics = [scrape(port) for port in ports]
    finally:
        for worker in workers:
            stop_group(worker, 30)
        engine.dispose()
    seen = Observed(scenario, summary, figures, drawn, metrics, before, enqueued, after, startup)
    return _figures(found, seen)


def _stand_in(path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


@dataclass
class Observed:
    """Everything one measurement read, for :func:`_figures`."""

    scenario: Scenario
    summary: dict[str, Any]
    """``skufleet enqueue --json``'s, with the CLI process's CPU seconds."""
    ledgered: dict[str, Any]
    drawn: list[dict[str, Any]]
    """Each stand-in's accounting."""
    metrics: list[dict[str, float]]
    before: Reading
    enqueued: Reading
    after: Reading
    startup: float


def _steps(drawn: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Wall and CPU ms per call of the worker's steps (``standin.profile``), all workers."""
    totals: dict[str, list[float]] = {}
    for stand_in in drawn:
        for name, entry in (stand_in.get("profile") or {}).items():
            total = totals.setdefault(name, [0, 0.0, 0.0])
            total[0] += entry["calls"]
            total[1] += entry["wall_seconds"]
            total[2] += entry["cpu_seconds"]
    return {
        name: {
            "calls": int(calls),
            "wall_ms_per_call": round(1000 * wall / calls, 2),
            "cpu_ms_per_call": round(1000 * cpu / calls, 2),
        }
        for name, (calls, wall, cpu) in totals.items()
        if calls
    }


def _spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    ordered = sorted(values)
    return {
        "mean": round(1000 * sum(ordered) / len(ordered), 2),
        "median": round(1000 * ordered[len(ordered) // 2], 2),
        "p90": round(1000 * ordered[int(0.9 * (len(ordered) - 1))], 2),
        "max": round(1000 * ordered[-1], 2),
    }


def _figures(found: Services, seen: Observed) -> dict[str, Any]:
    scenario, ledgered, drawn = seen.scenario, seen.ledgered, seen.drawn
    items, images = scenario.items, ledgered["images"]
    wall = ledgered["wall_seconds"]
    window = seen.after.at - seen.before.at
    used = seen.after.minus(seen.before)
    during_enqueue = seen.enqueued.minus(seen.before)
    enqueue_window = seen.enqueued.at - seen.before.at
    pixel_cpu = sum(d.get("pixel_cpu_seconds", 0.0) for d in drawn)
    device = sum(d.get("device_seconds", 0.0) for d in drawn)
    batches = sum(d.get("batches", 0) for d in drawn)
    gaps = [gap for d in drawn for gap in d.get("gaps", [])]
    checks = sum(m.get("skufleet_worker_check_seconds_total", 0.0) for m in seen.metrics)
    rate = images / wall
    ideal = scenario.workers / scenario.seconds_per_image if scenario.seconds_per_image else None
    steady = sum(
        w["images"] / w["wall_seconds"] for w in ledgered["workers"].values() if w["wall_seconds"]
    )

    # CPU seconds of processes that are not the benchmark's (someone else's, if any)
    ours = sum(used.values()) + seen.summary["cli_cpu_seconds"]
    others = seen.after.machine_seconds(seen.before) - ours

    def net(service: str, spent: float, seconds: float) -> float:
        """ms per item of a service, less its idle rate over ``seconds``."""
        spent -= found.background.get(service, 0.0) * seconds
        return round(1000 * max(0.0, spent) / items, 3)

    result: dict[str, Any] = {
        "name": scenario.name,
        "workers": scenario.workers,
        "size": f"{scenario.size}x{scenario.size}",
        "device_ms_per_image": round(1000 * scenario.seconds_per_image, 1),
        "batch_size": scenario.batch_size,
        "output": "png, compression " + scenario.compression,
        "items": items,
        "enqueued": seen.summary.get("enqueued"),
        "messages": seen.summary.get("messages"),
        "counts": ledgered["counts"],
        "images": images,
        "renders": ledgered["renders"],
        "rerolls": ledgered["rerolls"],
        "kb_per_image": round(ledgered["bytes"] / max(1, images) / 1024, 1),
        "wall_seconds": round(wall, 3),
        "images_per_second": round(rate, 2),
        "ideal_images_per_second": None if ideal is None else round(ideal, 2),
        "efficiency": None if ideal is None else round(rate / ideal, 4),
        "steady_images_per_second": round(steady, 2),
        "steady_efficiency": None if ideal is None else round(steady / ideal, 4),
        "per_worker": ledgered["workers"],
        "device_busy_share": (
            round(device / (scenario.workers * wall), 4) if scenario.seconds_per_image else None
        ),
        "device_seconds": round(device, 3),
        "metrics_device_busy_seconds": round(
            sum(m.get("skufleet_worker_device_busy_seconds_total", 0.0) for m in seen.metrics), 3
        ),
        "batches": batches,
        "device_idle_between_batches_ms": _spread(gaps),
        "checks_ms_per_batch": round(1000 * checks / max(1, batches), 2),
        "cpu": {
            "window_seconds": round(window, 3),
            "worker_ms_per_image": round(1000 * (used["workers"] - pixel_cpu) / images, 2),
            "worker_gross_ms_per_image": round(1000 * used["workers"] / images, 2),
            "stand_in_pixels_ms_per_image": round(1000 * pixel_cpu / images, 3),
            "postgres_ms_per_item": net("postgres", used["postgres"], window),
            "redis_ms_per_item": net("redis", used["redis"], window),
            "s3_ms_per_item": net("s3", used["s3"], window),
            "postgres_gross_ms_per_item": round(1000 * used["postgres"] / items, 3),
            "redis_gross_ms_per_item": round(1000 * used["redis"] / items, 3),
            "s3_gross_ms_per_item": round(1000 * used["s3"] / items, 3),
            "postgres_shared_processes_ms_per_item": net(
                "postgres_shared", used["postgres_shared"], window
            ),
            "of_which_enqueue_ms_per_item": {
                "seconds": round(enqueue_window, 3),
                "enqueue_cli_process": round(1000 * seen.summary["cli_cpu_seconds"] / items, 3),
                "postgres": net("postgres", during_enqueue["postgres"], enqueue_window),
                "redis": net("redis", during_enqueue["redis"], enqueue_window),
            },
            "machine_busy_share": round(seen.after.machine_share(seen.before), 3),
            "machine_cores": CORES,
            "other_processes_cores": round(max(0.0, others) / window, 3),
        },
        "worker_startup_seconds": round(seen.startup, 1),
        "worker_steps_ms": _steps(drawn),
    }
    cpu = result["cpu"]
    idle = result["device_idle_between_batches_ms"]
    log(
        f"  {images}/{items} images in {wall:.2f}s: {rate:.1f}/s"
        + (
            f" (ideal {ideal:.1f}: {rate / ideal:.3f}; steady {steady / ideal:.3f})"
            if ideal
            else ""
        )
        + (
            f", busy {result['device_busy_share']:.3f}"
            if result["device_busy_share"] is not None
            else ""
        )
        + (f", idle between batches {idle['median']} ms median" if idle else "")
        + f", checks {result['checks_ms_per_batch']} ms/batch"
        + f"; worker {cpu['worker_ms_per_image']} ms/image (stand-in "
        f"{cpu['stand_in_pixels_ms_per_image']}), postgres {cpu['postgres_ms_per_item']}, "
        f"redis {cpu['redis_ms_per_item']}, s3 {cpu['s3_ms_per_item']} ms/item; machine "
        f"{100 * cpu['machine_busy_share']:.0f}% busy (others {cpu['other_processes_cores']} "
        f"cores); {result['rerolls']} re-rolls"
    )
    return result


# --- the report ------------------------------------------------------------------------------


def capacity(reference: dict[str, Any]) -> dict[str, Any]:
    """Items/s per core of each service, and the GPUs that serves, from ``reference``'s
    per-item CPU."""
    services = {}
    for service in ("postgres", "redis", "s3"):
        ms = reference["cpu"][f"{service}_ms_per_item"]
        per_core = 1000 / ms if ms > 0 else None
        services[service] = {
            "cpu_ms_per_item": ms,
            "items_per_second_per_core": None if per_core is None else round(per_core),
            "gpus_per_core": None if per_core is None else round(per_core / GPU_IMAGES_PER_SECOND),
        }
    return {
        "from": f"{reference['name']} ({reference['size']}, batch {reference['batch_size']}, "
        f"{reference['device_ms_per_image']} ms per image = "
        f"{1000 / reference['device_ms_per_image']:.0f} images/s per worker)",
        "assumption": GPU_ASSUMPTION,
        "gpu_images_per_second": GPU_IMAGES_PER_SECOND,
        "services": services,
        "notes": [
            "PostgreSQL's figure is its backends' CPU for the run's database; the WAL writer "
            "and checkpointer work for every database on the server and are left out "
            "(postgres_shared_processes_ms_per_item in each run)",
            "Redis runs commands on one thread: one redis-server is one core, so its GPUs per "
            "core is what one Redis serves",
            "PostgreSQL runs a process per connection: one core's figure scales with the cores "
            "it has, until row locks or WAL writes bind",
            "the S3 server is the local SeaweedFS; a cloud S3 bucket takes that load off the "
            "fleet's machines",
        ],
    }


def targets(
    sweep: dict[float, dict[str, Any]], scaling: list[dict[str, Any]], size: int
) -> dict[str, Any]:
    """The issue's targets, each with what was measured and whether it was met."""
    found: dict[str, Any] = {}
    instant = sweep.get(0.0)
    if instant is not None:
        cpu = instant["cpu"]["worker_ms_per_image"]
        found[f"host CPU per {size}x{size} image in the worker (ms)"] = {
            "target": "<= 15",
            "measured": cpu,
            "met": cpu <= 15,
            "run": instant["name"],
        }
        found[f"instant device: one worker, {size}x{size} (images/s)"] = {
            "target": ">= 40",
            "measured": instant["images_per_second"],
            "met": instant["images_per_second"] >= 40,
            "run": instant["name"],
        }
    for seconds, share in ((0.05, 0.97), (0.025, 0.90)):
        if seconds in sweep:
            run = sweep[seconds]
            busy = run["device_busy_share"]
            found[f"device at {1 / seconds:.0f} images/s ({1000 * seconds:g} ms): busy share"] = {
                "target": f">= {share}",
                "measured": busy,
                "met": busy >= share,
                "run": run["name"],
                "device_idle_between_batches_ms": run["device_idle_between_batches_ms"],
                "checks_ms_per_batch": run["checks_ms_per_batch"],
            }
    if scaling:
        widest = max(scaling, key=lambda r: r["workers"])
        found[f"{widest['workers']} workers at a slow device: share of the ideal rate"] = {
            "target": ">= 0.95",
            "measured": widest["steady_efficiency"],
            "met": widest["steady_efficiency"] >= 0.95,
            "run": widest["name"],
            "whole_run": widest["efficiency"],
            "whole_run_met": widest["efficiency"] >= 0.95,
            "note": "measured: the sum of each worker's rate over its own first claim to last "
            "finish (the fleet's steady rate); whole_run: all images over the fleet's first "
            "claim to its last finish, the drain at the end included (workers that ran out "
            "of messages wait for the last ones)",
        }
    return found


def markdown(result: dict[str, Any]) -> str:
    size = result["encoding"].get("size", "").replace("x", "×")
    lines = [f"| encoding ({size} photo, one thread) | ms | KB | lossless |", "|---|---:|---:|---|"]
    for row in result["encoding"]["rows"]:
        lines.append(
            f"| {row['encoding']} | {row['ms_per_image']} | {row['kb_per_image']} | "
            f"{'yes' if row['lossless'] else 'no'} |"
        )
    lines += [
        "",
        "| run | workers | size | device ms | images/s (steady, of ideal) | busy | "
        "worker CPU ms/image | PostgreSQL / Redis / S3 CPU ms/item | machine CPU |",
        "|---|---:|---|---:|---:|---:|---:|---|---:|",
    ]
    for run in [*result["device_sweep"], *result["comparison"], *result["scaling"]["runs"]]:
        cpu = run["cpu"]
        busy = "—" if run["device_busy_share"] is None else f"{100 * run['device_busy_share']:.1f}%"
        rate = f"{run['images_per_second']}"
        if run["steady_efficiency"] is not None:
            rate += f" ({100 * run['steady_efficiency']:.1f}% of ideal)"
        lines.append(
            f"| {run['name']} | {run['workers']} | {run['size']} | {run['device_ms_per_image']:g} "
            f"| {rate} | {busy} | {cpu['worker_ms_per_image']} | {cpu['postgres_ms_per_item']} / "
            f"{cpu['redis_ms_per_item']} / {cpu['s3_ms_per_item']} | "
            f"{100 * cpu['machine_busy_share']:.0f}% |"
        )
    lines += [
        "",
        "| service | CPU ms/item | items/s per core | H100-class GPUs per core |",
        "|---|---:|---:|---:|",
    ]
    for name, entry in result["capacity"]["services"].items():
        lines.append(
            f"| {name} | {entry['cpu_ms_per_item']} | {entry['items_per_second_per_core']} | "
            f"{entry['gpus_per_core']} |"
        )
    lines += ["", "| target | wanted | measured | met |", "|---|---|---:|---|"]
    for name, entry in result["targets"].items():
        measured = f"{entry['measured']}"
        if "whole_run" in entry:
            measured += f" (whole run {entry['whole_run']})"
        lines.append(
            f"| {name} | {entry['target']} | {measured} | {'yes' if entry['met'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny version, about a minute")
    parser.add_argument("--items", type=int, help="items per single-worker run [300; smoke 16]")
    parser.add_argument(
        "--scaling-items", type=int, help="items per worker in the scaling runs [96; smoke 8]"
    )
    parser.add_argument(
        "--compression",
        choices=["auto", "fast", "standard"],
        default="auto",
        help="PNG path of the sweep: fast where the checkout has it (auto), or standard",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"what to measure, of {','.join(PARTS)} [all]",
    )
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "SKUFLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="file, or folder for fleet-<date>.json, to write [bench/results/fleet-<date>.json]",
    )
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if parts - set(PARTS) or "sweep" not in parts:
        parser.error(f"--parts: a comma-separated list of {', '.join(PARTS)}, sweep among them")
    begun = time.perf_counter()
    load_before = os.getloadavg()
    fast = fast_png_available()
    compression = args.compression
    if compression == "auto":
        compression = "fast" if fast else "standard"
    if compression == "fast" and not fast:
        raise SystemExit('--compression fast: this checkout\'s OutputSpec has no "compression"')

    if args.smoke:
        size, items, sweep_seconds = 128, args.items or 16, [0.02]
        scaling_size, scaling_seconds, scaling_batch = 128, 0.02, 2
        worker_counts, per_worker, encode_images = [1, 2], args.scaling_items or 8, 2
        batch = 4
    else:
        size, items, sweep_seconds = 512, args.items or 300, [0.0, 0.025, 0.05]
        scaling_size, scaling_seconds, scaling_batch = 128, 0.2, 8
        worker_counts, per_worker, encode_images = [1, 2, 4, 8], args.scaling_items or 96, 16
        batch = 8

    encoding: dict[str, Any] = {"rows": []}
    if "encoding" in parts:
        log(f"encoding {encode_images} photos at {size}x{size} …")
        encoding = encoding_table(size, encode_images)

    sweep: dict[float, dict[str, Any]] = {}
    comparison: list[dict[str, Any]] = []
    scaling: list[dict[str, Any]] = []
    with services(args.postgres_url) as found:
        for seconds in sweep_seconds:
            name = f"device-{1000 * seconds:g}ms"
            log(f"{name}: 1 worker, {items} items at {size}x{size}, png {compression} …")
            scenario = Scenario(name, 1, size, seconds, items, batch, compression)
            sweep[seconds] = measure(found, scenario, timeout=300)
        if not args.smoke and compression != "standard" and "comparison" in parts:
            name = "device-0ms-standard-png"
            count = max(8, items // 2)
            log(f"{name}: 1 worker, {count} items at {size}x{size}, png standard …")
            scenario = Scenario(name, 1, size, 0.0, count, batch, "standard")
            comparison.append(measure(found, scenario, timeout=300))
        for workers in worker_counts if "scaling" in parts else []:
            name = f"scaling-{workers}w"
            count = workers * per_worker
            log(
                f"{name}: {workers} workers, {count} items at {scaling_size}x{scaling_size}, "
                f"{1000 * scaling_seconds:g} ms per image …"
            )
            scenario = Scenario(
                name, workers, scaling_size, scaling_seconds, count, scaling_batch, compression
            )
            scaling.append(measure(found, scenario, timeout=300))
        background = {k: round(1000 * v, 2) for k, v in found.background.items()}

    reference = sweep.get(0.05) or sweep[max(sweep)]
    single = scaling[0]["steady_images_per_second"] if scaling else None
    for run in scaling:  # steady rate against that many single workers
        run["vs_one_worker"] = (
            round(run["steady_images_per_second"] / (run["workers"] * single), 4)
            if single
            else None
        )
    result = {
        "benchmark": "fleet",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "smoke": args.smoke,
        "machine": {
            "cpus": CORES,
            "platform": platform.platform(),
            "python": platform.python_version(),
            "pillow": Image.__version__,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in os.getloadavg()],
        },
        "services": {
            "postgresql": f"{sa.make_url(args.postgres_url).host} (shared; a fresh database "
            "for this run, dropped after): CPU of the backends of that database, told by their "
            "process titles; the server's own processes (WAL writer, checkpointer), which "
            "work for every database, apart as postgres_shared",
            "redis": "private redis-server started by the benchmark",
            "s3": "private SeaweedFS (weed server -s3) started by the benchmark",
            "idle_cpu_ms_per_second": background,
        },
        "stand_in": {
            "device": "sleeps the rest of (ms per image × batch size) after making its pixels; "
            "a sleep releases the GIL as a wait on CUDA does",
            "pixels": "scikit-image's colour sample photographs, cropped, scaled, mirrored and "
            "brightened per item (bench/standin.py); its CPU is subtracted from the worker's",
        },
        "png_compression": compression,
        "fast_png_available": fast,
        "encoding": encoding,
        "device_sweep": list(sweep.values()),
        "comparison": comparison,
        "scaling": {
            "size": f"{scaling_size}x{scaling_size}",
            "device_ms_per_image": round(1000 * scaling_seconds, 1),
            "batch_size": scaling_batch,
            "why": (
                f"at {scaling_size}x{scaling_size} and {1000 * scaling_seconds:g} ms an image, "
                f"{max(worker_counts)} workers ask {max(worker_counts) / scaling_seconds:.0f} "
                "images/s of the host, a few ms of CPU each in all processes: the machine "
                "stays mostly idle (machine_busy_share), so what is measured is the fleet's "
                "coordination, not these cores. Batches of "
                f"{scaling_batch} (the default); steady_efficiency sums each worker's rate over "
                "its own first claim to last finish, efficiency divides all images by the "
                "fleet's first claim to last finish (the drain of the last batches included)"
            ),
            "runs": scaling,
        },
        "capacity": capacity(reference),
        "targets": targets(sweep, scaling, size),
        "wall_seconds": round(time.perf_counter() - begun, 1),
    }
    name = f"fleet-{datetime.now(UTC):%Y-%m-%d}.json"
    out = args.out or ROOT / "bench" / "results" / name
    if out.is_dir():
        out = out / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    log(f"\nwritten to {out} in {result['wall_seconds']}s\n")
    log(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
