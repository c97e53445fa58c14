"""The benchmarks stay runnable: each runs end to end on a tiny input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.services  # the benchmark talks to PostgreSQL and Redis itself
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


BLOCKED = ("celery", "kombu", "pydantic", "pydantic_settings", "sqlalchemy", "boto3", "redis")


def test_gpu_benchmark_runs_on_the_cpu_without_the_fleet_libraries(tmp_path: Path) -> None:
    """bench/gpu.py drives the worker's pipeline and post-processing with --device cpu
    --model tiny, and imports none of Celery, pydantic, SQLAlchemy, boto3 or redis (the GPU
    machine has none of them)."""
    blocker = (
        "import runpy, sys\n"
        f"for name in {BLOCKED!r}: sys.modules[name] = None\n"
        f"sys.argv = ['bench/gpu.py', '--device', 'cpu', '--model', 'tiny', '--batch-sizes',"
        f" '1,2', '--images', '2', '--baseline-images', '1', '--out', {str(tmp_path)!r}]\n"
        "runpy.run_path('bench/gpu.py', run_name='__main__')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("gpu-cpu-tiny-*.json")
    figures = json.loads(written.read_text())
    assert json.loads(result.stdout) == figures
    assert [run["batch_size"] for run in figures["runs"]] == [1, 2]
    for run in [*figures["runs"], figures["baseline"]]:
        assert run["images_per_second"] > 0
        assert set(run["stage_seconds_per_image"]) == {"text", "denoise", "decode", "check"}
    assert figures["baseline"]["setup"].endswith("attention slicing, batch 1, PNG encoded in line")
    assert figures["speedup_vs_baseline"] > 0 and figures["fastest"]["batch_size"] in (1, 2)
    assert figures["settings"]["width"] == 64 and figures["weights"] == "tiny random test model"


def test_quality_benchmark_smoke_run_catches_every_bad_image(tmp_path: Path) -> None:
    """bench/quality.py --smoke draws 40 items at 128×128 through the worker's gate code with
    a stand-in model: without the gate bad images are delivered, with it none, at under 1.5
    renders per item."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "quality.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("quality-*.json")
    figures = json.loads(written.read_text())
    assert json.loads(result.stdout) == figures
    assert figures["settings"]["items"] == 40 and figures["settings"]["width"] == 128
    runs = {run["configuration"]: run for run in figures["runs"]}
    assert set(runs) == {"no gate", "gate", "gate, best of 2"}
    ungated, gated = runs["no gate"], runs["gate"]
    assert ungated["bad_delivered_as_succeeded"] > 0 and ungated["renders_per_item"] == 1.0
    assert ungated["bad_delivered_as_succeeded"] == ungated["bad_first_draws"]
    for run in (gated, runs["gate, best of 2"]):
        assert run["bad_delivered_as_succeeded"] == 0 and run["bad_draws_passed"] == 0
        assert run["delivered_as_succeeded"] + run["needs_review"] == 40
    assert gated["renders_per_item"] <= 1.5 and gated["rerolls"] > 0
    assert gated["check_ms_per_image"] > 0 and 0 < gated["checks_share_of_host_time"] < 1
    assert (
        figures["met"]["bad_delivered_with_gate"] and figures["met"]["renders_per_item_with_gate"]
    )


@pytest.mark.services  # PostgreSQL; the benchmark starts its own redis-server and SeaweedFS
def test_fleet_benchmark_smoke_run_delivers_every_item(tmp_path: Path) -> None:
    """bench/fleet.py --smoke runs real worker processes around its stand-in device (16
    items at 128×128, then 1 and 2 workers) against real services: every item is stored,
    and it reports rates, the device's busy share, CPU per image and per item, the encoding
    table, the control plane's capacity and the targets."""
    env = dict(os.environ)  # the test suite's PostgreSQL, where it is not the default one
    if "SKUFLEET_TEST_POSTGRES_URL" in env:
        env["SKUFLEET_BENCH_POSTGRES_URL"] = env["SKUFLEET_TEST_POSTGRES_URL"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "fleet.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (written,) = tmp_path.glob("fleet-*.json")
    figures = json.loads(written.read_text())
    assert json.loads(result.stdout) == figures
    assert figures["benchmark"] == "fleet" and figures["smoke"] is True
    assert [run["workers"] for run in figures["scaling"]["runs"]] == [1, 2]
    runs = [*figures["device_sweep"], *figures["comparison"], *figures["scaling"]["runs"]]
    assert runs
    for run in runs:
        assert run["images"] == run["items"] == run["enqueued"] > 0, run["counts"]
        assert run["images_per_second"] > 0 and run["wall_seconds"] > 0
        assert 0 < run["device_busy_share"] <= 1
        assert 0 < run["efficiency"] <= 1.05
        cpu = run["cpu"]
        assert cpu["worker_ms_per_image"] > 0 and cpu["stand_in_pixels_ms_per_image"] > 0
        for service in ("postgres", "redis", "s3"):
            assert cpu[f"{service}_ms_per_item"] >= 0
            assert cpu[f"{service}_gross_ms_per_item"] >= cpu[f"{service}_ms_per_item"]
        assert 0 < cpu["machine_busy_share"] <= 1
    rows = {row["encoding"]: row for row in figures["encoding"]["rows"]}
    assert any(name.startswith("PNG level 6") for name in rows)
    assert any(name.startswith("JPEG quality 90") for name in rows)
    for row in rows.values():
        assert row["ms_per_image"] > 0 and row["kb_per_image"] > 0
    assert all(row["lossless"] for name, row in rows.items() if name.startswith("PNG"))
    assert set(figures["capacity"]["services"]) == {"postgres", "redis", "s3"}
    assert figures["capacity"]["gpu_images_per_second"] == 20
    assert figures["targets"] and all("met" in entry for entry in figures["targets"].values())
