"""The quality gate: checks every drawn image before it is stored.

Each check is a plain function of the image (and, for duplicates and prompt alignment, of
what it is compared with) that returns a :class:`Verdict`: a score, the threshold it was held
to, and whether it passed. The renderer runs the run's checks on every candidate, redraws the
ones that fail with the item's next seed variant, and keeps the best (see :func:`best`).

- ``dark``: the brightest part of the image (its 99.5th luminance percentile, 0-1). SD 1.5's
  fp16 VAE overflow yields NaNs, which decode to an all-black frame; the pipeline also marks
  non-finite output, which fails this check whatever the pixels.
- ``blank``: detail, as the standard deviation of luminance (0-1) of a 64×64 thumbnail; a
  near-uniform frame fails.
- ``flat``: distinct colours (6 bits a channel) in that thumbnail; a few flat colour areas
  fail.
- ``duplicate``: the Hamming distance from the image's 64-bit perceptual hash (DCT, as in
  pHash) to the nearest image of another SKU of the run; near-copies fail.
- ``safety``: the safety checker's verdict, where it runs (1 passed, 0 flagged).
- ``clip``: prompt alignment, 100 × the cosine between CLIP's image and text embeddings; off
  unless a CLIP model is configured (``SKUFLEET_QUALITY_CLIP``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

CHECKS = ("dark", "blank", "flat", "duplicate", "safety", "clip")
"""Every check, in the order they run and are reported."""
DEFAULT_CHECKS = ("dark", "blank", "flat", "duplicate", "safety")
"""What a run checks unless its pack or its enqueue says otherwise (``clip`` needs a model)."""
THRESHOLDS: dict[str, float] = {
    "dark": 0.06,
    "blank": 0.02,
    "flat": 12.0,
    "duplicate": 6.0,
    "safety": 0.5,
    "clip": 20.0,
}
"""Default thresholds: ``duplicate`` fails at or below its threshold, every other check below."""
LOWER_FAILS = {"duplicate"}
"""Checks whose score fails at or below the threshold rather than strictly below it."""

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class Verdict:
    """One check's result on one image."""

    check: str
    score: float
    threshold: float

    @property
    def passed(self) -> bool:
        if self.check in LOWER_FAILS:
            return self.score > self.threshold
        return self.score >= self.threshold

    def as_dict(self) -> dict[str, Any]:
        return {"score": round(self.score, 4), "threshold": self.threshold, "passed": self.passed}


@dataclass(frozen=True)
class Assessment:
    """Every verdict on one candidate image, and its perceptual hash."""

    verdicts: tuple[Verdict, ...]
    phash: int

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failed(self) -> list[str]:
        return [v.check for v in self.verdicts if not v.passed]

    @property
    def rank(self) -> tuple[float, ...]:
        """Higher is better: fewer failed checks first, then prompt alignment, then detail."""
        scores = {v.check: v.score for v in self.verdicts}
        return (-len(self.failed), scores.get("clip", 0.0), scores.get("blank", 0.0))

    def scores(self) -> dict[str, dict[str, Any]]:
        return {v.check: v.as_dict() for v in self.verdicts}


