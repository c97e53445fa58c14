"""Publishing render messages by task name, without importing the worker."""

from __future__ import annotations

from collections.abc import Sequence
from types import TracebackType

from celery import Celery
from kombu.exceptions import BatchPublishError, OperationalError

from skufleet.schemas.broker import celery_settings
from skufleet.schemas.errors import BrokerUnavailable
from skufleet.schemas.names import TASK_RENDER
from skufleet.schemas.params import RenderPayload
from skufleet.schemas.settings import Settings

PIPELINE = 500
"""Messages per Redis round trip when publishing."""


def fallback_label(payload: RenderPayload) -> str:
    """What Flower shows for a message published without a label."""
    return f"run {payload.run_id} ({len(payload.item_ids)} items)"


class Publisher:
    """Sends ``skufleet.render`` messages to a model's queue over one broker connection."""

    def __init__(self, settings: Settings) -> None:
        self.app = Celery("skufleet-producer", broker=settings.redis_url, set_as_current=False)
        self.app.conf.update(celery_settings(settings))  # nothing of its own to add
        # kombu converts the errors of a first connection into OperationalError, but a
        # connection lost later (Redis restarted mid-run) surfaces as the client library's
        # own error, and a cut pipeline as BatchPublishError: all mean "the broker is away"
        with self.app.connection_for_write() as connection:
            self.broker_errors: tuple[type[Exception], ...] = (
                OperationalError,
                BatchPublishError,
                *connection.connection_errors,
            )

    def publish(
        self, queue: str, payloads: Sequence[RenderPayload], labels: Sequence[str] = ()
    ) -> None:
        """Publish one message per payload on one connection, pipelined: kombu's
        ``Producer.batch`` buffers Redis LPUSHes and sends them ``PIPELINE`` at a time.

        ``labels[i]`` is what Flower shows for ``payloads[i]`` (``schemas.label``: the run's
        name, shot and first SKUs); without labels a message shows its run id and size."""
        if labels and len(labels) != len(payloads):
            raise ValueError(f"{len(labels)} labels for {len(payloads)} payloads")
        try:
            with self.app.producer_or_acquire() as producer, producer.batch(PIPELINE):
                for n, payload in enumerate(payloads):
                    self.app.send_task(
                        TASK_RENDER,
                        args=[payload.model_dump()],
                        queue=queue,
                        producer=producer,
                        # display only, in the message's headers: what Flower shows for the
                        # task (it also spares Celery a saferepr of the arguments)
                        argsrepr=labels[n] if labels else fallback_label(payload),
                        kwargsrepr="{}",
                    )
        except self.broker_errors as exc:
            raise BrokerUnavailable(f"cannot publish to the broker: {exc}") from exc

    def queue_length(self, queue: str) -> int:
        """Messages waiting in ``queue`` (not counting those a worker holds unacked)."""
        try:
            with self.app.connection_for_read() as connection:
                return int(connection.default_channel.queue_declare(queue=queue).message_count)
        except self.broker_errors as exc:
            raise BrokerUnavailable(f"cannot reach the broker: {exc}") from exc

    def close(self) -> None:
        self.app.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
