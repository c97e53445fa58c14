"""The ``skufleet.render`` task: decode the message, call the renderer, retry or not."""

from __future__ import annotations

import logging
import random
from typing import Any

from celery import Celery, Task
from celery.worker import state
from pydantic import ValidationError

from schemas.errors import ItemError
from schemas.names import TASK_RENDER
from schemas.params import RenderPayload
from schemas.settings import Settings
from worker.render import Renderer

log = logging.getLogger(__name__)

EXIT_DEVICE_FAILED = 3
"""Exit code of a worker process that took itself out of rotation."""
MAX_BACKOFF_SECONDS = 600.0


def backoff(base: float, attempt: int) -> float:
    """Seconds before retry ``attempt + 1``: doubling from ``base``, capped, ±20% jitter."""
    delay = min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


def register_render(app: Celery, renderer: Renderer, settings: Settings) -> Task:
    """Register ``skufleet.render`` on ``app``, bound to this process's renderer."""

    @app.task(name=TASK_RENDER, bind=True, max_retries=None)
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
        if outcome.fatal is not None:
            # The device cannot go on: hand the items to the rest of the fleet and stop.
            log.critical("taking %s out of rotation: %s", renderer.device, outcome.fatal)
            state.should_stop = EXIT_DEVICE_FAILED
        if outcome.retry:
            delay = (
                0.0 if outcome.fatal else backoff(settings.retry_backoff_seconds, outcome.attempt)
            )
            groups = [[i] for i in outcome.retry] if outcome.split else [outcome.retry]
            log.info(
                "retrying %d items in %d messages in %.1fs", len(outcome.retry), len(groups), delay
            )
            queue = (self.request.delivery_info or {}).get("routing_key")
            for group in groups:
                self.apply_async(
                    args=[{**request.model_dump(), "item_ids": group}],
                    countdown=delay,
                    queue=queue,
                )
        return {"succeeded": len(outcome.succeeded), "failed": len(outcome.failed)}

    return render
