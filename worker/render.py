"""One render message, start to finish: claim, draw, store, and what became of each item.

Plain Python with no Celery in it: the task in ``worker.tasks`` decodes the message, calls
:meth:`Renderer.handle`, and turns the :class:`Outcome` into the task's final state; retries
go back to the queue through the ``requeue`` callable the task module provides.

Two task threads share one device, and the device is a lock. A task takes the device, then
claims its items (the claim starts their leases, so it waits until the device is its own),
draws, and lets go of the device; then it stores its batch (``worker.store``) while the other
task takes the device and draws the next one. So one batch is stored while the next draws,
and at most two batches are in memory (one drawing, one storing): a crash or an outage costs
at most two batches. One exception: an item on a second or later attempt (it may be what
killed a worker before) draws only once no other batch is being stored, so a poison item
that kills its worker costs no one else an attempt. A task returns only once every item it
claimed is stored or settled, so its final state covers its whole batch, storing included
(:meth:`Outcome.problem`).

A run's completion (its manifest and webhook) is not the worker's: the reconciler
(``skufleet reconcile --watch``) completes every finished run on its next pass.
"""

from __future__ import annotations

import contextlib
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import torch
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import (
    DeviceError,
    FatalError,
    ItemError,
    LedgerUnavailable,
    SkufleetError,
    Stopping,
)
from skufleet.schemas.label import label, retry_note
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.schemas.tables import ItemStatus
from skufleet.worker import metrics
from skufleet.worker.clip import ClipScorer
from skufleet.worker.gate import RunGates, Want
from skufleet.worker.outage import Services
from skufleet.worker.outcome import Outcome, describe_error
from skufleet.worker.pipeline import Batch, ImageModel, Job
from skufleet.worker.storage import Storage
from skufleet.worker.store import Fate, Store, Stored

log = logging.getLogger(__name__)

Requeue = Callable[[RenderPayload, float, str], None]
"""Publish ``payload`` again after ``countdown`` seconds, showing ``label`` in Flower."""

TASK_THREADS = 2
"""Task threads per device (the Celery pool's concurrency): one draws while one stores."""
MAX_BACKOFF_SECONDS = 600.0
_DEVICE_FAILURES = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert")


def backoff(base: float, attempt: int) -> float:
    """Seconds before retry ``attempt + 1``: doubling from ``base``, capped, ±20% jitter."""
    delay = min(MAX_BACKOFF_SECONDS, base * 2 ** max(0, attempt - 1))
    return delay * random.uniform(0.8, 1.2)


