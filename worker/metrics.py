"""A worker's own Prometheus metrics: batches, images, stage times, device memory.

Served by each worker process on ``--metrics-port`` (the launcher gives device n the port
plus n), on 127.0.0.1 unless ``--metrics-address`` says otherwise: they carry no credentials,
so a scraper from elsewhere is let in on purpose. Only :mod:`worker.render` records into
these.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

import torch
from prometheus_client import Counter, Gauge, Histogram, start_http_server

BATCH_SECONDS = Histogram(
    "skufleet_worker_batch_seconds",
    "Time to draw a batch on the device",
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
STAGE_SECONDS = Counter("skufleet_worker_stage_seconds_total", "Seconds spent per stage", ["stage"])
IMAGES = Counter("skufleet_worker_images_total", "Images drawn")
FAILED_BATCHES = Counter("skufleet_worker_failed_batches_total", "Batches that failed to draw")
BUSY = Gauge("skufleet_worker_device_busy_ratio", "Share of time the device spent drawing")
MEMORY = Gauge("skufleet_worker_device_memory_bytes", "Device memory", ["kind"])


def observe_batch(images: int, stages: dict[str, float], busy: float, device: torch.device) -> None:
    BATCH_SECONDS.observe(sum(stages.values()))
    for stage, seconds in stages.items():
        STAGE_SECONDS.labels(stage).inc(seconds)
    IMAGES.inc(images)
    BUSY.set(busy)
    if device.type == "cuda":
        MEMORY.labels("allocated").set(torch.cuda.memory_allocated(device))
        MEMORY.labels("peak").set(torch.cuda.max_memory_allocated(device))


DEFAULT_ADDRESS = "127.0.0.1"
"""Where a worker serves its metrics unless told otherwise: this machine only."""


def serve(port: int, address: str = DEFAULT_ADDRESS) -> WSGIServer:
    """Serve the metrics on ``address:port`` from a daemon thread; the listening server."""
    server, _thread = start_http_server(port, addr=address)
    return server
