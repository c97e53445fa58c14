"""The benchmarks stay runnable: each runs end to end on a tiny input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_enqueue_benchmark_runs_and_writes_its_json(tmp_path: Path) -> None:
    """bench/enqueue.py measures skufleet and the naive producer and records the figures."""
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "enqueue.py"),
            "--rows",
            "300",
            "--naive-rows",
            "30",
            "--rss-rows",
            "0",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("enqueue-*.json")
    figures = json.loads(written.read_text())
    assert figures["skufleet_one_shot"]["items"] == 300
    assert figures["skufleet_ecommerce_two_shots"]["items"] == 600
    assert figures["naive"]["rows"] == 30
    assert figures["speedup_rows_per_second"] > 0
    assert "| skufleet, one shot per row | 300 |" in result.stdout
