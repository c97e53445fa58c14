"""Enqueue benchmark: skufleet's producer against a naive one, on PostgreSQL and Redis.

    python bench/enqueue.py                      # 100k rows, naive on 10k, RSS on 1M rows
    python bench/enqueue.py --rows 20000 --rss-rows 0 --naive-rows 2000   # a quick look

What it measures, in one run, on one machine, against the same PostgreSQL and a private
``redis-server``:

- skufleet: ``skufleet enqueue`` as a subprocess (CLI start-up included), CSV → PostgreSQL
  (staged with COPY, merged in set-based statements) → Redis (pipelined), with a one-shot
  template pack (one item per row, like the naive producer) and with the default
  e-commerce pack (two shots: two items per row);
- naive: the common script: for each row, render the prompt, INSERT one item and commit,
  then ``apply_async`` one message. It runs on ``--naive-rows`` rows (its cost per row is
  constant, so its rate is measured on fewer rows to keep the benchmark short);
- peak RSS of ``skufleet enqueue`` on a ``--rss-rows`` catalogue (from ``wait4``).

Writes ``bench/results/enqueue-<date>.json`` and prints it with a Markdown table.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import secrets
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skufleet.producer.db import upgrade  # noqa: E402
from skufleet.producer.seed import derive_seed  # noqa: E402
from skufleet.producer.services import LocalRedis  # noqa: E402
from skufleet.producer.template import TemplatePack  # noqa: E402
from skufleet.schemas import ledger  # noqa: E402
from skufleet.schemas.names import TASK_RENDER, render_queue  # noqa: E402
from skufleet.schemas.params import default_params  # noqa: E402
from skufleet.schemas.tables import Item, ItemStatus  # noqa: E402

MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"
ONE_SHOT_PACK = """
name = "one-shot"
[categories.default]
negative = "blurry, low quality, watermark, text, logo"
[categories.default.shots.front]
prompt = "{{ title }}, {{ color }}, professional product photo, white background"
"""
CATEGORIES = [
    "Footwear",
    "Bags",
    "Kitchen",
    "Home",
    "Toys",
    "Outdoor",
    "Accessories",
    "Beauty",
    "Garden",
    "Electronics",
]
ADJECTIVES = [
    "red",
    "blue",
    "green",
    "black",
    "white",
    "oak",
    "steel",
    "linen",
    "wool",
    "leather",
    "canvas",
    "ceramic",
    "glass",
    "bamboo",
    "vintage",
    "modern",
    "compact",
    "large",
    "slim",
    "classic",
]
NOUNS = [
    "shoe",
    "boot",
    "tote",
    "backpack",
    "skillet",
    "kettle",
    "bowl",
    "lamp",
    "rug",
    "pillow",
    "blocks",
    "bear",
    "bottle",
    "lantern",
    "tent",
    "sunglasses",
    "wallet",
    "scarf",
    "perfume",
    "brush",
    "chair",
    "shelf",
    "mug",
    "vase",
    "clock",
]


def write_catalogue(path: Path, rows: int, seed: int) -> None:
    """A realistic catalogue: sku, title, category, description, brand, color."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["sku", "title", "category", "description", "brand", "color"])
        for i in range(rows):
            title = f"{rng.choice(ADJECTIVES).title()} {rng.choice(ADJECTIVES)} {rng.choice(NOUNS)}"
            writer.writerow(
                [
                    f"SKU-{i:07d}",
                    title,
                    rng.choice(CATEGORIES),
                    f"A {title.lower()} with a {rng.choice(ADJECTIVES)} finish, made to last.",
                    f"Brand{rng.randint(1, 300)}",
                    rng.choice(ADJECTIVES),
                ]
            )


def run_skufleet(env: dict[str, str], catalogue: Path, run: str, *template: str) -> dict[str, Any]:
    """``skufleet enqueue`` in a subprocess: wall time, peak RSS and its JSON summary."""
    command = [
        str(Path(sys.executable).parent / "skufleet"),
        "enqueue",
        str(catalogue),
        "--run",
        run,
        "--model",
        MODEL,
        "--json",
        *template,
    ]
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout is not None and process.stderr is not None
    stdout = process.stdout.read()
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"skufleet enqueue failed:\n{stderr.decode()[-3000:]}")
    summary = json.loads(stdout)
    return {
        "rows": summary["read"],
        "items": summary["enqueued"],
        "messages": summary["messages"],
        "seconds": round(seconds, 2),
        "rows_per_second": round(summary["read"] / seconds),
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux reports KiB
    }


