"""One render message, start to finish: claim, draw, then encode, upload and record.

Plain Python with no Celery in it: the task in ``worker.tasks`` decodes the message and
calls :meth:`Renderer.handle`; retries go back to the queue through the ``requeue``
callable the task module provides.

The GPU part (claim and draw) runs in the task; encoding, upload and the ledger update of
each image run on background threads (:class:`~worker.handoff.Handoff`), so the next batch
is already drawing while this one is stored. A message is acknowledged once its batch is
drawn; from then on the ledger (each item's lease and attempt) keeps the item safe.

A run's completion (its manifest and webhook) is not the worker's: the reconciler
(``skufleet reconcile --watch``) completes every finished run on its next pass.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar
from urllib.parse import quote

import numpy as np
import torch
from PIL import Image
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import (
    DeviceError,
    FatalError,
    ItemError,
    LedgerUnavailable,
    RetryableError,
    SkufleetError,
    Stopping,
)
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import ItemStatus
from skufleet.worker import metrics
from skufleet.worker.handoff import BatchLog, Handoff
from skufleet.worker.outage import Services
from skufleet.worker.pipeline import Batch, ImageModel, Job
from skufleet.worker.postprocess import process
from skufleet.worker.storage import Storage

log = logging.getLogger(__name__)

T = TypeVar("T")

Requeue = Callable[[RenderPayload, float], None]
"""Publish ``payload`` again after ``countdown`` seconds."""

MAX_BACKOFF_SECONDS = 600.0
_DEVICE_FAILURES = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")


def backoff(base: float, attempt: int) -> float:
    """Seconds before retry ``attempt + 1``: doubling from ``base``, capped, ±20% jitter."""
    delay = min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Outcome:
    """What :meth:`Renderer.handle` did with a message (storing continues in the background).

    Every result of a message is data here; ``handle`` raises only :class:`Stopping`, when
    the process stops while the ledger or storage is away."""

    claimed: int = 0
    drawn: int = 0
    refused: str | None = None
    """Why the message was not rendered at all (it does not match the ledger or this worker)."""
    fatal: FatalError | None = None
    """Set when the device cannot go on; its items were handed back to the fleet."""


class Renderer:
    """Renders the items of one message with the process's pinned pipeline."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pipeline: ImageModel,
        storage: Storage,
        worker_name: str,
        requeue: Requeue,
        handoff: Handoff | None = None,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pipeline = pipeline
        self.storage = storage
        self.worker_name = worker_name
        self.requeue = requeue
        self.handoff = handoff or Handoff()
        self.device = pipeline.describe_device()
        self.batch_limit: int | None = None
        """Largest batch that fits the device, learnt from out-of-memory errors."""
        self._first_draw: float | None = None
        self._gpu_seconds = 0.0
        self.services = Services(settings, engine, storage)
        """The ledger and the bucket behind circuit breakers: outages pause the worker."""
        self._storing = threading.Semaphore(1)
        """Held by the one batch being stored: the next batch draws meanwhile, the one after
        waits, so an outage or a crash costs at most two batches."""

    def busy(self) -> bool:
        """True while images are still being stored in the background."""
        return self.handoff.pending > 0

    def interrupt(self) -> None:
        """The process is stopping: work waiting out an outage is handed back instead."""
        self.services.interrupt()

    def close(self) -> None:
        """Finish storing every drawn image (on shutdown, so no lease is left to expire);
        images still waiting for an outage to end are handed back to the ledger."""
        self.interrupt()
        self.handoff.close()

    def handle(self, payload: RenderPayload) -> Outcome:
        outcome = Outcome()
        if payload.model != self.pipeline.model:
            outcome.refused = (
                f"message for model {payload.model!r} reached a worker of {self.pipeline.model!r}"
            )
            log.warning("refusing a message for run %s: %s", payload.run_id, outcome.refused)
            return outcome
        # 1. claim: one compare-and-set UPDATE of the message's run's items, if that run is
        # drawn with our model; render only what we won, with what the ledger says
        # (while the ledger or storage is down the message waits here: no new work is taken,
        # and the message stays unacknowledged until it can be claimed)
        while True:
            self.services.wait()
            try:
                result = ledger.claim(
                    self.engine,
                    payload.run_id,
                    self.pipeline.model,
                    payload.item_ids,
                    self.worker_name,
                    self.device,
                    self.settings.lease_seconds,
                )
                break
            except LedgerUnavailable as exc:
                self.services.ledger_breaker.trip(exc)
        if result.refused is not None:
            outcome.refused = result.refused
            log.warning(
                "refusing a message for run %s on a worker of model %r: %s",
                payload.run_id,
                self.pipeline.model,
                result.refused,
            )
            return outcome
        claims = result.claims
        outcome.claimed = len(claims)
        if not claims:
            log.info(
                "nothing to do for %d items of run %s (done, taken or cancelled)",
                len(payload.item_ids),
                result.run_name,
            )
            return outcome
        run = claims[0].run_name

        # 2. draw the batch; the items of one message share their parameters
        jobs = [Job(c.prompt, c.negative_prompt, c.seed) for c in claims]
        started = time.perf_counter()
        try:
            batch = self._draw(jobs, claims[0].params)
        except FatalError as exc:
            metrics.FAILED_BATCHES.inc()
            self._release(payload, claims, exc)
            outcome.fatal = exc
            return outcome
        except Exception as exc:  # any error of the model is recorded on its items
            metrics.FAILED_BATCHES.inc()
            log.exception("drawing %d items failed", len(claims))
            # a batch that failed as a whole is retried one item per message, so that a
            # single bad item cannot keep failing the others
            self._fail(
                payload,
                claims,
                exc,
                retry=not isinstance(exc, ItemError),
                one_per_message=len(claims) > 1,
            )
            return outcome
        outcome.drawn = len(claims)
        self._account(started, batch)
        # at most one batch is stored while the next draws: wait for the previous one
        self.services.hold(claims)
        while not self._storing.acquire(timeout=1.0):
            if self.services.stopping:
                self._release(payload, claims, Stopping("the worker is stopping"))
                for claim in claims:
                    self.services.unhold(claim)
                return outcome

        # 3. encode, upload and record each image in the background
        report = BatchLog(
            run,
            len(claims),
            batch.seconds,
            self.gpu_busy,
            remaining=len(claims),
            on_done=self._storing.release,
        )
        seconds_per_item = (time.perf_counter() - started) / len(claims)
        for claim, pixels, flagged in zip(claims, batch.images, batch.flagged, strict=True):
            self.handoff.submit(
                functools.partial(
                    self._store, payload, claim, pixels, flagged, seconds_per_item, report
                )
            )
        return outcome

    @property
    def gpu_busy(self) -> float:
        """Fraction of the time since the first batch that the device spent drawing."""
        if self._first_draw is None:
            return 0.0
        return min(1.0, self._gpu_seconds / max(1e-9, time.perf_counter() - self._first_draw))

    def _account(self, started: float, batch: Batch) -> None:
        if self._first_draw is None:
            self._first_draw = started
        self._gpu_seconds += sum(batch.seconds.values())
        device = getattr(self.pipeline, "device", None)
        metrics.observe_batch(
            len(batch.images),
            batch.seconds,
            self.gpu_busy,
            device if isinstance(device, torch.device) else torch.device("cpu"),
        )

    def _draw(self, jobs: Sequence[Job], params: GenerationParams) -> Batch:
        """Draw in batches the device can hold; halve on out-of-memory and remember it."""
        limit = self.batch_limit
        if limit is not None and len(jobs) > limit:
            return Batch.concat(
                [self._draw(jobs[i : i + limit], params) for i in range(0, len(jobs), limit)]
            )
        try:
            return self.pipeline.render(jobs, params)
        except torch.cuda.OutOfMemoryError as exc:
            self.pipeline.free_memory()
            if len(jobs) == 1:
                raise DeviceError(
                    f"out of memory on {self.device} for a single {params.width}×"
                    f"{params.height} image: {exc}"
                ) from exc
            self.batch_limit = max(1, len(jobs) // 2)
            log.warning(
                "out of memory on %s for a batch of %d; drawing %d at a time from now on",
                self.device,
                len(jobs),
                self.batch_limit,
            )
            return self._draw(jobs, params)
        except RuntimeError as exc:
            if any(marker in str(exc) for marker in _DEVICE_FAILURES):
                raise DeviceError(f"{self.device} failed: {exc}") from exc
            raise

    def _store(
        self,
        payload: RenderPayload,
        claim: ledger.Claim,
        pixels: np.ndarray,
        flagged: bool,
        seconds: float,
        report: BatchLog,
    ) -> None:
        """Background: post-process, upload and record one image (or record why not)."""
        encode = upload = 0.0
        try:
            if flagged:
                self.services.in_ledger(
                    lambda: ledger.flag(
                        self.engine, claim, "flagged by the safety checker; not uploaded"
                    )
                )
                log.warning(
                    "item %s (%s/%s) was flagged by the safety checker",
                    claim.id,
                    claim.sku,
                    claim.shot,
                )
                return
            spec = OutputSpec.from_json(claim.output)
            started = time.perf_counter()
            encoded = process(Image.fromarray(pixels), spec, self._metadata(claim))
            digest = hashlib.sha256(encoded.body).hexdigest()
            encode = time.perf_counter() - started
            key = claim.object_key  # fixed at enqueue: the item's one place in the bucket
            if key is None or key.rpartition(".")[2] != encoded.extension:
                raise ItemError(
                    f"item {claim.id}'s object key {key!r} does not end in "
                    f".{encoded.extension}, the format of its image"
                )
            # the item must still be ours before its object is written: a worker that lost
            # it (its lease expired and another attempt took over) or that cannot reach the
            # ledger never uploads
            lease = self.settings.lease_seconds
            if not self.services.in_ledger(lambda: ledger.renew(self.engine, claim, lease)):
                log.warning(
                    "item %s is no longer ours (attempt %s is stale); not uploaded",
                    claim.id,
                    claim.attempt,
                )
                return
            uploaded = self.services.upload(
                claim,
                key,
                encoded.body,
                digest=digest,
                content_type=encoded.content_type,
                metadata=self._object_metadata(claim),
            )
            if not uploaded:
                log.warning(
                    "item %s was taken over while storage was down (attempt %s is stale); "
                    "not uploaded",
                    claim.id,
                    claim.attempt,
                )
                return
            upload = time.perf_counter() - started - encode
            finished = self.services.in_ledger(
                lambda: ledger.finish(self.engine, claim, len(encoded.body), digest, seconds)
            )
            if not finished:
                log.warning(
                    "item %s was taken over (attempt %s is stale); result discarded",
                    claim.id,
                    claim.attempt,
                )
        except Stopping as exc:
            self._release(payload, [claim], exc)
        except ItemError as exc:
            self._fail(payload, [claim], exc, retry=False, one_per_message=True)
        except Exception as exc:  # storage, ledger or an unexpected error: retry the item
            if not isinstance(exc, RetryableError):
                log.exception("storing item %s failed", claim.id)
            self._fail(payload, [claim], exc, retry=True, one_per_message=True)
        finally:
            self.services.unhold(claim)
            report.add(encode, upload)

    def _object_metadata(self, claim: ledger.Claim) -> dict[str, str]:
        """S3 user metadata, which is ASCII: SKU, shot and model are percent-encoded."""
        return {
            "sku": quote(claim.sku, safe=""),
            "shot": quote(claim.shot, safe=""),
            "seed": str(claim.seed),
            "model": quote(self.pipeline.model, safe="/"),
            "prompt-sha256": hashlib.sha256(claim.prompt.encode()).hexdigest(),
        }

    def _metadata(self, claim: ledger.Claim) -> dict[str, str]:
        return {
            "prompt": claim.prompt,
            "negative_prompt": claim.negative_prompt,
            "seed": str(claim.seed),
            "steps": str(claim.params.steps),
            "guidance_scale": str(claim.params.guidance_scale),
            "scheduler": claim.params.scheduler,
            "model": self.pipeline.model,
            "sku": claim.sku,
        }

    def _fail(
        self,
        payload: RenderPayload,
        claims: Sequence[ledger.Claim],
        exc: BaseException,
        *,
        retry: bool,
        one_per_message: bool,
    ) -> None:
        """Record ``exc`` on each item; republish those that may retry, after a backoff."""
        retried: list[ledger.Claim] = []
        for claim in claims:
            try:
                status = ledger.fail(
                    self.engine,
                    claim,
                    describe_error(exc),
                    retry=retry,
                    max_attempts=self.settings.max_attempts,
                )
            except SkufleetError:
                log.exception(
                    "cannot record the failure of item %s; its lease will expire", claim.id
                )
                continue
            if status is ItemStatus.QUEUED:
                retried.append(claim)
            elif status is ItemStatus.FAILED:
                log.error(
                    "item %s failed for good after %d attempts: %s",
                    claim.id,
                    claim.attempt,
                    describe_error(exc),
                )
        if not retried:
            return
        delay = backoff(self.settings.retry_backoff_seconds, max(c.attempt for c in retried))
        groups = [[c.id] for c in retried] if one_per_message else [[c.id for c in retried]]
        for ids in groups:
            self.requeue(payload.model_copy(update={"item_ids": ids}), delay)
        log.info("retrying %d items in %d messages in %.1fs", len(retried), len(groups), delay)

    def _release(
        self,
        payload: RenderPayload,
        claims: Sequence[ledger.Claim],
        exc: FatalError | Stopping,
    ) -> None:
        """Hand the items back to the fleet at once, without counting this attempt (the
        device failed, or the worker stops during an outage: not the items' fault)."""
        released = []
        for claim in claims:
            try:
                reason = "device failure" if isinstance(exc, FatalError) else "handed back"
                if ledger.release(self.engine, claim, f"{reason}: {describe_error(exc)}"):
                    released.append(claim.id)
            except SkufleetError:
                log.exception("cannot release item %s; its lease will expire", claim.id)
        if released:
            self.requeue(payload.model_copy(update={"item_ids": released}), 0.0)
