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

The checks run on the host for every candidate, so they are kept cheap: the image is never
converted to floating point; one pass of integer box sums gives the 64×64 thumbnail and,
by adding 2×2 boxes, the hash's 32×32 one; ``dark`` selects its percentile from 16-bit
luma instead of sorting. About 1-2 ms a 512×512 candidate, a few percent of the ~50 ms its
PNG encoding costs (``bench/quality.py``).
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from skufleet.schemas.gate import CHECKS, DEFAULT_CHECKS, THRESHOLDS

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
    flagged: bool = False
    """The safety checker flagged the image (known whether or not the gate checks
    ``safety``): it is never uploaded."""

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts)

    @property
    def failed(self) -> list[str]:
        return [v.check for v in self.verdicts if not v.passed]

    @property
    def rank(self) -> tuple[float, ...]:
        """Higher is better: not flagged by the safety checker first (a flagged image is
        never uploaded, so any clean one is worth more), then fewer failed checks, then
        prompt alignment, then detail."""
        scores = {v.check: v.score for v in self.verdicts}
        flagged = self.flagged or "safety" in self.failed
        return (
            0.0 if flagged else 1.0,
            -len(self.failed),
            scores.get("clip", 0.0),
            scores.get("blank", 0.0),
        )

    def scores(self) -> dict[str, dict[str, Any]]:
        return {v.check: v.as_dict() for v in self.verdicts}


