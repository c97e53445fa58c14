"""The ``skufleet.render`` task: decode the message, call the renderer, stop on a dead device."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state
from pydantic import ValidationError

from skufleet.schemas.errors import EXIT_DEVICE_FAILED, RetryableError, Stopping
from skufleet.schemas.names import TASK_RENDER
from skufleet.schemas.params import RenderPayload
from skufleet.worker.render import Renderer, Requeue, backoff

log = logging.getLogger(__name__)


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


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(map(str, error['loc'])) or 'payload'}: {error['msg']}" for error in exc.errors()
    )


def register_render(app: Celery, renderer: Renderer) -> Task:
    """Register ``skufleet.render`` on ``app``, bound to this process's renderer."""

    # max_retries=None on the task (not on retry(), where None means "the default, 3"):
    # a message is retried for as long as the fleet's own services are down
    @app.task(name=TASK_RENDER, bind=True, max_retries=None)
    def render(self: Task, *args: Any, **kwargs: Any) -> dict[str, int]:
        # 1. decode: a message of any other shape is dropped with one line, never raised
        if len(args) != 1 or kwargs or not isinstance(args[0], dict):
            log.error(
                "dropping render message %s: expected one payload object, got %d arguments "
                "and %d keyword arguments",
                self.request.id,
                len(args),
                len(kwargs),
            )
            return {}
        try:
            request = RenderPayload.model_validate(args[0])
        except ValidationError as exc:
            log.error("dropping malformed render message %s: %s", self.request.id, _one_line(exc))
            return {}
        # 2. render; the renderer waits out outages of the ledger and storage itself
        try:
            outcome = renderer.handle(request)
        except Stopping as exc:
            # shutting down while the ledger or storage is away: the message goes back
            log.warning("handing message %s back to the queue: %s", self.request.id, exc)
            raise Reject(str(exc), requeue=True) from exc
        except RetryableError as exc:
            delay = backoff(renderer.settings.retry_backoff_seconds, self.request.retries + 1)
            log.warning("cannot render now (%s); retrying the message in %.1fs", exc, delay)
            raise self.retry(exc=exc, countdown=delay) from exc
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