def run_naive(
    database_url: str, redis_url: str, catalogue: Path, rows: int, pack: TemplatePack
) -> dict[str, Any]:
    """The script skufleet replaces: one INSERT + commit and one apply_async per row."""
    from celery import Celery

    engine = ledger.create_engine(database_url)
    app = Celery("naive", broker=redis_url, set_as_current=False)
    queue = render_queue("bench", MODEL)
    params = default_params(MODEL).model_dump()
    with engine.begin() as conn:
        run_id = ledger.upsert_run(conn, "naive", MODEL, 0, pack.name, {})
    started = time.perf_counter()
    done = 0
    with catalogue.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            if done == rows:
                break
            for shot in pack.render(row):
                now = ledger.utcnow()
                with engine.begin() as conn:
                    item_id = conn.execute(
                        sa.insert(Item)
                        .values(
                            run_id=run_id,
                            sku=row["sku"],
                            shot=shot.shot,
                            prompt=shot.prompt,
                            negative_prompt=shot.negative,
                            seed=derive_seed(0, row["sku"], shot.shot),
                            status=ItemStatus.QUEUED,
                            attempts=0,
                            attempts_before_retry=0,
                            created_at=now,
                            updated_at=now,
                            **params,
                        )
                        .returning(Item.id)
                    ).scalar_one()
                app.send_task(
                    TASK_RENDER,
                    args=[{"run_id": run_id, "model": MODEL, "item_ids": [item_id]}],
                    queue=queue,
                )
            done += 1
    seconds = time.perf_counter() - started
    app.close()
    engine.dispose()
    return {
        "rows": done,
        "items": done,
        "messages": done,
        "seconds": round(seconds, 2),
        "rows_per_second": round(done / seconds),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--naive-rows", type=int, default=10_000)
    parser.add_argument("--rss-rows", type=int, default=1_000_000, help="0 skips it")
    parser.add_argument(
        "--postgres-url",
        default=os.environ.get(
            "SKUFLEET_BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
        ),
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="skufleet-bench-"))
    name = f"skufleet_bench_{secrets.token_hex(4)}"
    admin = sa.create_engine(args.postgres_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    database_url = sa.make_url(args.postgres_url).set(database=name).render_as_string(False)
    redis = LocalRedis(work / "redis").start()
    try:
        upgrade(ledger.create_engine(database_url))
        env = {
            **os.environ,
            "SKUFLEET_DATABASE_URL": database_url,
            "SKUFLEET_REDIS_URL": redis.url,
            "SKUFLEET_QUEUE_PREFIX": "bench",
        }
        one_shot = work / "one-shot.toml"
        one_shot.write_text(ONE_SHOT_PACK)
        catalogue = work / "catalogue.csv"
        write_catalogue(catalogue, args.rows, seed=1)

        print(f"skufleet enqueue, {args.rows:,} rows, one shot …", file=sys.stderr)
        skufleet = run_skufleet(env, catalogue, "one-shot", "--template", str(one_shot))
        print(f"skufleet enqueue, {args.rows:,} rows, e-commerce pack …", file=sys.stderr)
        two_shots = run_skufleet(env, catalogue, "ecommerce")
        print(f"naive producer, {args.naive_rows:,} rows …", file=sys.stderr)
        naive = run_naive(
            database_url, redis.url, catalogue, args.naive_rows, TemplatePack.load(one_shot)
        )
        rss: dict[str, Any] | None = None
        if args.rss_rows:
            big = work / "big.csv"
            write_catalogue(big, args.rss_rows, seed=2)
            print(f"skufleet enqueue, {args.rss_rows:,} rows, for peak RSS …", file=sys.stderr)
            rss = run_skufleet(env, big, "big", "--template", str(one_shot))
            big.unlink()
    finally:
        redis.stop()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

    speedup = skufleet["rows_per_second"] / naive["rows_per_second"]
    result = {
        "benchmark": "enqueue",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
        },
        "services": "PostgreSQL 127.0.0.1:5432 (fresh database), private redis-server",
        "skufleet_one_shot": skufleet,
        "skufleet_ecommerce_two_shots": two_shots,
        "naive": naive,
        "speedup_rows_per_second": round(speedup, 1),
        "peak_rss": rss,
        "targets": {
            "100k_rows_within_15s": skufleet["rows"] >= 100_000 and skufleet["seconds"] <= 15,
            "at_least_10x_naive": speedup >= 10,
            "peak_rss_1m_rows_within_300mb": (
                None if rss is None else rss["rows"] >= 1_000_000 and rss["peak_rss_mb"] <= 300
            ),
        },
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"enqueue-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"\nwritten to {path}\n", file=sys.stderr)
    print("| producer | rows | items | seconds | rows/s | peak RSS |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, entry in [
        ("skufleet, one shot per row", skufleet),
        ("skufleet, e-commerce pack (2 shots)", two_shots),
        ("naive (INSERT+commit, apply_async per row)", naive),
        ("skufleet, 1M rows (RSS)", rss),
    ]:
        if entry:
            rss_mb = f"{entry['peak_rss_mb']} MB" if "peak_rss_mb" in entry else "—"
            print(
                f"| {label} | {entry['rows']:,} | {entry['items']:,} | {entry['seconds']} | "
                f"{entry['rows_per_second']:,} | {rss_mb} |"
            )


if __name__ == "__main__":
    main()
