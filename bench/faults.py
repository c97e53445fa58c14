"""The full fault-injection suite: the README's Reliability scenarios at scale, figures recorded.

    python bench/faults.py

Runs tests/faults with SKUFLEET_FAULTS=full (500 items per scenario, 12 worker kills,
2 Redis restarts with and without persistence, 20% of PUTs answered 503 plus 5% cut off,
10 rounds of terminated database connections, a poison item, a batch outliving its lease
and Redis's visibility timeout, SIGTERM on every worker, a pickled message), then writes
every scenario's figures to bench/results/faults-<date>.json and prints a Markdown table.
Needs PostgreSQL at 127.0.0.1:5432 (SKUFLEET_TEST_POSTGRES_URL) and redis-server.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    env = {**os.environ, "SKUFLEET_FAULTS": "full"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/faults",
            "-m",
            "faults",
            "-s",
            "-q",
            "-p",
            "no:cacheprovider",
            *sys.argv[1:],
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    lines = result.stdout.splitlines()
    figures = [json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("FAULTS ")]
    catalogue = [
        json.loads(line.split(" ", 1)[1]) for line in lines if line.startswith("FAULTS-CATALOGUE ")
    ]
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    record = {
        "benchmark": "faults",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "pytest": summary,
        "passed": result.returncode == 0,
        "scenarios": figures,
        "catalogue": catalogue[0] if catalogue else None,
    }
    out = ROOT / "bench" / "results" / f"faults-{datetime.now(UTC):%Y-%m-%d}.json"
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    print(f"\nwritten to {out}; pytest: {summary}\n", file=sys.stderr)
    print(
        "| scenario | items | succeeded | failed | faults | renders beyond one (bound) "
        "| seconds (fault-free) | recovery s |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for f in figures:
        print(
            f"| {f['scenario']} | {f['items']} | {f['succeeded']} | {f['failed']} | "
            f"{f['faults']} | {f['extra_renders']} ({f['extra_bound']}) | {f['seconds']} "
            f"({f['fault_free_seconds']}) | {f['recovery_seconds']} |"
        )
    for entry in catalogue:
        print(
            f"\nbad catalogue: {entry['read']:,} records read, {entry['accepted']:,} "
            f"accepted, {entry['rejected']:,} rejected, {entry['duplicates']:,} duplicates "
            f"({entry['reasons']})"
        )
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-3000:], file=sys.stderr)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main())
