"""One worker process for one device: check the ledger, the bucket and the broker, load the
pipeline once, then consume the model's queue with Celery until stopped.

Started by the launcher (``skufleet-worker``) with ``CUDA_VISIBLE_DEVICES`` already pinned,
so inside this process the GPU is always ``cuda:0``. No CUDA work happens before the
worker starts, and no child is forked afterwards: the pool is two threads (one task draws on
the device while the other stores its batch, ``worker.render``), which keeps the main thread
free to send heartbeats to Flower and the broker during long batches.
"""

from __future__ import annotations

import argparse
import logging
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from celery import signals
from kombu.exceptions import OperationalError as BrokerError

from skufleet.schemas import ledger
from skufleet.schemas.errors import (
    EXIT_FAILED,
    EXIT_USAGE,
    BrokerUnavailable,
    ConfigError,
    SkufleetError,
    exit_code,
    one_line,
)
from skufleet.schemas.names import render_queue
from skufleet.schemas.redact import redact_url
from skufleet.schemas.settings import Settings, load_settings
from skufleet.worker.celery_app import burst_step, create_app
from skufleet.worker.pipeline import COMPILE_MODES, ImageModel, Pipeline, PipelineOptions
from skufleet.worker.render import TASK_THREADS, Renderer
from skufleet.worker.storage import Storage
from skufleet.worker.tasks import make_requeue, register_render

log = logging.getLogger("skufleet.worker")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
BROKER_TIMEOUT = 5.0
"""Seconds the start-up check waits for Redis to answer."""

Loader = Callable[[str, str, Path, PipelineOptions], ImageModel]


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, ``prog: error: …``, and exit 2: what a
    supervisor's log shows of a worker that would not start."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def log_level(value: str) -> str:
    """A --loglevel: one of :data:`LOG_LEVELS`, in any case."""
    if value.upper() not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"must be one of {', '.join(LOG_LEVELS)} (any case), got {value!r}"
        )
    return value.upper()


def port(value: str) -> int:
    """A TCP port to listen on, 1-65535 (the OS would take 99999 modulo 65536)."""
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port 1-65535, got {value!r}")
    return int(value)


def check_broker(url: str, timeout: float = BROKER_TIMEOUT) -> None:
    """Raise :class:`BrokerUnavailable` unless Redis answers at ``url`` now: at start Celery
    would wait for it for ever, and the supervisor would see a worker that never starts."""
    from kombu import Connection

    with Connection(url, connect_timeout=timeout) as connection:
        try:
            connection.ensure_connection(max_retries=1, interval_start=0, timeout=timeout)
        except (BrokerError, *connection.connection_errors) as exc:
            raise BrokerUnavailable(f"cannot reach the broker at {redact_url(url)}: {exc}") from exc


def add_pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    """The pipeline options, shared by ``skufleet-worker`` and each worker process."""
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "fp16", "bf16", "fp32"],
        help="weights and activations (auto: fp16 on CUDA, fp32 on CPU)",
    )
    parser.add_argument(
        "--compile", action="store_true", help="torch.compile the UNet (--compile-mode default)"
    )
    parser.add_argument(
        "--compile-mode",
        choices=COMPILE_MODES,
        metavar="MODE",
        help=f"torch.compile the UNet in this mode: {', '.join(COMPILE_MODES)} "
        "(reduce-overhead: CUDA graphs); pixels may differ by rounding",
    )
    parser.add_argument(
        "--fuse-qkv",
        action="store_true",
        help="fused query/key/value projections; pixels may differ by rounding on CUDA",
    )
    parser.add_argument(
        "--tf32",
        action="store_true",
        help="TF32 tensor cores for fp32 work on CUDA (changes fp32 pixels; no-op on the CPU)",
    )
    parser.add_argument(
        "--safety-checker",
        action="store_true",
        help="run the model's safety checker; flagged images are not uploaded",
    )
    parser.add_argument("--vae-batch", type=int, default=8, help="images the VAE decodes at once")


def pipeline_options(args: argparse.Namespace) -> PipelineOptions:
    return PipelineOptions(
        dtype=args.dtype,
        compile=args.compile,
        safety_checker=args.safety_checker,
        vae_batch=args.vae_batch,
        compile_mode=args.compile_mode,
        fuse_qkv=args.fuse_qkv,
        tf32=args.tf32,
    )


def pipeline_flags(args: argparse.Namespace) -> list[str]:
    """The command-line form of the pipeline options, for a child process."""
    flags = ["--dtype", args.dtype, "--vae-batch", str(args.vae_batch)]
    mode = pipeline_options(args).compile_mode
    flags += ["--compile-mode", mode] if mode else []
    flags += ["--fuse-qkv"] * args.fuse_qkv + ["--tf32"] * args.tf32
    return flags + ["--safety-checker"] * args.safety_checker


