"""Storing a drawn batch: encode each image, upload it, record it in the ledger.

The render task that drew a batch stores it itself, after it let go of the device, so that
the other task thread draws the next batch meanwhile (``worker.render``). The images of a
batch are stored on a small pool of threads shared by both task threads (PNG encoding and
uploads release the GIL); the task waits for all of its images and gets back what became
of each (:class:`Stored`). What an error means for its item (retry, fail, hand back) is the
renderer's to decide; storing only reports it.

Every call to the ledger or the bucket goes through :class:`~worker.outage.Services`, so a
storage or ledger outage pauses storing with the image kept in memory (its lease renewed)
instead of failing the item.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from enum import StrEnum
from urllib.parse import quote

import numpy as np
from PIL import Image
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import ItemError, RetryableError, Stopping
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.settings import Settings
from skufleet.worker.gate import Kept, Rolled
from skufleet.worker.outage import Services
from skufleet.worker.postprocess import process

log = logging.getLogger(__name__)

STORE_THREADS = 4
"""Images stored at once, across both task threads."""


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
        futures = [
            self._pool.submit(self._one, claim, kept, seconds_per_item)
            for claim, kept in zip(claims, rolled.kept, strict=True)
        ]
        results = [future.result() for future in futures]
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

    def _one(self, claim: ledger.Claim, kept: Kept, seconds: float) -> Stored:
        """Post-process, upload and record the image one item kept, or say why not."""
        encode = 0.0
        pixels: np.ndarray = kept.pixels
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
            encoded = process(
                Image.fromarray(pixels), spec, self._metadata(claim, seed), self.settings.label_font
            )
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
                return Stored(claim, Fate.TAKEN_OVER, encode=encode)
            uploaded = self.services.upload(
                claim,
                key,
                encoded.body,
                digest=digest,
                content_type=encoded.content_type,
                metadata=self._object_metadata(claim, seed),
            )
            if not uploaded:
                log.warning(
                    "item %s was taken over while storage was down (attempt %s is stale); "
                    "not uploaded",
                    claim.id,
                    claim.attempt,
                )
                return Stored(claim, Fate.TAKEN_OVER, encode=encode)
            upload = time.perf_counter() - started - encode
            finished = self.services.in_ledger(
                lambda: ledger.finish(
                    self.engine,
                    claim,
                    len(encoded.body),
                    digest,
                    seconds,
                    width=encoded.width,
                    height=encoded.height,
                    image_format=encoded.format,
                    gated=kept.gated,
                )
            )
            if not finished:
                log.warning(
                    "item %s was taken over (attempt %s is stale); result discarded",
                    claim.id,
                    claim.attempt,
                )
                return Stored(claim, Fate.TAKEN_OVER, encode=encode, upload=upload)
            return Stored(claim, Fate.STORED, encode=encode, upload=upload)
        except Stopping as exc:
            return Stored(claim, Fate.STOPPED, exc, encode=encode)
        except ItemError as exc:
            return Stored(claim, Fate.ERROR, exc, retry=False, encode=encode)
        except Exception as exc:  # storage, ledger or an unexpected error: retry the item
            if not isinstance(exc, RetryableError):
                log.exception("storing item %s failed", claim.id)
            return Stored(claim, Fate.ERROR, exc, retry=True, encode=encode)

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
