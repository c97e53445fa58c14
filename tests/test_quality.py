"""The quality gate's checks, on images built to pass and to fail."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from skufleet.worker import quality
from skufleet.worker.quality import DuplicateIndex, Gate, assess, best, phash, seed_variant


def photo(seed: int, size: int = 128) -> np.ndarray:
    """A photograph-like image: smooth shapes and gradients with grain, different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((size, size, 3), np.float32)
    for channel in range(3):
        fx, fy, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 6.3)
        image[..., channel] = 0.5 + 0.35 * np.sin(fx * 6.3 * x + phase) * np.cos(fy * 6.3 * y)
    for _ in range(6):
        cx, cy, r = rng.uniform(0, 1), rng.uniform(0, 1), rng.uniform(0.05, 0.3)
        image[(x - cx) ** 2 + (y - cy) ** 2 < r * r] = rng.uniform(0, 1, 3)
    image += rng.normal(0, 0.02, image.shape)
    return np.asarray((image.clip(0, 1) * 255).round(), dtype=np.uint8)


def solid(value: int, size: int = 128) -> np.ndarray:
    return np.full((size, size, 3), value, np.uint8)


def failed(image: np.ndarray, **kwargs: object) -> list[str]:
    return assess(Gate(), image, sku=str(kwargs.pop("sku", "A")), **kwargs).failed  # type: ignore[arg-type]


def test_a_photograph_passes_every_check() -> None:
    """An image with detail, colour and no twin in the run passes."""
    assert failed(photo(1)) == []


def test_black_and_non_finite_output_fail_the_dark_check() -> None:
    """An all-black frame (the fp16 VAE overflow) fails; so does output marked non-finite,
    whatever its pixels."""
    assert "dark" in failed(solid(0))
    assert "dark" in failed(solid(2))
    assert "dark" in failed(photo(2), nonfinite=True)
    assert "dark" not in failed(solid(40))


def test_near_uniform_and_few_colour_images_fail() -> None:
    """A uniform grey frame fails blank and flat; a two-colour split has contrast but fails
    flat; slight noise on a uniform frame is still blank."""
    assert {"blank", "flat"} <= set(failed(solid(128)))
    split = solid(30)
    split[:, 64:] = 220
    assert failed(split) == ["flat"]
    grain = (solid(128) + np.random.default_rng(0).normal(0, 2, (128, 128, 3))).clip(0, 255)
    assert "blank" in failed(grain.astype(np.uint8))


def test_near_copies_of_another_skus_image_fail_the_duplicate_check() -> None:
    """The same picture for another SKU, even brightened, re-encoded with grain and resized,
    is a duplicate; a different picture is not; a SKU is never its own duplicate."""
    original = photo(3)
    index = DuplicateIndex()
    index.add([("SKU-1", phash(original))])
    brighter = (original.astype(np.int16) + 12).clip(0, 255).astype(np.uint8)
    grainy = (original + np.random.default_rng(1).normal(0, 4, original.shape)).clip(0, 255)
    bigger = np.repeat(np.repeat(original, 2, axis=0), 2, axis=1)
    for copy in (original, brighter, grainy.astype(np.uint8), bigger):
        assert "duplicate" in failed(copy, sku="SKU-2", duplicates=index)
    assert "duplicate" not in failed(original, sku="SKU-1", duplicates=index)
    assert "duplicate" not in failed(photo(4), sku="SKU-2", duplicates=index)
    # candidates of the same batch count too
    batch = [("SKU-9", phash(original))]
    assert "duplicate" in failed(original, sku="SKU-2", batch=batch)


def test_distinct_photographs_are_far_apart_in_hash_space() -> None:
    """Over 40 different images, no two hashes are within the duplicate threshold."""
    hashes = [phash(photo(seed)) for seed in range(40)]
    nearest = min(quality.hamming(a, b) for i, a in enumerate(hashes) for b in hashes[i + 1 :])
    assert nearest > quality.THRESHOLDS["duplicate"]


def test_the_safety_verdict_and_the_clip_score_are_checks() -> None:
    """A flagged image fails safety; clip runs only with a score, against its threshold."""
    gate = Gate(checks=("safety", "clip"), thresholds={"clip": 25.0})
    assert assess(gate, photo(5), sku="A", flagged=True).failed == ["safety"]
    assert assess(gate, photo(5), sku="A").failed == []  # no CLIP model: clip is off
    assert assess(gate, photo(5), sku="A", clip_score=18.0).failed == ["clip"]
    assert assess(gate, photo(5), sku="A", clip_score=31.0).passed