def serve(
    settings: Settings,
    model: str,
    device: str,
    name: str,
    *,
    burst: bool = False,
    options: PipelineOptions | None = None,
    loglevel: str = "INFO",
    load: Loader = Pipeline.load,
) -> int:
    """Run one device's worker until it is stopped; returns the exit code.

    ``load(model, device, cache_dir, options)`` builds the pipeline; tests pass stand-ins.
    """
    hostname = f"{name}@{socket.gethostname()}"
    try:
        if settings.lease_seconds >= settings.visibility_timeout:
            raise ConfigError(
                f"SKUFLEET_LEASE_SECONDS ({settings.lease_seconds}, the longest a batch may "
                f"hold its items) must be below SKUFLEET_VISIBILITY_TIMEOUT "
                f"({settings.visibility_timeout}), or Redis hands a batch still rendering to a "
                "second worker"
            )
        # 1. the ledger is reachable and at this code's schema
        engine = ledger.create_engine(settings.database_url)
        ledger.require_schema(engine)
        # 2. the bucket exists, and the broker answers
        storage = Storage(settings)
        storage.ensure_bucket()
        check_broker(settings.redis_url)
        # 3. the pipeline, loaded once and kept for the life of the process
        pipeline = load(model, device, settings.cache_dir, options or PipelineOptions())
    except SkufleetError as exc:
        # one line and the exit code of the error's class (schemas.errors): 2 to fix the
        # configuration, 3 for a service that does not answer or a device that fails
        log.critical("%s cannot start: %s", hostname, one_line(exc))
        return exit_code(exc)

    # 4. Celery, consuming only this model's queue; retries go back to the same queue
    queue = render_queue(settings.queue_prefix, model)
    app = create_app(settings)
    renderer = Renderer(settings, engine, pipeline, storage, hostname, make_requeue(app, queue))
    register_render(app, renderer)
    if burst:
        app.steps["consumer"].add(burst_step(renderer.busy))
    log.info("%s ready on %s, consuming %s", hostname, pipeline.describe_device(), queue)
    argv = [
        "worker",
        "--pool=threads",  # torch releases the GIL; the main thread keeps heartbeats flowing
        # one task draws (holding the device) while the other stores its batch
        f"--concurrency={TASK_THREADS}",
        f"--queues={queue}",
        f"--hostname={hostname}",
        f"--loglevel={loglevel}",
        "--without-mingle",  # no revokes or clocks to sync at start; starts faster
        "--without-gossip",  # Flower watches events, not gossip; saves broker traffic
    ]
    # worker_main does not return the worker's exit code (3 after a device failure, 0 after
    # a burst or a warm shutdown): read it off the worker itself
    started: list[Any] = []
    signals.worker_init.connect(lambda sender, **_: started.append(sender), weak=False)
    # a warm shutdown must not wait for an outage to end: work waiting for the ledger or
    # storage is handed back (messages to the queue, items to the ledger)
    signals.worker_shutting_down.connect(lambda **_: renderer.interrupt(), weak=False)
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        return int(exc.code or 0)
    finally:
        # a warm shutdown waits for the tasks, and each task stores what it drew before it
        # returns; then the storing threads stop
        renderer.close()
    return int(started[0].exitcode or 0) if started else EXIT_FAILED


def main(argv: list[str] | None = None, load: Loader = Pipeline.load) -> int:
    parser = ArgumentParser(
        prog="python -m skufleet.worker.process", description="One skufleet worker for one device."
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--device", required=True, help="cpu or cuda (already pinned)")
    parser.add_argument("--name", required=True, help="worker name, e.g. gpu0 or cpu")
    parser.add_argument("--burst", action="store_true")
    parser.add_argument("--loglevel", default="INFO", type=log_level)
    parser.add_argument("--metrics-port", type=port, help="serve Prometheus metrics here")
    parser.add_argument(
        "--metrics-address", default="127.0.0.1", help="address the metrics listen on"
    )
    add_pipeline_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.loglevel,
        format=f"%(asctime)s {args.name} %(levelname)s %(name)s: %(message)s",
    )
    try:
        settings = load_settings()
    except ConfigError as exc:
        log.critical("%s cannot start: %s", args.name, one_line(exc))
        return exit_code(exc)
    if args.metrics_port:
        from skufleet.worker import metrics

        try:
            metrics.serve(args.metrics_port, args.metrics_address, device=args.name)
        except OSError as exc:
            log.critical(
                "%s cannot serve metrics on port %d: %s", args.name, args.metrics_port, exc
            )
            return EXIT_USAGE
    return serve(
        settings,
        args.model,
        args.device,
        args.name,
        burst=args.burst,
        options=pipeline_options(args),
        loglevel=args.loglevel,
        load=load,
    )


if __name__ == "__main__":
    sys.exit(main())
