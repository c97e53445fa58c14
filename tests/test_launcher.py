"""``skufleet-worker`` pins one process per device."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from worker.launcher import DeviceSlot, child_command, parse_devices

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
        "worker.process",
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


SUPERVISOR = """
import subprocess, sys
from worker.launcher import supervise
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
    """A worker that exits 3 (device out of rotation) stays down; the launcher reports 3."""
    marker = tmp_path / "starts.log"
    failing = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(3)"
    process = start_supervisor(failing, "import time; time.sleep(1.5)")
    assert process.wait(20) == 3
    assert marker.read_text() == "x"
