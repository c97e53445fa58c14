"""The ``skufleet.render`` task: decode the message, call the renderer, stop on a dead device."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.worker import state
from pydantic import ValidationError

from schemas.errors import ItemError, RetryableError
from schemas.names import TASK_RECONCILE, TASK_RENDER
from schemas.params import RenderPayload
from schemas.settings import Settings
from worker.render import Renderer, Requeue, backoff

log = logging.getLogger(__name__)

EXIT_DEVICE_FAILED = 3
"""Exit code of a worker process that took itself out of rotation."""


def make_requeue(app: Celery, queue: str) -> Requeue:
    """How the renderer publishes a retry: the same task, on the same queue, later."""

    def requeue(payload: RenderPayload, countdown: float) -> None:
        app.send_task(
            TASK_RENDER,
            args=[payload.model_dump()],
            queue=queue,
            countdown=countdown,
            argsrepr=f"run {payload.run_id}: {len(payload.item_ids)} items (retry)",
            kwargsrepr="{}",
        )

    return requeue


def register_render(app: Celery, renderer: Renderer) -> Task:
    """Register ``skufleet.render`` on ``app``, bound to this process's renderer."""

    @app.task(name=TASK_RENDER, bind=True)
    def render(self: Task, payload: dict[str, Any]) -> dict[str, int]:
        try:
            request = RenderPayload.model_validate(payload)
        except ValidationError as exc:
            log.error("dropping a malformed render message: %s", exc)
            return {}
        try:
            outcome = renderer.handle(request)
        except ItemError as exc:
            log.error("dropping message: %s", exc)
            return {}
        except RetryableError as exc:
            # the ledger could not be reached to claim: the same message, a little later
            delay = backoff(renderer.settings.retry_backoff_seconds, self.request.retries + 1)
            log.warning("cannot claim now (%s); retrying the message in %.1fs", exc, delay)
            raise self.retry(exc=exc, countdown=delay, max_retries=None) from exc
        if outcome.fatal is not None:
            # The device cannot go on: its items are back on the queue; stop consuming and
            # exit non-zero, so that the supervisor sees it.
            log.critical(
                "taking %s out of rotation (exit code %d): %s",
                renderer.device,
                EXIT_DEVICE_FAILED,
                outcome.fatal,
            )
            state.should_stop = EXIT_DEVICE_FAILED
        return {"claimed": outcome.claimed, "drawn": outcome.drawn}

    return render


def register_reconcile(app: Celery, settings: Settings) -> Task:
    """Register ``skufleet.reconcile``, the beat-driven reconciler pass (``skufleet beat``)."""

    @app.task(name=TASK_RECONCILE)
    def reconcile() -> dict[str, int]:
        from producer.publish import Publisher
        from producer.reconcile import reconcile as reconcile_pass
        from schemas import ledger

        engine = ledger.create_engine(settings.database_url)
        try:
            with Publisher(settings) as publisher:
                report = reconcile_pass(engine, publisher, settings)
        finally:
            engine.dispose()
        log.info("reconcile: %s", report)
        return report.as_dict()

    return reconcile
