"""One render message, start to finish: claim, draw, encode, upload, record.

Plain Python with no Celery in it: the task in ``worker.tasks`` decodes the message, calls
:meth:`Renderer.handle` and turns its outcome into a retry or nothing.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import quote

from PIL import Image
from sqlalchemy.engine import Engine

from schemas import ledger
from schemas.errors import FatalError, ItemError, RetryableError, SkufleetError
from schemas.key import object_key
from schemas.params import RenderPayload
from schemas.settings import Settings
from schemas.tables import ItemStatus
from worker.pipeline import ImageModel, Job
from worker.postprocess import encode_png
from worker.storage import Storage

log = logging.getLogger(__name__)


@dataclass
class Outcome:
    """What became of a message's items."""

    claimed: int = 0
    succeeded: list[int] = field(default_factory=list)
    retry: list[int] = field(default_factory=list)
    """Items put back to queued; the task republishes them after a backoff."""
    failed: list[int] = field(default_factory=list)
    fenced: list[int] = field(default_factory=list)
    """Items another attempt took over while we worked; our result was discarded."""
    attempt: int = 0
    """Highest attempt number among the items, for the retry backoff."""
    split: bool = False
    """The batch failed as a whole: retry its items one per message, so that one bad item
    cannot keep failing the others."""
    fatal: FatalError | None = None
    """Set when the device cannot go on; the items were put back for other workers."""


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class Renderer:
    """Renders the items of one message with the process's pinned pipeline."""

    def __init__(
        self,
        settings: Settings,
        engine: Engine,
        pipeline: ImageModel,
        storage: Storage,
        worker_name: str,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.pipeline = pipeline
        self.storage = storage
        self.worker_name = worker_name
        self.device = pipeline.describe_device()

    def handle(self, payload: RenderPayload) -> Outcome:
        outcome = Outcome()
        if payload.model != self.pipeline.model:
            raise ItemError(
                f"message for model {payload.model!r} reached a worker of {self.pipeline.model!r}"
            )
        # 1. claim: one compare-and-set UPDATE; render only what we won
        run = ledger.run_name(self.engine, payload.run_id)
        if run is None:
            log.warning(
                "run %s no longer exists; dropping %d items", payload.run_id, len(payload.item_ids)
            )
            return outcome
        claims = ledger.claim(
            self.engine,
            payload.item_ids,
            self.worker_name,
            self.device,
            self.settings.lease_seconds,
        )
        outcome.claimed = len(claims)
        if not claims:
            log.info(
                "nothing to do for %d items of run %s (done or taken)", len(payload.item_ids), run
            )
            return outcome
        outcome.attempt = max(c.attempt for c in claims)

        # 2. draw the batch; the items of one message share their parameters
        started = time.perf_counter()
        try:
            images = self.pipeline.render(
                [Job(c.prompt, c.negative_prompt, c.seed) for c in claims], claims[0].params
            )
        except FatalError as exc:
            self._fail_all(claims, exc, outcome, retry=True)
            outcome.fatal = exc
            return outcome
        except Exception as exc:  # any error of the model is recorded on the items
            log.exception("render of %d items failed", len(claims))
            self._fail_all(claims, exc, outcome, retry=not isinstance(exc, ItemError))
            outcome.split = len(claims) > 1
            return outcome
        seconds_per_item = (time.perf_counter() - started) / len(claims)

        # 3. encode, upload, and record each image under the attempt fence
        for claim, image in zip(claims, images, strict=True):
            try:
                self._store(run, claim, image, seconds_per_item, outcome)
            except (RetryableError, ItemError) as exc:
                self._fail(claim, exc, outcome, retry=isinstance(exc, RetryableError))
        log.info(
            "run %s: %d succeeded, %d to retry, %d failed, %d fenced in %.2fs",
            run,
            len(outcome.succeeded),
            len(outcome.retry),
            len(outcome.failed),
            len(outcome.fenced),
            time.perf_counter() - started,
        )
        return outcome

    def _store(
        self,
        run: str,
        claim: ledger.Claim,
        image: Image.Image,
        seconds: float,
        outcome: Outcome,
    ) -> None:
        key = object_key(run, claim.sku, claim.shot, "png")
        prompt_hash = hashlib.sha256(claim.prompt.encode()).hexdigest()
        body = encode_png(
            image,
            {
                "prompt": claim.prompt,
                "negative_prompt": claim.negative_prompt,
                "seed": str(claim.seed),
                "steps": str(claim.params.steps),
                "guidance_scale": str(claim.params.guidance_scale),
                "model": self.pipeline.model,
                "sku": claim.sku,
            },
        )
        digest = hashlib.sha256(body).hexdigest()
        self.storage.put(
            key,
            body,
            sha256_hex=digest,
            content_type="image/png",
            metadata={
                # S3 metadata is ASCII: the SKU is percent-encoded.
                "sku": quote(claim.sku, safe=""),
                "shot": quote(claim.shot, safe=""),
                "seed": str(claim.seed),
                "model": quote(self.pipeline.model, safe="/"),
                "prompt-sha256": prompt_hash,
            },
        )
        if ledger.finish(self.engine, claim, key, len(body), digest, seconds):
            outcome.succeeded.append(claim.id)
        else:
            log.warning(
                "item %s was taken over (attempt %s is stale); result discarded",
                claim.id,
                claim.attempt,
            )
            outcome.fenced.append(claim.id)

    def _fail_all(
        self, claims: Sequence[ledger.Claim], exc: BaseException, outcome: Outcome, *, retry: bool
    ) -> None:
        for claim in claims:
            self._fail(claim, exc, outcome, retry=retry)

    def _fail(
        self, claim: ledger.Claim, exc: BaseException, outcome: Outcome, *, retry: bool
    ) -> None:
        try:
            status = ledger.fail(
                self.engine,
                claim,
                describe_error(exc),
                retry=retry,
                max_attempts=self.settings.max_attempts,
            )
        except SkufleetError:
            log.exception("cannot record the failure of item %s; its lease will expire", claim.id)
            return
        if status is ItemStatus.QUEUED:
            outcome.retry.append(claim.id)
        elif status is ItemStatus.FAILED:
            log.error(
                "item %s failed for good after %d attempts: %s",
                claim.id,
                claim.attempt,
                describe_error(exc),
            )
            outcome.failed.append(claim.id)
        else:
            outcome.fenced.append(claim.id)
