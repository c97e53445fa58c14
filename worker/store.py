"""Storing a drawn batch: encode each image, upload it, record it in the ledger.

The render task that drew a batch stores it itself, after it let go of the device, so that
the other task thread draws the next batch meanwhile (``worker.render``). A batch is
stored in four steps: its images encoded on a pool of threads shared by both task threads
(PNG encoding, hashing and uploads release the GIL), every item's lease renewed in one
statement (an item that is no longer ours is never uploaded), the uploads on the pool,
and every finish recorded in one statement: two ledger round trips per batch, whatever its
size. The task gets back what became of each item (:class:`Stored`). What an error means
for its item (retry, fail, hand back) is the renderer's to decide; storing only reports it.

Every call to the ledger or the bucket goes through :class:`~worker.outage.Services`, so a
storage or ledger outage pauses storing with the image kept in memory (its lease renewed)
instead of failing the item.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from typing import TypeVar
from urllib.parse import quote

from PIL import Image
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import ItemError, RetryableError, Stopping
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.settings import Settings
from skufleet.worker.gate import Kept, Rolled
from skufleet.worker.outage import Services
from skufleet.worker.postprocess import Encoded, process

log = logging.getLogger(__name__)

STORE_THREADS = max(4, os.cpu_count() or 1)
"""Images encoded or uploaded at once, across both task threads: at least one per core
(Pillow, ISA-L and hashlib release the GIL while they compress and hash), and at least
four, since uploads mostly wait on the network."""
T = TypeVar("T")


class Fate(StrEnum):
    """What became of one drawn image."""

    STORED = "stored"
    """Uploaded and recorded: the item succeeded."""
    FLAGGED = "flagged"
    """The safety checker refused it: the item failed for good, nothing uploaded."""
    TAKEN_OVER = "taken over"
    """The item is no longer ours (its lease expired and another attempt took it): nothing
    uploaded or recorded."""
    ERROR = "error"
    """Storing failed with ``error``; the renderer records it on the item."""
    STOPPED = "stopped"
    """The worker stops while storage or the ledger is down: the item is to be handed back."""


@dataclass
class _Encoded:
    """One image encoded for its object, waiting for its upload and finish."""

    encoded: Encoded
    digest: str
    key: str
    seed: int
    kept: Kept
    encode: float
    upload: float = 0.0

    def finished(self, claim: ledger.Claim, seconds: float) -> ledger.Finished:
        image = self.encoded
        return ledger.Finished(
            claim,
            len(image.body),
            self.digest,
            seconds,
            image.width,
            image.height,
            image.format,
            self.kept.gated,
        )


@dataclass(frozen=True)
class Stored:
    claim: ledger.Claim
    fate: Fate
    error: BaseException | None = None
    retry: bool = False
    """For ERROR: whether the item may be drawn again (everything but an ItemError)."""
    encode: float = 0.0
    upload: float = 0.0


class Store:
    """Post-processes, uploads and records the images of drawn batches."""

    def __init__(self, settings: Settings, engine: Engine, services: Services, model: str):
        self.settings = settings
        self.engine = engine
        self.services = services
        self.model = model
        self._pool = ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="store")

    def batch(
        self, claims: Sequence[ledger.Claim], rolled: Rolled, seconds_per_item: float, busy: float
    ) -> list[Stored]:
        """Store the image each claim kept (``rolled.kept``, in order); returns when all are
        done, with what became of each. ``busy`` is the device's share of time drawing, for
        the batch's log line."""
        results = self._store(claims, rolled.kept, seconds_per_item)
        seconds: dict[str, float] = {}
        for drawn in rolled.batches:
            for stage, value in drawn.seconds.items():
                seconds[stage] = seconds.get(stage, 0.0) + value
        stages = ", ".join(f"{k} {v:.2f}s" for k, v in seconds.items() if v >= 0.005)
        review = sum(not kept.gated.image.passed for kept in rolled.kept)
        log.info(
            "run %s: %d items, %d images drawn in %.2fs (%s; %d re-rolled, checks %.2fs, %d "
            "to review); encoded %.2fs, uploaded %.2fs while the next batch drew; GPU busy "
            "%.0f%% since the first batch",
            claims[0].run_name,
            len(claims),
            rolled.renders,
            sum(seconds.values()),
            stages,
            rolled.rerolls,
            rolled.check_seconds,
            review,
            sum(r.encode for r in results),
            sum(r.upload for r in results),
            100 * busy,
        )
        return results

    def close(self) -> None:
        """Stop the threads once what they hold is stored."""
        self._pool.shutdown(wait=True)

    def _store(
        self, claims: Sequence[ledger.Claim], kept: Sequence[Kept], seconds: float
    ) -> list[Stored]:
        """Encode every image on the pool; renew every item's lease in one statement (an
        item no longer ours is never uploaded); upload on the pool; record every finish in
        one statement. Two ledger round trips per batch, whatever its size."""
        fates: dict[int, Stored] = {}
        encoded = {}
        for claim, result in zip(claims, self._pool.map(self._encode, claims, kept), strict=True):
            if isinstance(result, Stored):
                fates[claim.id] = result
            else:
                encoded[claim.id] = result
        ready = [c for c in claims if c.id in encoded]
        lease = self.settings.lease_seconds
        ours = self._in_ledger(ready, fates, lambda: ledger.renew_many(self.engine, ready, lease))
        for claim in ready:
            if ours is not None and claim.id not in ours:
                log.warning(
                    "item %s is no longer ours (attempt %s is stale); not uploaded",
                    claim.id,
                    claim.attempt,
                )
                fates[claim.id] = Stored(claim, Fate.TAKEN_OVER, encode=encoded[claim.id].encode)
        held = [c for c in ready if c.id not in fates]
        stored = []
        uploads = self._pool.map(lambda c: self._upload(c, encoded[c.id]), held)
        for claim, fate in zip(held, uploads, strict=True):
            if fate is None:
                stored.append(claim)
            else:
                fates[claim.id] = fate
        finished = [encoded[c.id].finished(c, seconds) for c in stored]
        done = self._in_ledger(stored, fates, lambda: ledger.finish_many(self.engine, finished))
        for claim in stored:
            image = encoded[claim.id]
            if done is None:
                continue  # its fate is set: handed back or retried
            outcome = Fate.STORED if claim.id in done else Fate.TAKEN_OVER
            if outcome is Fate.TAKEN_OVER:
                log.warning(
                    "item %s was taken over (attempt %s is stale); result discarded",
                    claim.id,
                    claim.attempt,
                )
            fates[claim.id] = Stored(claim, outcome, encode=image.encode, upload=image.upload)
        return [fates[c.id] for c in claims]

    def _in_ledger(
        self, claims: Sequence[ledger.Claim], fates: dict[int, Stored], write: Callable[[], T]
    ) -> T | None:
        """``write`` through outages; None, with each claim's fate set, when it cannot be."""
        if not claims:
            return None
        try:
            return self.services.in_ledger(write)
        except Stopping as exc:
            fates.update({c.id: Stored(c, Fate.STOPPED, exc) for c in claims})
        except Exception as exc:  # an unexpected error of the ledger: retry the items
            log.exception("recording %d items in the ledger failed", len(claims))
            fates.update({c.id: Stored(c, Fate.ERROR, exc, retry=True) for c in claims})
        return None

    def _encode(self, claim: ledger.Claim, kept: Kept) -> _Encoded | Stored:
        """Post-process one kept image into its object's bytes, or say why not (flagged:
        recorded as such, never uploaded)."""
        seed = kept.gated.image.seed
        try:
            if kept.flagged:
                recorded = self.services.in_ledger(
                    lambda: ledger.flag(
                        self.engine, claim, "flagged by the safety checker; not uploaded"
                    )
                )
                if not recorded:
                    return Stored(claim, Fate.TAKEN_OVER)
                log.warning(
                    "item %s (%s/%s) was flagged by the safety checker",
                    claim.id,
                    claim.sku,
                    claim.shot,
                )
                return Stored(claim, Fate.FLAGGED)
            spec = OutputSpec.from_json(claim.output)
            started = time.perf_counter()
            image = process(
                Image.fromarray(kept.pixels),
                spec,
                self._metadata(claim, seed),
                self.settings.label_font,
            )
            digest = hashlib.sha256(image.body).hexdigest()
            key = claim.object_key  # fixed at enqueue: the item's one place in the bucket
            if key is None or key.rpartition(".")[2] != image.extension:
                raise ItemError(
                    f"item {claim.id}'s object key {key!r} does not end in "
                    f".{image.extension}, the format of its image"
                )
            return _Encoded(image, digest, key, seed, kept, time.perf_counter() - started)
        except Stopping as exc:
            return Stored(claim, Fate.STOPPED, exc)
        except ItemError as exc:
            return Stored(claim, Fate.ERROR, exc, retry=False)
        except Exception as exc:  # an unexpected error: retry the item
            log.exception("encoding item %s failed", claim.id)
            return Stored(claim, Fate.ERROR, exc, retry=True)

    def _upload(self, claim: ledger.Claim, image: _Encoded) -> Stored | None:
        """Upload one encoded image (through storage outages); None once it is stored in
        the bucket, else what became of its item."""
        started = time.perf_counter()
        try:
            uploaded = self.services.upload(
                claim,
                image.key,
                image.encoded.body,
                digest=image.digest,
                content_type=image.encoded.content_type,
                metadata=self._object_metadata(claim, image.seed),
            )
        except Stopping as exc:
            return Stored(claim, Fate.STOPPED, exc, encode=image.encode)
        except Exception as exc:  # storage, or an unexpected error: retry the item
            if not isinstance(exc, RetryableError):
                log.exception("storing item %s failed", claim.id)
            return Stored(claim, Fate.ERROR, exc, retry=True, encode=image.encode)
        if not uploaded:
            log.warning(
                "item %s was taken over while storage was down (attempt %s is stale); not uploaded",
                claim.id,
                claim.attempt,
            )
            return Stored(claim, Fate.TAKEN_OVER, encode=image.encode)
        image.upload = time.perf_counter() - started
        return None

    def _object_metadata(self, claim: ledger.Claim, seed: int) -> dict[str, str]:
        """S3 user metadata, which is ASCII: SKU, shot and model are percent-encoded."""
        return {
            "sku": quote(claim.sku, safe=""),
            "shot": quote(claim.shot, safe=""),
            "seed": str(seed),
            "model": quote(self.model, safe="/"),
            "prompt-sha256": hashlib.sha256(claim.prompt.encode()).hexdigest(),
        }

    def _metadata(self, claim: ledger.Claim, seed: int) -> dict[str, str]:
        return {
            "prompt": claim.prompt,
            "negative_prompt": claim.negative_prompt,
            "seed": str(seed),
            "steps": str(claim.params.steps),
            "guidance_scale": str(claim.params.guidance_scale),
            "scheduler": claim.params.scheduler,
            "model": self.model,
            "sku": claim.sku,
        }