def test_unknown_checks_are_refused() -> None:
    with pytest.raises(ValueError, match="'sharpness'"):
        assess(Gate(checks=("sharpness",)), photo(1), sku="A")


def test_seed_variants_are_deterministic_and_distinct() -> None:
    """Roll 0 draws the item's own seed; later rolls draw seeds derived from it, the same
    every time and different for every roll and every seed."""
    assert seed_variant(1234, 0) == 1234
    variants = [seed_variant(1234, roll) for roll in range(1, 50)]
    assert variants == [seed_variant(1234, roll) for roll in range(1, 50)]
    assert len(set(variants)) == 49 and 1234 not in variants
    assert seed_variant(1235, 1) != seed_variant(1234, 1)
    assert all(0 <= v < 2**32 for v in variants)


def test_best_prefers_passing_then_alignment_then_detail() -> None:
    """Best-of-N keeps a passing image over a failing one, the better aligned of two passing
    ones, and the first of equals."""
    gate = Gate(checks=("dark", "blank", "clip"))
    black = assess(gate, solid(0), sku="A", clip_score=40.0)
    low = assess(gate, photo(6), sku="A", clip_score=22.0)
    high = assess(gate, photo(7), sku="A", clip_score=30.0)
    assert best([black, low, high]) == 2
    assert best([black, low]) == 1
    assert best([low, low]) == 0


def test_a_tiny_clip_built_locally_scores_images_against_prompts(tmp_path: Path) -> None:
    """The ``tiny-clip`` model loads through transformers' CLIPModel and gives one finite
    score per image, the same twice."""
    import torch

    from skufleet.worker.clip import TINY, ClipScorer

    scorer = ClipScorer(TINY, torch.device("cpu"), tmp_path)
    images, prompts = [photo(1), photo(2)], ["a red mug", "a blue kettle"]
    scores = scorer.score(images, prompts)
    assert len(scores) == 2 and all(-100.0 <= s <= 100.0 for s in scores)
    assert scores == scorer.score(images, prompts)
    assert ClipScorer(TINY, torch.device("cpu"), tmp_path).score(images, prompts) == scores


