"""``skufleet-worker`` pins one process per device."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from skufleet.producer.services import free_port
from skufleet.schemas.errors import DeviceError
from skufleet.worker.launcher import DeviceSlot, child_command, parse_devices
from skufleet.worker.pipeline import PipelineOptions
from skufleet.worker.process import (
    ArgumentParser,
    add_pipeline_arguments,
    pipeline_flags,
    pipeline_options,
)
from skufleet.worker.tasks import EXIT_DEVICE_FAILED
from tests.fleet import BIN, Fleet, postgres_only

ROOT = Path(__file__).resolve().parent.parent


def test_cpu_hides_every_gpu() -> None:
    """--devices cpu runs one process with no GPU visible."""
    assert parse_devices("cpu") == [DeviceSlot("cpu", "", "cpu")]


def test_all_and_lists_pin_one_gpu_per_process() -> None:
    """Each process sees exactly one GPU, as cuda:0, and is named after it."""
    assert parse_devices("all", gpu_count=2) == [
        DeviceSlot("gpu0", "0", "cuda"),
        DeviceSlot("gpu1", "1", "cuda"),
    ]
    assert [s.visible for s in parse_devices("1,3", gpu_count=4)] == ["1", "3"]


@pytest.mark.parametrize(
    ("spec", "message"),
    [("all", "no CUDA device"), ("5", "no GPU 5"), ("0,0", "once"), ("gpu", "GPU indices")],
)
def test_impossible_device_lists_are_refused(spec: str, message: str) -> None:
    """A device list that cannot be honoured is an error naming the problem."""
    with pytest.raises(ValueError, match=message):
        parse_devices(spec, gpu_count=0 if spec == "all" else 2)


def test_child_command_carries_model_device_and_burst() -> None:
    """The child process gets its model, in-process device name and burst flag."""
    command = child_command(DeviceSlot("gpu1", "1", "cuda"), "tiny", True, "INFO")
    assert command[1:] == [
        "-m",
        "skufleet.worker.process",
        "--model",
        "tiny",
        "--device",
        "cuda",
        "--name",
        "gpu1",
        "--loglevel",
        "INFO",
        "--burst",
    ]


def parse_pipeline(*argv: str) -> PipelineOptions:
    parser = ArgumentParser(prog="test")
    add_pipeline_arguments(parser)
    return pipeline_options(parser.parse_args(list(argv)))


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ((), PipelineOptions()),
        (("--compile",), PipelineOptions(compile_mode="default")),
        (
            ("--compile-mode", "reduce-overhead", "--fuse-qkv", "--tf32"),
            PipelineOptions(compile_mode="reduce-overhead", fuse_qkv=True, tf32=True),
        ),
        (
            ("--compile", "--compile-mode", "max-autotune", "--dtype", "bf16"),
            PipelineOptions(compile_mode="max-autotune", dtype="bf16"),
        ),
    ],
)
def test_gpu_path_flags_reach_the_worker_processes(
    argv: tuple[str, ...], expected: PipelineOptions
) -> None:
    """--compile, --compile-mode, --fuse-qkv and --tf32 on skufleet-worker become the same
    PipelineOptions in each worker process, through the child's command line."""
    parser = ArgumentParser(prog="skufleet-worker")
    add_pipeline_arguments(parser)
    flags = pipeline_flags(parser.parse_args(list(argv)))
    command = child_command(DeviceSlot("gpu0", "0", "cuda"), "tiny", False, "INFO", flags)
    assert command[-len(flags) :] == flags
    assert parse_pipeline(*flags) == parse_pipeline(*argv) == expected


SUPERVISOR = """
import subprocess, sys
from skufleet.worker.launcher import supervise
children = {name: subprocess.Popen([sys.executable, "-c", code])
            for name, code in (("a", sys.argv[1]), ("b", sys.argv[2]))}
print("started", flush=True)
sys.exit(supervise(children))
"""
SLEEPER = """
import signal, sys, time
def stop(*_):
    open({marker!r}, "a").write("stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
open({marker!r}, "a").write("started\\n")
time.sleep(60)
"""


