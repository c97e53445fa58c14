"""A worker's own Prometheus metrics: counters and histograms of its device, for ``rate()``.

Every series carries a ``device`` label, the worker's name (``gpu0``, ``cpu``; see
``worker.launcher``), given to :func:`serve`. Rates are Prometheus' to compute, over the
window a query chooses:

- images/s: ``rate(skufleet_worker_images_total[5m])``;
- the share of time the device draws: ``rate(skufleet_worker_device_busy_seconds_total[5m])``;
- device seconds per image: ``histogram_quantile(0.5,
  rate(skufleet_worker_render_seconds_bucket[5m]))``, or ``rate(..._busy_seconds_total) /
  rate(..._images_total)`` for the mean;
- failed batches/s: ``rate(skufleet_worker_failed_batches_total[5m])``.

Served by each worker process on ``--metrics-port`` (the launcher gives device n the port
plus n), on 127.0.0.1 unless ``--metrics-address`` says otherwise: they carry no credentials,
so a scraper from elsewhere is let in on purpose. Only :mod:`worker.render` records into
these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    import torch

DEVICE = "device"
"""The label every series carries."""

BATCH_SECONDS = Histogram(
    "skufleet_worker_batch_seconds",
    "Seconds to draw a batch on the device",
    [DEVICE],
    buckets=(0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128),
)
RENDER_SECONDS = Histogram(
    "skufleet_worker_render_seconds",
    "Device seconds per image: a batch's draw time over its images, once per image",
    [DEVICE],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64),
)
STAGE_SECONDS = Counter(
    "skufleet_worker_stage_seconds_total", "Seconds spent per stage", [DEVICE, "stage"]
)
IMAGES = Counter("skufleet_worker_images_total", "Images drawn", [DEVICE])
BUSY_SECONDS = Counter(
    "skufleet_worker_device_busy_seconds_total",
    "Seconds the device spent drawing; rate() of it is the share of time busy",
    [DEVICE],
)
MEMORY = Gauge(
    "skufleet_worker_device_memory_bytes", "Device memory: allocated now, peak", [DEVICE, "kind"]
)
_FAILED_BATCHES = Counter(
    "skufleet_worker_failed_batches_total", "Batches that failed to draw", [DEVICE]
)

_REROLLS = Counter(
    "skufleet_worker_rerolls_total",
    "Images drawn again because every candidate of their item failed a quality check",
    [DEVICE],
)
_GATED = Counter(
    "skufleet_worker_gated_items_total",
    "Items drawn through the quality gate, by what it made of their kept image",
    [DEVICE, "verdict"],
)
_CHECK_SECONDS = Counter(
    "skufleet_worker_check_seconds_total", "Host seconds spent in quality checks", [DEVICE]
)

_device = "cpu"
"""This process's ``device`` label: set once by :func:`serve`."""


class _OfThisDevice:
    """A counter whose ``inc()`` counts for this process's device."""

    def __init__(self, counter: Counter) -> None:
        self._counter = counter

    def inc(self, amount: float = 1.0) -> None:
        self._counter.labels(_device).inc(amount)


FAILED_BATCHES = _OfThisDevice(_FAILED_BATCHES)
"""``FAILED_BATCHES.inc()`` when a batch fails to draw."""


def observe_batch(images: int, stages: dict[str, float], busy: float, device: torch.device) -> None:
    """Count a drawn batch: ``images`` images, ``stages`` seconds per stage on ``device``.

    ``busy`` (the renderer's share since its first batch) is not exported: an average since
    the process started hides what the device does now; Prometheus takes the share from
    ``rate(skufleet_worker_device_busy_seconds_total)`` over the window it wants.
    """
    del busy
    seconds = sum(stages.values())
    BATCH_SECONDS.labels(_device).observe(seconds)
    for _ in range(images):
        RENDER_SECONDS.labels(_device).observe(seconds / images)
    for stage, stage_seconds in stages.items():
        STAGE_SECONDS.labels(_device, stage).inc(stage_seconds)
    IMAGES.labels(_device).inc(images)
    BUSY_SECONDS.labels(_device).inc(seconds)
    if device.type == "cuda":
        import torch

        MEMORY.labels(_device, "allocated").set(torch.cuda.memory_allocated(device))
        MEMORY.labels(_device, "peak").set(torch.cuda.max_memory_allocated(device))


def observe_gate(rerolls: int, passed: int, failed: int, check_seconds: float) -> None:
    """Count what the quality gate did for one batch: re-rolls drawn, items whose kept image
    passed or failed (needs review), and the host time of the checks."""
    _REROLLS.labels(_device).inc(rerolls)
    _GATED.labels(_device, "passed").inc(passed)
    _GATED.labels(_device, "failed").inc(failed)
    _CHECK_SECONDS.labels(_device).inc(check_seconds)


DEFAULT_ADDRESS = "127.0.0.1"
"""Where a worker serves its metrics unless told otherwise: this machine only."""


def serve(port: int, address: str = DEFAULT_ADDRESS, *, device: str | None = None) -> WSGIServer:
    """Serve the metrics on ``address:port`` from a daemon thread; the listening server.

    ``device`` is the label of every series from now on: the worker's name (``gpu0``).
    """
    global _device
    if device is not None:
        _device = device
    server, _thread = start_http_server(port, addr=address)
    return server
