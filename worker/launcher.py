"""``skufleet-worker``: one worker process per device, each pinned with CUDA_VISIBLE_DEVICES.

The launcher starts the processes, forwards SIGTERM and SIGINT to them (a warm shutdown:
each finishes its batch), restarts none, and exits with the first non-zero exit code of its
children, so that its own supervisor (systemd, Kubernetes) sees every failure.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from types import FrameType

from skufleet.schemas.errors import EXIT_CODES_HELP, ConfigError, exit_code, one_line
from skufleet.schemas.settings import load_settings
from skufleet.worker.process import (
    ArgumentParser,
    add_pipeline_arguments,
    log_level,
    pipeline_flags,
    port,
)

log = logging.getLogger("skufleet.launcher")


@dataclass(frozen=True)
class DeviceSlot:
    """A device a worker process is pinned to."""

    name: str
    """Worker name prefix: ``cpu`` or ``gpu<index>``."""
    visible: str
    """Value of CUDA_VISIBLE_DEVICES for the process ('' hides every GPU)."""
    device: str
    """Device inside the process: ``cpu`` or ``cuda`` (the one visible GPU)."""


def count_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def parse_devices(spec: str, gpu_count: int | None = None) -> list[DeviceSlot]:
    """``cpu``, ``all`` or a comma-separated list of GPU indices, as device slots."""
    spec = spec.strip().lower()
    if spec == "cpu":
        return [DeviceSlot("cpu", "", "cpu")]
    available = count_gpus() if gpu_count is None else gpu_count
    if spec == "all":
        if available == 0:
            raise ValueError("--devices all: no CUDA device is visible here; use --devices cpu")
        indices = list(range(available))
    else:
        try:
            indices = [int(part) for part in spec.split(",") if part.strip()]
        except ValueError:
            raise ValueError(
                f"--devices must be cpu, all or GPU indices like 0,1; got {spec!r}"
            ) from None
        if not indices or len(set(indices)) != len(indices):
            raise ValueError(f"--devices {spec!r}: list each GPU index once")
        missing = [i for i in indices if not 0 <= i < available]
        if missing:
            raise ValueError(f"--devices {spec!r}: no GPU {missing[0]} here ({available} visible)")
    return [DeviceSlot(f"gpu{i}", str(i), "cuda") for i in indices]


def child_command(
    slot: DeviceSlot, model: str, burst: bool, loglevel: str, flags: list[str] | None = None
) -> list[str]:
    command = [
        sys.executable,
        "-m",
        "skufleet.worker.process",
        "--model",
        model,
        "--device",
        slot.device,
        "--name",
        slot.name,
        "--loglevel",
        loglevel,
        *(flags or []),
    ]
    return [*command, "--burst"] if burst else command


def supervise(children: dict[str, subprocess.Popen[bytes]]) -> int:
    """Wait for every child; forward stop signals; return the first non-zero exit code."""

    def forward(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s; stopping %d workers", signal.Signals(signum).name, len(children))
        for process in children.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    exit_code = 0
    running = dict(children)
    while running:
        for name, process in list(running.items()):
            code = process.poll()
            if code is None:
                continue
            del running[name]
            if code != 0:
                log.error("worker %s exited with code %d; it is not restarted", name, code)
                exit_code = exit_code or code
            else:
                log.info("worker %s exited", name)
        time.sleep(0.2)
    return exit_code


def main(argv: list[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="skufleet-worker", description=__doc__.splitlines()[0], epilog=EXIT_CODES_HELP
    )
    parser.add_argument("--model", help="model id, local path or 'tiny' [SKUFLEET_MODEL]")
    parser.add_argument("--devices", default="all", help="cpu, all, or GPU indices like 0,1")
    parser.add_argument(
        "--burst", action="store_true", help="exit 0 once the queue is empty and nothing is running"
    )
    parser.add_argument(
        "--loglevel", default="INFO", type=log_level, help="DEBUG, INFO, WARNING, ERROR or CRITICAL"
    )
    parser.add_argument(
        "--metrics-port",
        type=port,
        help="Prometheus metrics: device n serves them on this port plus n",
    )
    parser.add_argument(
        "--metrics-address",
        default="127.0.0.1",
        help="address the metrics listen on (default: this machine only)",
    )
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel, format="%(asctime)s launcher %(levelname)s: %(message)s"
    )
    try:
        settings = load_settings()
    except ConfigError as exc:
        log.critical("cannot start: %s", one_line(exc))
        return exit_code(exc)
    try:
        slots = parse_devices(args.devices)
    except ValueError as exc:
        parser.error(str(exc))
    if args.metrics_port and args.metrics_port + len(slots) - 1 > 65535:
        parser.error(
            f"--metrics-port {args.metrics_port}: {len(slots)} devices need ports up to "
            f"{args.metrics_port + len(slots) - 1}, past 65535"
        )
    model = args.model or settings.model
    children: dict[str, subprocess.Popen[bytes]] = {}
    for index, slot in enumerate(slots):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": slot.visible}
        flags = pipeline_flags(args)
        if args.metrics_port:
            flags += ["--metrics-port", str(args.metrics_port + index)]
            flags += ["--metrics-address", args.metrics_address]
        children[slot.name] = subprocess.Popen(
            child_command(slot, model, args.burst, args.loglevel, flags), env=env
        )
        log.info(
            "started worker %s (pid %d, CUDA_VISIBLE_DEVICES=%r, model %s)",
            slot.name,
            children[slot.name].pid,
            slot.visible,
            model,
        )
    return supervise(children)


if __name__ == "__main__":
    sys.exit(main())