class Renderer:
    """Renders the items of one message with the process's pinned pipeline; two task
    threads call :meth:`handle` at once (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pipeline: ImageModel,
        storage: Storage,
        worker_name: str,
        requeue: Requeue,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pipeline = pipeline
        self.storage = storage
        self.worker_name = worker_name
        self.requeue = requeue
        self.device = pipeline.describe_device()
        self.batch_limit: int | None = None
        """Largest batch that fits the device, learnt from out-of-memory errors."""
        self.fatal: FatalError | None = None
        """Set once the device failed: no task draws on it again."""
        self._first_draw: float | None = None
        self._gpu_seconds = 0.0
        self.services = Services(settings, engine, storage)
        """The ledger and the bucket behind circuit breakers: outages pause the worker."""
        self.store = Store(settings, engine, self.services, pipeline.model)
        self._device = threading.Lock()
        """Held by the one task that claims and draws; storing happens outside it."""
        self._storing = 0
        """Batches being stored now (at most one while another draws)."""
        self._stores = threading.Condition()
        self._in_hand = 0
        self._in_hand_lock = threading.Lock()
        clip = None
        if settings.quality_clip:  # CLIP for the gate's clip check, on the pipeline's device
            device = getattr(pipeline, "device", None)
            clip = ClipScorer(
                settings.quality_clip,
                device if isinstance(device, torch.device) else torch.device("cpu"),
                settings.cache_dir,
            )
        self.gates = RunGates(engine, clip)
        """Each run's quality gate, with its stored images' hashes for the duplicate check."""

    def busy(self) -> bool:
        """True while a message is being rendered or its batch stored."""
        return self._in_hand > 0

    def interrupt(self) -> None:
        """The process is stopping: work waiting out an outage is handed back instead, and
        a task that has not claimed yet gives its message back."""
        self.services.interrupt()

    def close(self) -> None:
        """On shutdown, once the tasks have returned: stop the storing threads."""
        self.interrupt()
        self.store.close()

    def handle(self, payload: RenderPayload) -> Outcome:
        with self._in_hand_lock:
            self._in_hand += 1
        try:
            return self._handle(payload)
        finally:
            with self._in_hand_lock:
                self._in_hand -= 1

    def _handle(self, payload: RenderPayload) -> Outcome:
        outcome = Outcome()
        if payload.model != self.pipeline.model:
            outcome.refused = (
                f"message for model {payload.model!r} reached a worker of {self.pipeline.model!r}"
            )
            log.warning("refusing a message for run %s: %s", payload.run_id, outcome.refused)
            return outcome
        with self._device_turn():
            # 1. claim: one compare-and-set UPDATE of the message's run's items, if that run is
            # drawn with our model; render only what we won, with what the ledger says
            result = self._claim(payload)
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

            if not self._isolate(claims):
                outcome.released = self._release(payload, claims, Stopping("stopping"))
                return outcome

            # 2. draw the batch through the run's quality gate (candidates, checks, re-rolls);
            # the items of one message share their parameters
            started = time.perf_counter()
            try:
                roller = self.gates.roller(result)
                params = claims[0].params
                wants = [
                    Want(c.sku, c.prompt, c.negative_prompt, c.seed, c.next_roll) for c in claims
                ]
                rolled = roller.draw(wants, lambda jobs: self._draw(jobs, params))
            except FatalError as exc:
                metrics.FAILED_BATCHES.inc()
                self.fatal = outcome.fatal = exc
                outcome.released = self._release(payload, claims, exc)
                return outcome
            except Exception as exc:  # any error of the model is recorded on its items
                metrics.FAILED_BATCHES.inc()
                log.exception("drawing %d items failed", len(claims))
                # a batch that failed as a whole is retried one item per message, so that a
                # single bad item cannot keep failing the others
                self._fail(
                    outcome,
                    payload,
                    claims,
                    exc,
                    retry=not isinstance(exc, ItemError),
                    one_per_message=len(claims) > 1,
                )
                return outcome
            outcome.drawn = len(claims)
            for batch in rolled.batches:
                self._account(started, batch)
            passed = sum(kept.gated.image.passed for kept in rolled.kept)
            metrics.observe_gate(rolled.rerolls, passed, len(claims) - passed, rolled.check_seconds)
            self.services.hold(claims)  # their leases are kept until they are stored
            with self._stores:
                self._storing += 1  # before the device is free: a retry waits for this batch
        seconds_per_item = (time.perf_counter() - started) / len(claims)

        # 3. store: encode, upload and record each image, while the other task draws
        try:
            stored = self.store.batch(claims, rolled, seconds_per_item, self.gpu_busy)
            # 4. settle what could not be stored
            self._settle(payload, stored, outcome)
        finally:
            with self._stores:
                self._storing -= 1
                self._stores.notify_all()
            for claim in claims:
                self.services.unhold(claim)
        return outcome

    def _isolate(self, claims: Sequence[ledger.Claim]) -> bool:
        """A retried item may be what killed a worker before: before it draws, wait (holding
        the device, the claims' leases kept) until no batch of this worker is being stored,
        so that if it kills the process it costs only itself. False if the process stops
        first; True at once for a batch of first attempts."""
        if all(c.attempt - c.attempts_before_retry <= 1 for c in claims):
            return True
        self.services.hold(claims)
        try:
            with self._stores:
                while self._storing:
                    if self.services.stopping:
                        return False
                    self._stores.wait(1.0)
            return True
        finally:
            for claim in claims:  # not renewed while drawing: a hung device loses its lease
                self.services.unhold(claim)

    @contextlib.contextmanager
    def _device_turn(self) -> Iterator[None]:
        """Hold the device for a claim and a draw. Raises Stopping, before anything is
        claimed, when the process stops or the device leaves the rotation meanwhile."""
        while not self._device.acquire(timeout=1.0):
            if self.services.stopping:
                raise Stopping("the worker is stopping")
        try:
            if self.fatal is not None:
                raise Stopping(f"{self.device} is out of rotation: {self.fatal}")
            if self.services.stopping:
                raise Stopping("the worker is stopping")
            yield
        finally:
            self._device.release()

    def _claim(self, payload: RenderPayload) -> ledger.ClaimResult:
        """Claim the message's items; while the ledger or storage is down the message waits
        here (no new work is taken, and it stays unacknowledged until it can be claimed)."""
        while True:
            self.services.wait()
            try:
                return ledger.claim(
                    self.engine,
                    payload.run_id,
                    self.pipeline.model,
                    payload.item_ids,
                    self.worker_name,
                    self.device,
                    self.settings.lease_seconds,
                )
            except LedgerUnavailable as exc:
                self.services.ledger_breaker.trip(exc)

    def _settle(self, payload: RenderPayload, stored: Sequence[Stored], outcome: Outcome) -> None:
        """Count what was stored; record each error on its item and hand back what the
        worker could not store because it stops."""
        stopped = [s.claim for s in stored if s.fate is Fate.STOPPED]
        for result in stored:
            if result.fate is Fate.STORED:
                outcome.stored += 1
            elif result.fate is Fate.FLAGGED:
                outcome.failed.append((result.claim, "flagged by the safety checker"))
            elif result.fate is Fate.TAKEN_OVER:
                outcome.taken_over.append(result.claim)
            elif result.fate is Fate.ERROR and result.error is not None:
                self._fail(
                    outcome,
                    payload,
                    [result.claim],
                    result.error,
                    retry=result.retry,
                    one_per_message=True,
                )
        if stopped:
            why = next(s.error for s in stored if s.fate is Fate.STOPPED)
            outcome.released += self._release(payload, stopped, why or Stopping("stopping"))

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

    def _label(self, claims: Sequence[ledger.Claim], note: str) -> str:
        return label(claims[0].run_name, [(c.sku, c.shot) for c in claims], note)

    def _fail(
        self,
        outcome: Outcome,
        payload: RenderPayload,
        claims: Sequence[ledger.Claim],
        exc: BaseException,
        *,
        retry: bool,
        one_per_message: bool,
    ) -> None:
        """Record ``exc`` on each item (and in ``outcome``); republish those that may retry,
        after a backoff, in messages labelled with the attempt they will be."""
        reason = describe_error(exc)
        retried: list[ledger.Claim] = []
        for claim in claims:
            try:
                status = ledger.fail(
                    self.engine, claim, reason, retry=retry, max_attempts=self.settings.max_attempts
                )
            except SkufleetError:
                log.exception(
                    "cannot record the failure of item %s; its lease will expire", claim.id
                )
                outcome.failed.append((claim, f"{reason} (not recorded: the ledger failed)"))
                continue
            if status is ItemStatus.QUEUED:
                retried.append(claim)
                outcome.retried.append((claim, reason))
            elif status is ItemStatus.FAILED:
                outcome.failed.append((claim, reason))
                log.error(
                    "item %s failed for good after %d attempts: %s", claim.id, claim.attempt, reason
                )
            else:
                outcome.taken_over.append(claim)
        if not retried:
            return
        delay = backoff(self.settings.retry_backoff_seconds, max(c.attempt for c in retried))
        groups = [[c] for c in retried] if one_per_message else [retried]
        for group in groups:
            attempt = max(c.attempt - c.attempts_before_retry for c in group) + 1
            note = retry_note(attempt, self.settings.max_attempts)
            ids = [c.id for c in group]
            self.requeue(
                payload.model_copy(update={"item_ids": ids}), delay, self._label(group, note)
            )
        log.info("retrying %d items in %d messages in %.1fs", len(retried), len(groups), delay)

    def _release(
        self,
        payload: RenderPayload,
        claims: Sequence[ledger.Claim],
        exc: BaseException,
    ) -> list[ledger.Claim]:
        """Hand the items back to the fleet at once, without counting this attempt (the
        device failed, or the worker stops during an outage: not the items' fault); returns
        those handed back, republished in one message."""
        released = []
        reason = "device failure" if isinstance(exc, FatalError) else "handed back"
        for claim in claims:
            try:
                if ledger.release(self.engine, claim, f"{reason}: {describe_error(exc)}"):
                    released.append(claim)
            except SkufleetError:
                log.exception("cannot release item %s; its lease will expire", claim.id)
        if released:
            ids = [c.id for c in released]
            self.requeue(
                payload.model_copy(update={"item_ids": ids}), 0.0, self._label(released, reason)
            )
        return released
