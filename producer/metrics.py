"""Prometheus metrics of the fleet that Flower does not export: queue depth, items by status
per run, each run's failures and retries by kind of error, and what its quality gate did
(items waiting for review, re-rolls, renders, the share of finished items usable).

``skufleet metrics`` serves them; every value is read from Redis and the ledger at scrape
time, so the endpoint holds no state and any number of replicas agree. Runs are those still
open and those created, changed or completed within :data:`ACTIVE` (not every run ever
made). Rates are not computed here: each worker serves counters of its own device
(``worker.metrics``, ``skufleet-worker --metrics-port``) for Prometheus' ``rate()``, and the
pace of a run is ``deriv()`` of its ``skufleet_items``; ``deploy/grafana/`` has both.
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
from skufleet.schemas.tables import Run

ACTIVE = timedelta(days=1)
"""Finished runs stay in the metrics this long after they last changed."""
KINDS_PER_RUN = 10
"""Most error kinds exported per run (the commonest), to bound the series."""


def families() -> dict[str, GaugeMetricFamily]:
    """Every metric this exporter serves, empty: what :class:`FleetCollector` fills."""
    return {
        "queues": GaugeMetricFamily(
            "skufleet_queue_messages", "Messages waiting in a queue", labels=["queue", "model"]
        ),
        "items": GaugeMetricFamily(
            "skufleet_items",
            "Items of a run by status (open runs and runs active in the last day)",
            labels=["run", "status"],
        ),
        "failures": GaugeMetricFamily(
            "skufleet_run_failures",
            "Failed items of a run by kind of error (the commonest kinds)",
            labels=["run", "kind"],
        ),
        "retrying": GaugeMetricFamily(
            "skufleet_run_retrying_items",
            "Open items of a run that an earlier attempt failed: being tried again",
            labels=["run"],
        ),
        "needs_review": GaugeMetricFamily(
            "skufleet_run_needs_review_items",
            "Items of a run whose stored image failed a quality check: waiting for a reviewer",
            labels=["run"],
        ),
        "rerolls": GaugeMetricFamily(
            "skufleet_run_rerolls",
            "Images of a run drawn again because every candidate before failed a quality check",
            labels=["run"],
        ),
        "renders": GaugeMetricFamily(
            "skufleet_run_renders",
            "Candidate images drawn for a run's items (best-of-N and re-rolls included)",
            labels=["run"],
        ),
        "usable": GaugeMetricFamily(
            "skufleet_run_usable_ratio",
            "Of a run's finished items (succeeded, needs_review, failed), the share that "
            "succeeded, 0-1 (no sample while none is finished)",
            labels=["run"],
        ),
        "up": GaugeMetricFamily(
            "skufleet_metrics_sources_up",
            "1 when the ledger and the broker could be read",
            labels=["source"],
        ),
    }


class FleetCollector(Collector):
    def __init__(self, settings: Settings, engine: Engine, publisher: Publisher) -> None:
        self.settings = settings
        self.engine = engine
        self.publisher = publisher

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """The metrics' names and types, without reading anything (for registration)."""
        yield from families().values()

    def collect(self) -> Iterator[GaugeMetricFamily]:
        found = families()
        since = ledger.utcnow() - ACTIVE
        try:
            with ledger.connect(self.engine) as conn:
                models = list(conn.execute(sa.select(Run.model).distinct()).scalars())
                for run in ledger.list_runs(conn, active_since=since):
                    for status, count in run.status.counts.items():
                        found["items"].add_metric([run.name, status], count)
                    if run.status.counts["failed"]:
                        for kind, count in ledger.failure_reasons(conn, run.name, KINDS_PER_RUN):
                            found["failures"].add_metric([run.name, kind], count)
                    retrying = 0  # a run with nothing open retries nothing
                    if run.status.total - run.status.done:
                        retrying, _ = ledger.retrying(conn, run.name, limit=0)
                    found["retrying"].add_metric([run.name], retrying)
                    gated = run.status
                    found["needs_review"].add_metric([run.name], gated.needs_review)
                    found["rerolls"].add_metric([run.name], gated.rerolls)
                    found["renders"].add_metric([run.name], gated.renders)
                    if gated.usable_ratio is not None:
                        found["usable"].add_metric([run.name], gated.usable_ratio)
            found["up"].add_metric(["ledger"], 1)
        except (sa.exc.SQLAlchemyError, RetryableError):
            models = []
            found["up"].add_metric(["ledger"], 0)
        try:
            for model in models:
                name = render_queue(self.settings.queue_prefix, model)
                found["queues"].add_metric([name, model], self.publisher.queue_length(name))
            found["up"].add_metric(["broker"], 1)
        except RetryableError:
            found["up"].add_metric(["broker"], 0)
        yield from found.values()