def start_supervisor(*codes: str) -> subprocess.Popen[str]:
    process = subprocess.Popen(
        [sys.executable, "-c", SUPERVISOR, *codes], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert process.stdout is not None and process.stdout.readline().strip() == "started"
    return process


def test_sigterm_stops_every_worker_and_the_launcher_exits_cleanly(tmp_path: Path) -> None:
    """SIGTERM to the launcher reaches each worker process (a warm shutdown)."""
    markers = [tmp_path / "a.log", tmp_path / "b.log"]
    process = start_supervisor(*(SLEEPER.format(marker=str(m)) for m in markers))
    deadline = time.monotonic() + 20
    while not all(m.exists() for m in markers) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0
    assert [m.read_text() for m in markers] == ["started\nstopped\n"] * 2


def test_a_failed_worker_is_not_restarted_and_its_exit_code_is_returned(tmp_path: Path) -> None:
    """A worker that exits 4 (device out of rotation) stays down; the launcher reports 4."""
    marker = tmp_path / "starts.log"
    failing = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(4)"
    process = start_supervisor(failing, "import time; time.sleep(1.5)")
    assert process.wait(20) == 4
    assert marker.read_text() == "x"


PASSWORD = "s3cr3t-pa55"
"""Put in the URLs below; it must never appear in what the worker prints or logs."""


def launch(cwd: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "skufleet-worker"), *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        cwd=cwd,
    )


def test_a_device_out_of_rotation_keeps_its_exit_code() -> None:
    """DeviceError exits with the code a worker gives when it takes its device out of
    rotation (3, which it shares with an unreachable service)."""
    assert DeviceError.exit_code == EXIT_DEVICE_FAILED == 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--loglevel", "bogus"), "argument --loglevel: must be one of DEBUG, INFO, WARNING"),
        (
            ("--metrics-port", "99999"),
            "argument --metrics-port: must be a port 1-65535, got '99999'",
        ),
        (("--metrics-port", "0"), "argument --metrics-port: must be a port 1-65535, got '0'"),
        (("--devices", "gpu"), "--devices must be cpu, all or GPU indices like 0,1; got 'gpu'"),
        (("--compile-mode", "fast"), "argument --compile-mode: invalid choice: 'fast'"),
    ],
)
def test_a_bad_loglevel_port_or_device_list_is_one_line_and_exit_2(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    """What argparse or the launcher refuses is one line on stderr, exit 2, no traceback
    (a --metrics-port of 99999 used to reach bind() and crash every worker)."""
    result = launch(tmp_path, "--devices", "cpu", *args)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"skufleet-worker: error: {message}")


def test_a_malformed_setting_stops_the_launcher_in_one_line(tmp_path: Path) -> None:
    """An unsupported database driver stops skufleet-worker before any worker starts: one
    line naming the variable, exit 2, the password nowhere."""
    result = launch(
        tmp_path, "--devices", "cpu", SKUFLEET_DATABASE_URL=f"mysql://u:{PASSWORD}@db/ledger"
    )
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert "cannot start: invalid setting SKUFLEET_DATABASE_URL: database driver 'mysql'" in line
    assert PASSWORD not in result.stdout + result.stderr


@postgres_only
@pytest.mark.parametrize("service", ["database", "redis", "s3"])
def test_a_worker_that_cannot_reach_a_service_exits_3_in_one_line(
    fleet: Fleet, service: str
) -> None:
    """A worker whose ledger, broker or bucket refuses at start logs one critical line
    naming it with the password masked and exits 3; nothing waits for ever."""
    assert fleet.cli("db", "upgrade").returncode == 0
    closed = free_port()
    env, shown = {
        "database": (
            {"SKUFLEET_DATABASE_URL": f"postgresql://u:{PASSWORD}@127.0.0.1:{closed}/x"},
            "cannot reach the ledger at postgresql+psycopg://u:***@127.0.0.1",
        ),
        "redis": (
            {"SKUFLEET_REDIS_URL": f"redis://:{PASSWORD}@127.0.0.1:{closed}/0"},
            f"cannot reach the broker at redis://:***@127.0.0.1:{closed}/0",
        ),
        "s3": (
            {
                "SKUFLEET_S3_ENDPOINT_URL": f"http://ak:{PASSWORD}@127.0.0.1:{closed}",
                "SKUFLEET_S3_MAX_ATTEMPTS": "1",
            },
            f"http://ak:***@127.0.0.1:{closed}",
        ),
    }[service]
    broken = dataclasses.replace(fleet, env={**fleet.env, **env})
    result = broken.worker("--devices", "cpu", "--model", "tiny", "--burst", timeout=120)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    critical = [line for line in output.splitlines() if "CRITICAL" in line]
    assert len(critical) == 1 and "cannot start:" in critical[0] and shown in critical[0]
    assert "Traceback" not in output and PASSWORD not in output
