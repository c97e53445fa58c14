"""``skufleet-worker`` pins one process per device."""

from __future__ import annotations

import pytest

from worker.launcher import DeviceSlot, child_command, parse_devices


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
