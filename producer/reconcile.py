"""The reconciler: the ledger is the truth, Redis only carries it; this puts them in step.

One pass:

1. items whose lease expired (their worker died, hung, or lost its connection) go back to
   queued and get a message each, or are failed for good when that was their last attempt;
2. items queued for longer than ``SKUFLEET_LOST_AFTER_SECONDS`` while their model's queue is
   empty lost their message (a broker restart without persistence, a flush) and get a new
   one. A duplicate is harmless: each item is claimed once;
3. finished runs that were never marked complete (their last worker died, the manifest
   could not be written, or new work came in and is done) get their manifest and webhook
   event: ``run.completed`` the first time, ``run.updated`` once the run changed
   (``downstream.complete``);
4. webhook events that are due (new, or failed before and past their backoff) are sent. A
   webhook that is down, slow, redirecting or misconfigured never stops the pass: its event
   stays in the ledger for a later one.

Run by ``skufleet reconcile [NAME] [--watch]`` and by the ``skufleet.reconcile`` beat task.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import timedelta

from sqlalchemy.engine import Engine

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.publish import Publisher
from skufleet.schemas import ledger
from skufleet.schemas.names import render_queue
from skufleet.schemas.params import DEFAULT_BATCH_SIZE, RenderPayload
from skufleet.schemas.settings import Settings


@dataclass
class ReconcileReport:
    expired: int = 0
    """Items whose lease expired, queued again."""
    dead_lettered: int = 0
    """Items whose lease expired on their last allowed attempt, failed for good."""
    republished: int = 0
    """Queued items whose message was presumed lost, published again."""
    messages: int = 0
    completed: int = 0
    """Finished runs whose manifest and webhook were still due."""
    delivered: int = 0
    """Webhook events the webhook took."""
    undelivered: int = 0
    """Webhook deliveries that failed; their events are tried again after a backoff."""

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.expired} expired leases requeued, {self.dead_lettered} dead-lettered, "
            f"{self.republished} lost messages republished ({self.messages} messages), "
            f"{self.completed} runs completed, {self.delivered} webhook events delivered"
            + (f" ({self.undelivered} failed, kept for retry)" if self.undelivered else "")
        )


def _publish(publisher: Publisher, prefix: str, found: list[ledger.Stranded], why: str) -> int:
    """Publish ``found``, each message labelled with ``why`` it is published again."""
    messages = 0
    for group in found:
        payloads = [
            RenderPayload(run_id=group.run_id, model=group.model, item_ids=ids)
            for ids in group.batches
        ]
        labels = [group.label(ids, why) for ids in group.batches]
        publisher.publish(render_queue(prefix, group.model), payloads, labels)
        messages += len(payloads)
    return messages


def reconcile(
    engine: Engine, publisher: Publisher, settings: Settings, run: str | None = None
) -> ReconcileReport:
    """One reconciler pass over every run, or over run ``run``.

    Raises a RetryableError when Redis, the database or the bucket is away, so that
    ``--watch`` skips the pass and tries again instead of dying.
    """
    report = ReconcileReport()
    # 1. expired leases: queued again (or failed at the cap) and published
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, run) if run is not None else None
        # one item per message: if the batch killed its worker, the culprit dies alone next
        # time and its batch mates go through, as with a batch that failed as a whole
        expired, report.dead_lettered = ledger.expire_leases(conn, settings.max_attempts, 1, run_id)
    report.expired = sum(len(ids) for group in expired for ids in group.batches)
    report.messages += _publish(publisher, settings.queue_prefix, expired, "lease expired")

    # 2. queued items whose message is presumed lost, where their model's queue is empty
    older = ledger.utcnow() - timedelta(seconds=settings.lost_after_seconds)
    with ledger.connect(engine) as conn:
        models = ledger.queued_models(conn, older, run_id)
    for model in models:
        if publisher.queue_length(render_queue(settings.queue_prefix, model)):
            continue  # messages are waiting: the queue is alive, nothing is known lost
        with ledger.begin(engine) as conn:
            lost = ledger.requeue_stale(conn, model, older, DEFAULT_BATCH_SIZE, run_id)
        report.republished += sum(len(ids) for group in lost for ids in group.batches)
        report.messages += _publish(publisher, settings.queue_prefix, lost, "republished")

    # 3. finished runs whose completion (manifest, webhook) no worker got to do
    with ledger.connect(engine) as conn:
        finished = ledger.finished_runs(conn)
    if run_id is not None:
        finished = [r for r in finished if r == run_id]
    if finished:
        bucket = Bucket(settings)
        report.completed = sum(
            downstream.complete(settings, engine, bucket, r, deliver=False) for r in finished
        )

    # 4. webhook events: new ones and those whose backoff has passed
    deliveries = downstream.deliver_due(settings, engine)
    report.delivered, report.undelivered = deliveries.delivered, deliveries.failed
    return report