def seed_variant(seed: int, roll: int) -> int:
    """The seed of roll ``roll`` of an item drawn first with ``seed``: ``seed`` itself for
    roll 0, then a 32-bit value derived from both, the same on every machine."""
    if roll == 0:
        return seed
    digest = hashlib.sha256(f"skufleet-roll:{seed}:{roll}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


def _box_sums(image: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel pixel sums of a ``size``×``size`` grid of boxes over an (H, W, 3) uint8
    image, as unsigned integers, and the pixels in each box, (size, size, 1).

    Box ``i`` spans rows ``i·H // size`` to ``(i + 1)·H // size`` (the same for columns), so
    the boxes of a 32 grid are exactly pairs of boxes of the 64 grid. The sums are exact and
    stay in integers: a whole image is never converted to floating point.
    """
    image = np.ascontiguousarray(image[..., :3], dtype=np.uint8)
    height, width = image.shape[:2]
    rows = (np.arange(size + 1) * height) // size
    cols = (np.arange(size + 1) * width) // size
    counts = np.outer(np.diff(rows), np.diff(cols))[..., None]
    if height < size or width < size:
        # fewer pixels than boxes: the few tiny images of tests, through the general path
        summed = np.add.reduceat(image, rows[:-1], axis=0, dtype=np.uint32)
        summed = np.add.reduceat(summed, cols[:-1], axis=1)
        return summed, np.maximum(counts, 1)
    tall, wide = height // size, width // size
    most = 255 * (tall + 1) * (wide + 1)
    dtype = np.uint16 if most <= np.iinfo(np.uint16).max else np.uint32
    # rows first, adding whole rows (contiguous bytes), then columns of the row sums
    by_rows = _add_runs(image.reshape(height, width * 3), rows, tall, dtype)
    by_cols = _add_runs(by_rows.reshape(size, width, 3).transpose(1, 0, 2), cols, wide, dtype)
    return by_cols.transpose(1, 0, 2), counts


def _add_runs(values: np.ndarray, bounds: np.ndarray, least: int, dtype: Any) -> np.ndarray:
    """Sums along the first axis of ``values`` over ``bounds[i]:bounds[i + 1]``, runs of
    ``least`` or ``least + 1`` rows: ``least`` strided adds (views, no gathering) where the
    runs are equal, else gathered adds plus one for the longer runs."""
    runs = len(bounds) - 1
    if runs * least == len(values):
        grouped = values.reshape(runs, least, *values.shape[1:])
        total = grouped[:, 0].astype(dtype)
        for k in range(1, least):
            total += grouped[:, k]
        return total
    starts, longer = bounds[:-1], np.diff(bounds) > least
    total = values[starts].astype(dtype)
    for k in range(1, least):
        total += values[starts + k]
    total[longer] += values[starts[longer] + least]
    return total


def _halve(summed: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The box sums and counts of the grid half as fine, from those of a grid of even size
    (exact: each coarse box is 2×2 fine boxes)."""
    pairs = summed[0::2].astype(np.uint32)
    pairs += summed[1::2]
    rows = counts[0::2] + counts[1::2]
    return pairs[:, 0::2] + pairs[:, 1::2], rows[:, 0::2] + rows[:, 1::2]


def _mean(summed: np.ndarray, counts: np.ndarray) -> np.ndarray:
    return np.asarray(summed / (counts * 255.0), dtype=np.float32)


def _thumbnail(image: np.ndarray, size: int = 64) -> np.ndarray:
    """A (size, size, 3) float32 box-filtered copy of an (H, W, 3) uint8 image, 0-1."""
    return _mean(*_box_sums(image, size))


def dark(image: np.ndarray, nonfinite: bool = False) -> float:
    """The 99.5th percentile of luminance, 0-1 (0 for non-finite output).

    Luminance is the 8-bit BT.601 luma, ``(77 R + 150 G + 29 B + 128) >> 8`` (within one
    step of ``0.299 R + 0.587 G + 0.114 B``) in 16-bit integers, never floating point."""
    if nonfinite or image.size == 0:
        return 0.0
    rgb = image[..., :3]
    if rgb.dtype != np.uint8:
        luma = rgb.astype(np.float32) @ _LUMA
        return float(np.percentile(luma, 99.5) / 255.0)
    luma = np.multiply(rgb[..., 0], 77, dtype=np.uint16)
    luma += np.multiply(rgb[..., 1], 150, dtype=np.uint16)
    luma += np.multiply(rgb[..., 2], 29, dtype=np.uint16)
    luma += np.uint16(128)
    np.right_shift(luma, 8, out=luma)
    return _percentile(luma.ravel(), 99.5) / 255.0


def _percentile(values: np.ndarray, percent: float) -> float:
    """``np.percentile(values, percent)`` (linear interpolation) by one partial selection,
    not a sort: the order statistic below the position, then the least value above it."""
    position = percent / 100.0 * (len(values) - 1)
    low = int(position)
    chosen = np.partition(values, low)
    below = float(chosen[low])
    above = float(chosen[low + 1 :].min()) if low + 1 < len(values) else below
    return below + (above - below) * (position - low)


def blank(thumb: np.ndarray) -> float:
    """Standard deviation of luminance of the thumbnail, 0-1."""
    return float((thumb @ _LUMA).std())


def flat(thumb: np.ndarray) -> float:
    """Distinct colours of the thumbnail at 6 bits a channel."""
    quantised = (thumb * 63.0 + 0.5).astype(np.int32)
    packed = (quantised[..., 0] << 12) | (quantised[..., 1] << 6) | quantised[..., 2]
    ordered = np.sort(packed.ravel())
    return float(np.count_nonzero(ordered[1:] != ordered[:-1]) + 1)


def _dct_matrix(n: int) -> np.ndarray:
    k = np.arange(n)[:, None]
    i = np.arange(n)[None, :]
    matrix = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2.0 / n)
    matrix[0] /= np.sqrt(2.0)
    return np.asarray(matrix, dtype=np.float32)


_DCT32 = _dct_matrix(32)
_DCT_LOW = np.ascontiguousarray(_DCT32[:8])
"""The 8 lowest frequencies of the 32-point DCT: all of the transform the hash reads."""


def phash(image: np.ndarray) -> int:
    """64-bit perceptual hash: the signs, against their median, of the lowest 8×8 DCT
    frequencies (DC excluded) of a 32×32 grey thumbnail, as pHash and imagehash compute it."""
    return _hash_thumbnail(*_sums32(image))


@dataclass(frozen=True)
class Prepared:
    """What every check of one image starts from, read once: the box sums of its 64×64
    thumbnail and its perceptual hash (which the duplicate check compares across a batch
    before any image is assessed)."""

    sums64: tuple[np.ndarray, np.ndarray]
    phash: int


def prepare(image: np.ndarray) -> Prepared:
    sums64 = _box_sums(image, 64)
    return Prepared(sums64, _hash_thumbnail(*_sums32(image, sums64)))


def _sums32(
    image: np.ndarray, sums64: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The 32 grid's box sums, from the 64 grid's where the image has a pixel per box."""
    height, width = image.shape[:2]
    if height < 64 or width < 64:
        return _box_sums(image, 32)
    return _halve(*(sums64 if sums64 is not None else _box_sums(image, 64)))


def _hash_thumbnail(summed: np.ndarray, counts: np.ndarray) -> int:
    grey = _mean(summed, counts) @ _LUMA
    low = (_DCT_LOW @ grey @ _DCT_LOW.T).ravel()
    bits = low > np.median(low[1:])
    return int.from_bytes(np.packbits(bits, bitorder="little").tobytes(), "little")


def hamming(a: int, b: int) -> int:
    return (a ^ b).bit_count()


class DuplicateIndex:
    """Perceptual hashes of a run's stored images, by SKU, for the ``duplicate`` check.

    Thread-safe; the renderer fills it from the ledger (images other workers stored) and with
    each image it keeps. A SKU is never its own duplicate (its shots may look alike).

    Hashes and SKUs (as small integer codes) sit in arrays that grow by doubling, so adding
    one hash costs O(1) and a lookup is one vectorised pass, however large the run.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hashes = np.zeros(64, dtype=np.uint64)
        self._codes = np.zeros(64, dtype=np.int64)
        self._count = 0
        self._sku_codes: dict[str, int] = {}

    def add(self, pairs: Iterable[tuple[str, int]]) -> None:
        pairs = list(pairs)
        if not pairs:
            return
        with self._lock:
            codes = [self._sku_codes.setdefault(sku, len(self._sku_codes)) for sku, _ in pairs]
            count, end = self._count, self._count + len(pairs)
            if end > len(self._hashes):
                capacity = max(end, 2 * len(self._hashes))
                # new arrays: a reader holding a view of the old ones keeps a valid prefix
                self._hashes = np.concatenate(
                    [self._hashes[:count], np.zeros(capacity - count, np.uint64)]
                )
                self._codes = np.concatenate(
                    [self._codes[:count], np.zeros(capacity - count, np.int64)]
                )
            self._hashes[count:end] = np.array([h for _, h in pairs], dtype=np.uint64)
            self._codes[count:end] = codes
            self._count = end

    def __len__(self) -> int:
        return self._count

    def nearest(self, sku: str, value: int, others: Sequence[tuple[str, int]] = ()) -> float:
        """Hamming distance to the nearest hash of another SKU (64 when there is none), among
        the index and ``others`` (candidates of the same batch)."""
        with self._lock:
            count = self._count
            hashes, codes = self._hashes[:count], self._codes[:count]
            own = self._sku_codes.get(sku)
        best = 64
        if count:
            distances = np.bitwise_count(hashes ^ np.uint64(value))
            if own is not None:
                distances = distances[codes != own]
            if len(distances):
                best = int(distances.min())
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
    prepared: Prepared | None = None,
) -> Assessment:
    """Run the gate's checks on one candidate image (``prepared``: its :func:`prepare`, if
    the caller made it already).

    The image is read twice: once for the box sums of the 64×64 thumbnail (which ``blank``
    and ``flat`` read, and whose 2×2 sums are the hash's 32×32 thumbnail), once for the
    luma of ``dark``."""
    checks = gate.checks
    prepared = prepared or prepare(image)
    thumb = None if nonfinite else _mean(*prepared.sums64)
    value = prepared.phash
    verdicts: list[Verdict] = []
    for check in checks:
        if check == "dark":
            score = dark(image, nonfinite)
        elif check == "blank":
            score = 0.0 if thumb is None else blank(thumb)
        elif check == "flat":
            score = 0.0 if thumb is None else flat(thumb)
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
    return Assessment(tuple(verdicts), value, flagged)


def best(assessments: Sequence[Assessment]) -> int:
    """Index of the best candidate: the first of the highest :attr:`Assessment.rank`."""
    return max(range(len(assessments)), key=lambda i: (assessments[i].rank, -i))
