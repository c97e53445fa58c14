"""The Celery app of a worker process, configured for long GPU batches.

Every setting that matters carries a comment saying why it is set.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from celery import Celery, bootsteps
from celery.worker import state

from skufleet.schemas.broker import celery_settings
from skufleet.schemas.settings import Settings
from skufleet.worker.transport import TRANSPORT

log = logging.getLogger(__name__)

BURST_CHECK_SECONDS = 1.0
BURST_IDLE_CHECKS = 3
"""Consecutive idle checks before a burst worker stops (guards against in-flight messages)."""


def create_app(settings: Settings) -> Celery:
    """A Celery app bound to the configured broker, with skufleet's settings."""
    app = Celery("skufleet", broker=settings.redis_url, set_as_current=True)
    if settings.redis_url.split("://", 1)[0] in ("redis", "rediss"):
        # a message the worker cannot even decode is set aside, never fatal (worker.transport)
        app.conf.broker_transport = TRANSPORT
    # JSON only, the visibility timeout, retrying the first connection (schemas.broker)
    app.conf.update(celery_settings(settings))
    app.conf.update(
        # The ledger holds every item's state; task results would only fill Redis.
        task_ignore_result=True,
        result_backend=None,
        # Ack after the batch is drawn and stored, so a worker killed mid-batch has its
        # message redelivered; the ledger's attempt cap keeps a poison item from looping.
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        # A task that ends FAILURE (BatchFailed: some item failed or was retried) is acked,
        # not requeued: the items' own retries are messages of their own, and the ledger
        # holds every item's state. (Celery's default, written down because it matters.)
        task_acks_on_failure_or_timeout=True,
        # Celery reserves multiplier × concurrency messages: with two task threads per
        # device (one drawing, one storing) that is two, both in a thread, none waiting in
        # a buffer. The second may wait for the device while the first draws, unclaimed (no
        # lease ticks) and unacked: for at most one batch, under the visibility timeout.
        worker_prefetch_multiplier=1,
        # A worker outlives broker restarts: keep reconnecting, without a limit (the first
        # connection is retried as in every app).
        broker_connection_max_retries=None,
        # When the broker connection drops, running tasks' messages go back to the queue;
        # cancel such tasks where the pool can, rather than finish work another worker has.
        # (The ledger's attempt fence refuses a stale finish in any case.)
        worker_cancel_long_running_tasks_on_connection_loss=True,
        # Task events feed Flower's live view of every GPU.
        worker_send_task_events=True,
        task_send_sent_event=True,
        # Messages are addressed to a model's queue by name; the queue exists once used.
        task_create_missing_queues=True,
        # Keep the root logger ours: the worker logs its own stage timings.
        worker_hijack_root_logger=False,
    )
    return app


def burst_step(busy: Callable[[], bool]) -> type[bootsteps.StartStopStep]:
    """A consumer step that stops the worker, exit code 0, once its queues are empty, it
    holds no task and ``busy()`` (images still being stored) is false.

    For tests, demos and batch jobs. All of it must hold for a few checks in a row, so that
    a message in flight between Redis and the worker is not missed.
    """

    class BurstStep(bootsteps.StartStopStep):
        requires = ("celery.worker.consumer.tasks:Tasks",)

        def __init__(self, parent: Any, **kwargs: Any) -> None:
            super().__init__(parent, **kwargs)
            self.idle_checks = 0
            self.timer_entry: Any = None

        def start(self, consumer: Any) -> None:
            self.timer_entry = consumer.timer.call_repeatedly(
                BURST_CHECK_SECONDS, self.check, (consumer,), priority=10
            )

        def stop(self, consumer: Any) -> None:
            if self.timer_entry is not None:
                self.timer_entry.cancel()

        def check(self, consumer: Any) -> None:
            if (
                state.active_requests
                or state.reserved_requests
                or state.scheduled_requests
                or busy()
            ):
                self.idle_checks = 0
                return
            names = [queue.name for queue in consumer.task_consumer.queues]
            with consumer.app.connection_for_read() as connection:
                channel = connection.default_channel
                waiting = sum(channel.queue_declare(queue=name).message_count for name in names)
            self.idle_checks = self.idle_checks + 1 if waiting == 0 else 0
            if self.idle_checks >= BURST_IDLE_CHECKS:
                log.info("burst: queues %s are empty and nothing is running; stopping", names)
                state.should_stop = 0

    return BurstStep