def seed_variant(seed: int, roll: int) -> int:
    """The seed of roll ``roll`` of an item drawn first with ``seed``: ``seed`` itself for
    roll 0, then a 32-bit value derived from both, the same on every machine."""
    if roll == 0:
        return seed
    digest = hashlib.sha256(f"skufleet-roll:{seed}:{roll}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _thumbnail(image: np.ndarray, size: int = 64) -> np.ndarray:
    """A (size, size, 3) float32 box-filtered copy of an (H, W, 3) uint8 image, 0-1."""
    height, width = image.shape[:2]
    rows = np.linspace(0, height, size + 1).astype(int)
    cols = np.linspace(0, width, size + 1).astype(int)
    pixels = image.astype(np.float32) / 255.0
    summed = np.add.reduceat(np.add.reduceat(pixels, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.outer(np.diff(rows), np.diff(cols))[..., None]
    return np.asarray(summed / np.maximum(counts, 1), dtype=np.float32)


def dark(image: np.ndarray, nonfinite: bool = False) -> float:
    """The 99.5th percentile of luminance, 0-1 (0 for non-finite output)."""
    if nonfinite or image.size == 0:
        return 0.0
    luma = image[..., :3].astype(np.float32) @ _LUMA
    return float(np.percentile(luma, 99.5) / 255.0)


def blank(thumb: np.ndarray) -> float:
    """Standard deviation of luminance of the thumbnail, 0-1."""
    return float((thumb @ _LUMA).std())


def flat(thumb: np.ndarray) -> float:
    """Distinct colours of the thumbnail at 6 bits a channel."""
    quantised = (thumb * 63.0 + 0.5).astype(np.int32)
    packed = (quantised[..., 0] << 12) | (quantised[..., 1] << 6) | quantised[..., 2]
    return float(len(np.unique(packed)))


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return np.asarray(matrix, dtype=np.float32)


_DCT32 = _dct_matrix(32)


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash: the signs, against their median, of the lowest 8×8 DCT
    frequencies (DC excluded) of a 32×32 grey thumbnail, as pHash and imagehash compute it."""
    grey = _thumbnail(image, 32) @ _LUMA
    low = (_DCT32 @ grey @ _DCT32.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return int(sum(1 << i for i, bit in enumerate(bits) if bit))


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class DuplicateIndex:
    """Perceptual hashes of a run's stored images, by SKU, for the ``duplicate`` check.

    Thread-safe; the renderer fills it from the ledger (images other workers stored) and with
    each image it keeps. A SKU is never its own duplicate (its shots may look alike).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes = np.zeros(0, dtype=np.uint64)
        self._skus: list[str] = []

    def add(self, pairs: Iterable[tuple[str, int]]) -> None:
        pairs = list(pairs)
        if not pairs:
            return
        with self._lock:
            self._skus += [sku for sku, _ in pairs]
            added = np.array([h for _, h in pairs], dtype=np.uint64)
            self._hashes = np.concatenate([self._hashes, added])

    def __len__(self) -> int:
        return len(self._skus)

    def nearest(self, sku: str, value: int, others: Sequence[tuple[str, int]] = ()) -> float:
        """Hamming distance to the nearest hash of another SKU (64 when there is none), among
        the index and ``others`` (candidates of the same batch)."""
        with self._lock:
            hashes, skus = self._hashes, self._skus
        best = 64
        if len(hashes):
            distances = np.bitwise_count(hashes ^ np.uint64(value))
            mask = np.array([s != sku for s in skus], dtype=bool)
            if mask.any():
                best = int(distances[mask].min())
        for other_sku, other in others:
            if other_sku != sku:
                best = min(best, hamming(value, other))
        return float(best)


@dataclass(frozen=True)
class Gate:
    """A run's quality settings: which checks, their thresholds, rolls and candidates."""

    checks: tuple[str, ...] = DEFAULT_CHECKS
    thresholds: Mapping[str, float] | None = None
    max_rolls: int = 2
    candidates: int = 1

    def threshold(self, check: str) -> float:
        return float((self.thresholds or {}).get(check, THRESHOLDS[check]))

    @property
    def enabled(self) -> bool:
        return bool(self.checks)


def assess(
    gate: Gate,
    image: np.ndarray,
    *,
    sku: str,
    flagged: bool = False,
    nonfinite: bool = False,
    duplicates: DuplicateIndex | None = None,
    batch: Sequence[tuple[str, int]] = (),
    clip_score: float | None = None,
    phash_value: int | None = None,
) -> Assessment:
    """Run the gate's checks on one candidate image (``phash_value``: its hash, if the
    caller computed it already)."""
    thumb = _thumbnail(image)
    value = phash(image) if phash_value is None else phash_value
    verdicts: list[Verdict] = []
    for check in gate.checks:
        if check == "dark":
            score = dark(image, nonfinite)
        elif check == "blank":
            score = 0.0 if nonfinite else blank(thumb)
        elif check == "flat":
            score = 0.0 if nonfinite else flat(thumb)
        elif check == "duplicate":
            index = duplicates or DuplicateIndex()
            score = index.nearest(sku, value, batch)
        elif check == "safety":
            score = 0.0 if flagged else 1.0
        elif check == "clip":
            if clip_score is None:
                continue  # no CLIP model configured: the check is off
            score = clip_score
        else:
            raise ValueError(f"unknown quality check {check!r}; known: {', '.join(CHECKS)}")
        verdicts.append(Verdict(check, score, gate.threshold(check)))
    return Assessment(tuple(verdicts), value)


def best(assessments: Sequence[Assessment]) -> int:
    """Index of the best candidate: the first of the highest :attr:`Assessment.rank`."""
    return max(range(len(assessments)), key=lambda i: (assessments[i].rank, -i))
