"""Prometheus metrics of the fleet that Flower does not export: queue depth, items by
status per run, images/s and time per image per device.

``skufleet metrics`` serves them; every value is read from Redis and the ledger at scrape
time, so the endpoint holds no state and any number of replicas agree. (Each worker also
serves its own device metrics, such as GPU memory, with ``skufleet-worker --metrics-port``.)
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import sqlalchemy as sa
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from skufleet.producer.publish import Publisher
from skufleet.schemas import ledger
from skufleet.schemas.errors import RetryableError
from skufleet.schemas.names import render_queue
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import Item, ItemStatus, Run

WINDOW = timedelta(seconds=60)


class FleetCollector(Collector):
    def __init__(self, settings: Settings, engine: Engine, publisher: Publisher) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher

    def collect(self) -> Iterator[GaugeMetricFamily]:
        queues = GaugeMetricFamily(
            "skufleet_queue_messages", "Messages waiting in a queue", labels=["queue", "model"]
        )
        items = GaugeMetricFamily(
            "skufleet_items", "Items of a run by status", labels=["run", "status"]
        )
        rate = GaugeMetricFamily(
            "skufleet_images_per_second",
            "Items finished per second over the last minute, per device",
            labels=["worker", "device"],
        )
        latency = GaugeMetricFamily(
            "skufleet_seconds_per_image",
            "Mean wall time per image of batches finished in the last minute, per device",
            labels=["worker", "device"],
        )
        up = GaugeMetricFamily(
            "skufleet_metrics_sources_up",
            "1 when the ledger and the broker could be read",
            labels=["source"],
        )
        since = ledger.utcnow() - WINDOW
        try:
            with ledger.connect(self.engine) as conn:
                models = list(conn.execute(sa.select(Run.model).distinct()).scalars())
                for run in ledger.list_runs(conn):
                    for status, count in run.status.counts.items():
                        items.add_metric([run.name, status], count)
                rows = conn.execute(
                    sa.select(
                        Item.worker, Item.device, sa.func.count(), sa.func.avg(Item.render_seconds)
                    )
                    .where(Item.status == ItemStatus.SUCCEEDED, Item.finished_at >= since)
                    .group_by(Item.worker, Item.device)
                ).all()
            for worker, device, count, seconds in rows:
                rate.add_metric([worker or "", device or ""], count / WINDOW.total_seconds())
                latency.add_metric([worker or "", device or ""], float(seconds or 0.0))
            up.add_metric(["ledger"], 1)
        except (sa.exc.SQLAlchemyError, RetryableError):
            models = []
            up.add_metric(["ledger"], 0)
        try:
            for model in models:
                name = render_queue(self.settings.queue_prefix, model)
                queues.add_metric([name, model], self.publisher.queue_length(name))
            up.add_metric(["broker"], 1)
        except RetryableError:
            up.add_metric(["broker"], 0)
        yield from (queues, items, rate, latency, up)
