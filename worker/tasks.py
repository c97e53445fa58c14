"""The ``skufleet.render`` task: decode the message, call the renderer, report the batch.

A render task's final state is its whole batch's, storing included, because the renderer
returns only once every item it claimed is stored or settled:

- SUCCESS: every item the message claimed is uploaded and recorded, or there was nothing to
  do (a duplicate message, items already done or cancelled);
- FAILURE, with :class:`~schemas.errors.BatchFailed` naming how many items were not stored
  and the first reason: an item failed for good, was retried after an error, was taken over
  by another attempt or handed back (a device failure), or the message was refused or
  malformed. ``BatchFailed`` is declared in ``throws``: Celery records the failure, logs it
  on one line without a traceback, and (``acks_late`` with
  ``task_acks_on_failure_or_timeout``) acknowledges the message. Nothing retries or
  requeues it: each item's retry is already a message of its own, labelled with its attempt
  (``… · retry, attempt 2 of 3``), and the ledger holds every item's state;
- REJECTED, requeued (``Reject(requeue=True)``): the worker stops, or its device left the
  rotation, before the message's items were claimed; the message goes back as it is;
- RETRY (``self.retry``): only a RetryableError out of the renderer, which waits out outages
  of the ledger and storage itself.
"""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task
from celery.exceptions import Reject
from celery.worker import state
from pydantic import ValidationError

from skufleet.schemas.errors import EXIT_DEVICE_FAILED, BatchFailed, RetryableError, Stopping
from skufleet.schemas.names import TASK_RENDER
from skufleet.schemas.params import RenderPayload
from skufleet.worker.render import Renderer, Requeue, backoff

log = logging.getLogger(__name__)


def make_requeue(app: Celery, queue: str) -> Requeue:
    """How the renderer publishes a retry: the same task, on the same queue, later, with the
    label (``schemas.label``) Flower shows for it."""

    def requeue(payload: RenderPayload, countdown: float, label: str) -> None:
        app.send_task(
            TASK_RENDER,
            args=[payload.model_dump()],
            queue=queue,
            countdown=countdown,
            argsrepr=label,
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
    # a message is retried for as long as the fleet's own services are down.
    # throws: a batch that was not stored in full is an expected failure (see above).
    @app.task(name=TASK_RENDER, bind=True, max_retries=None, throws=(BatchFailed,))
    def render(self: Task, *args: Any, **kwargs: Any) -> dict[str, int]:
        # 1. decode: a message of any other shape is dropped with one line, never retried
        if len(args) != 1 or kwargs or not isinstance(args[0], dict):
            log.error(
                "dropping render message %s: expected one payload object, got %d arguments "
                "and %d keyword arguments",
                self.request.id,
                len(args),
                len(kwargs),
            )
            raise BatchFailed("not a render message: expected one payload object")
        try:
            request = RenderPayload.model_validate(args[0])
        except ValidationError as exc:
            log.error("dropping malformed render message %s: %s", self.request.id, _one_line(exc))
            raise BatchFailed(f"not a render payload: {_one_line(exc)}"[:500]) from None
        # 2. render and store; the renderer waits out outages of the ledger and storage
        try:
            outcome = renderer.handle(request)
        except Stopping as exc:
            # nothing claimed yet, and the worker stops: the message goes back
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
        # 3. the final state: SUCCESS only when every claimed item is stored
        problem = outcome.problem()
        if problem is not None:
            raise BatchFailed(problem)
        return {"claimed": outcome.claimed, "stored": outcome.stored}

    return render