def each_check(check: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Arguments of :func:`assess` for an image built to pass ``check`` and one built to
    fail it."""
    twin = photo(20)
    index = DuplicateIndex()
    index.add([("OTHER", phash(twin))])
    split = solid(30)
    split[:, 64:] = 220
    faint = (photo(21).astype(np.float32) * 0.05 + 120).astype(np.uint8)
    pairs: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
        "dark": ({"image": solid(40)}, {"image": solid(3)}),
        "blank": ({"image": split}, {"image": faint}),
        "flat": ({"image": photo(22)}, {"image": split}),
        "duplicate": (
            {"image": photo(23), "duplicates": index},
            {"image": twin, "duplicates": index},
        ),
        "safety": ({"image": photo(24)}, {"image": photo(24), "flagged": True}),
        "clip": (
            {"image": photo(25), "clip_score": 20.0},
            {"image": photo(25), "clip_score": 19.9},
        ),
    }
    return pairs[check]


@pytest.mark.parametrize("check", quality.CHECKS)
def test_every_check_passes_an_image_built_to_pass_and_fails_one_built_to_fail(
    check: str,
) -> None:
    """Each check alone, at its default threshold, on a pair of images made for it."""
    gate = Gate(checks=(check,))
    passing, failing = each_check(check)
    image = passing.pop("image")
    assert assess(gate, image, sku="A", **passing).failed == []
    image = failing.pop("image")
    assert assess(gate, image, sku="A", **failing).failed == [check]


def reference_thumbnail(image: np.ndarray, size: int) -> np.ndarray:
    """The box filter as first written, in floating point."""
    height, width = image.shape[:2]
    rows = np.linspace(0, height, size + 1).astype(int)
    cols = np.linspace(0, width, size + 1).astype(int)
    pixels = image.astype(np.float64) / 255.0
    summed = np.add.reduceat(np.add.reduceat(pixels, rows[:-1], axis=0), cols[:-1], axis=1)
    counts = np.outer(np.diff(rows), np.diff(cols))[..., None]
    return summed / np.maximum(counts, 1)


def reference_phash(image: np.ndarray) -> int:
    grey = reference_thumbnail(image, 32) @ np.array([0.299, 0.587, 0.114])
    dct = quality._dct_matrix(32).astype(np.float64)
    low = (dct @ grey @ dct.T)[:8, :8].flatten()
    bits = low > np.median(low[1:])
    return sum(1 << i for i, bit in enumerate(bits) if bit)


SHAPES = [(512, 512), (500, 700), (768, 512), (1024, 1024), (64, 64), (63, 65), (40, 32), (5, 9)]


@pytest.mark.parametrize(("height", "width"), SHAPES)
def test_the_integer_thumbnails_and_hash_match_the_floating_point_definitions(
    height: int, width: int
) -> None:
    """The fast paths (integer box sums, the 32×32 hash thumbnail from the 64×64 one, the
    luma percentile by selection) give what the plain definitions give, at any size."""
    rng = np.random.default_rng(height * 1000 + width)
    side = max(height, width)
    images = [
        photo(height + width, side)[:height, :width],
        rng.integers(0, 256, (height, width, 3)),
    ]
    for image in (np.ascontiguousarray(i, dtype=np.uint8) for i in images):
        for size in (64, 32):
            fast = quality._thumbnail(image, size)
            assert fast.dtype == np.float32
            assert np.abs(fast - reference_thumbnail(image, size)).max() < 1e-6
        assert phash(image) == reference_phash(image)
        luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        assert abs(quality.dark(image) - np.percentile(luma, 99.5) / 255) <= 1 / 255
    # a view (every other column) is read as the pixels it shows
    wide = photo(7, 256)
    assert phash(wide[:, ::2]) == reference_phash(np.ascontiguousarray(wide[:, ::2]))


def test_the_dark_percentile_interpolates_as_numpy_does() -> None:
    rng = np.random.default_rng(3)
    for length in (1, 2, 199, 200, 201, 4096, 10_001):
        values = rng.integers(0, 256, length).astype(np.uint16)
        assert quality._percentile(values, 99.5) == pytest.approx(np.percentile(values, 99.5))


def test_the_duplicate_index_grows_and_never_matches_a_sku_with_itself() -> None:
    """Thousands of hashes added one at a time (its arrays grow as they fill); the nearest
    other SKU's hash is found, the SKU's own never counts."""
    rng = np.random.default_rng(4)
    hashes = [int(h) for h in rng.integers(0, 2**63, 3000, dtype=np.int64)]
    index = DuplicateIndex()
    for n, value in enumerate(hashes):
        index.add([(f"SKU-{n % 1000}", value)])
    assert len(index) == 3000
    target = hashes[1234] ^ 0b111  # 3 bits from SKU-234's hash
    assert index.nearest("SKU-9", target) == 3.0
    nearest_other = min(quality.hamming(target, h) for n, h in enumerate(hashes) if n % 1000 != 234)
    assert index.nearest("SKU-234", target) == float(nearest_other)
    assert DuplicateIndex().nearest("A", 5) == 64.0
    alone = DuplicateIndex()
    alone.add([("A", 5), ("A", 5)])
    assert alone.nearest("A", 5) == 64.0 and alone.nearest("B", 5) == 0.0


def test_best_never_prefers_a_flagged_image_to_a_clean_one() -> None:
    """A flagged image is never uploaded: any clean candidate ranks above it, even one that
    fails another check with less detail; among flagged ones, the usual order."""
    faint = solid(100)
    faint[:, 64:] = 130  # fails flat, little detail
    flagged = assess(Gate(), photo(8), sku="A", flagged=True)
    clean = assess(Gate(), faint, sku="A")
    assert flagged.failed == ["safety"] and clean.failed == ["flat"]
    assert flagged.rank[-1] > clean.rank[-1]  # more detail
    assert best([flagged, clean]) == 1
    # known flagged even where the gate does not check safety
    unchecked = Gate(checks=("dark",))
    assert (
        best(
            [assess(unchecked, photo(8), sku="A", flagged=True), assess(unchecked, faint, sku="A")]
        )
        == 1
    )
