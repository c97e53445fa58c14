"""The gate's draw loop (worker.gate.Roller) with a stand-in draw function: which seeds it
draws, what it re-rolls, which candidate each item keeps; no model."""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

from skufleet.worker import quality
from skufleet.worker.gate import Rolled, Roller, Want
from skufleet.worker.pipeline import Batch, Job
from skufleet.worker.quality import Gate, seed_variant
from tests.test_quality import photo, solid

SIZE = 96


def split(low: int = 30, high: int = 220) -> np.ndarray:
    """Two flat halves: contrast and brightness enough, but few colours (fails ``flat``)."""
    image = solid(low, SIZE)
    image[:, SIZE // 2 :] = high
    return image


class StandIn:
    """Draws what a script says for (prompt, roll), a distinct photograph otherwise.

    Kinds: ``photo`` (distinct per prompt and seed), ``black`` (all but zero), ``grey``
    (uniform), ``split`` and ``faint split`` (two flat halves: fail only ``flat``), ``dim``
    (a photograph at low contrast, which passes), ``nonfinite`` (a photograph the decoder
    marked non-finite), ``flagged`` (a photograph the safety checker flagged),
    ``copy:<prompt>`` (the picture that prompt drew at roll 0). Every call is recorded, and
    every image by (prompt, roll)."""

    def __init__(self, wants: Sequence[Want], script: Mapping[tuple[str, int], str] = {}) -> None:
        self.script = dict(script)
        self.rolls = {
            (w.prompt, seed_variant(w.seed, roll)): roll for w in wants for roll in range(12)
        }
        self.calls: list[list[Job]] = []
        self.drawn: dict[tuple[str, int], np.ndarray] = {}

    def picture(self, prompt: str, seed: int) -> np.ndarray:
        return photo(zlib.crc32(f"{prompt}:{seed}".encode()), SIZE)

    def __call__(self, jobs: list[Job]) -> Batch:
        self.calls.append(list(jobs))
        images, flagged, nonfinite = [], [], []
        for job in jobs:
            roll = self.rolls[(job.prompt, job.seed)]
            kind = self.script.get((job.prompt, roll), "photo")
            image = self.picture(job.prompt, job.seed)
            if kind == "black":
                image = solid(1, SIZE)
            elif kind == "grey":
                image = solid(128, SIZE)
            elif kind == "split":
                image = split()
            elif kind == "faint split":
                image = split(100, 130)
            elif kind == "dim":
                image = (image // 3 + 80).astype(np.uint8)
            elif kind.startswith("copy:"):
                source = kind.removeprefix("copy:")
                seed = next(s for (p, s), r in self.rolls.items() if p == source and r == 0)
                image = self.picture(source, seed)
            self.drawn[(job.prompt, roll)] = image
            images.append(image)
            flagged.append(kind == "flagged")
            nonfinite.append(kind == "nonfinite")
        return Batch(np.stack(images), flagged, {"denoise": 0.0}, nonfinite)


def want(sku: str, seed: int, next_roll: int = 0) -> Want:
    return Want(sku, f"a photo of {sku}", "", seed, next_roll)


def rolls(rolled: Rolled, item: int) -> list[int]:
    return [c.roll for c in rolled.kept[item].gated.candidates]


def test_reroll_seeds_are_deterministic_and_recorded() -> None:
    """Roll r of an item is drawn with seed_variant(seed, r), the same every time the same
    wants are drawn, and the ledger's record names each candidate's roll and seed; an item
    whose next_roll is 3 (rolls 0-2 were rejected) starts at roll 3."""
    wants = [want("A", 11), want("B", 12), want("C", 13, next_roll=3)]
    script = {("a photo of A", 0): "black", ("a photo of A", 1): "grey"}
    script |= {("a photo of C", 3): "black"}
    records, calls = [], []
    for _ in range(2):
        draw = StandIn(wants, script)
        rolled = Roller(Gate()).draw(wants, draw)
        records.append([k.gated for k in rolled.kept])
        calls.append([[(job.prompt, job.seed) for job in jobs] for jobs in draw.calls])
    assert records[0] == records[1] and calls[0] == calls[1]
    a, b, c = records[0]
    assert [(d.roll, d.seed, d.reroll) for d in a.candidates] == [
        (0, 11, False),
        (1, seed_variant(11, 1), True),
        (2, seed_variant(11, 2), True),
    ]
    assert [(d.roll, d.seed) for d in b.candidates] == [(0, 12)]
    assert [(d.roll, d.seed) for d in c.candidates] == [
        (3, seed_variant(13, 3)),
        (4, seed_variant(13, 4)),
    ]
    assert calls[0][0] == [
        ("a photo of A", 11),
        ("a photo of B", 12),
        ("a photo of C", c.candidates[0].seed),
    ]
    assert [len(jobs) for jobs in calls[0]] == [3, 2, 1]  # A and C re-rolled, then A alone


def test_a_failing_item_is_rerolled_and_keeps_its_passing_image() -> None:
    """An item whose image fails is drawn again at its next roll, in one batch with the
    other failing items, and keeps the passing image; items that passed are not redrawn."""
    wants = [want("A", 1), want("B", 2), want("C", 3)]
    draw = StandIn(wants, {("a photo of A", 0): "black", ("a photo of C", 0): "nonfinite"})
    rolled = Roller(Gate()).draw(wants, draw)
    assert [len(jobs) for jobs in draw.calls] == [3, 2]
    assert rolled.renders == 5 and rolled.rerolls == 2 and rolled.check_seconds > 0
    for item, prompt in ((0, "a photo of A"), (2, "a photo of C")):
        gated = rolled.kept[item].gated
        assert [d.passed for d in gated.candidates] == [False, True]
        assert "dark" in [k for k, v in gated.candidates[0].scores.items() if not v["passed"]]
        assert gated.kept == 1 and gated.image.roll == 1 and gated.image.reroll
        assert np.array_equal(rolled.kept[item].pixels, draw.drawn[(prompt, 1)])
        assert gated.phash == quality.phash(draw.drawn[(prompt, 1)])
    assert rolls(rolled, 1) == [0] and rolled.kept[1].gated.image.passed


def test_after_the_roll_cap_the_best_failing_candidate_is_kept_unpassed() -> None:
    """When every candidate fails up to max_rolls, all max_rolls + 1 are recorded and the
    best by rank (fewest failed checks) is kept, not passed: the item goes to review."""
    wants = [want("A", 5)]
    script = {("a photo of A", 0): "black", ("a photo of A", 1): "split"}
    script |= {("a photo of A", 2): "grey"}
    draw = StandIn(wants, script)
    rolled = Roller(Gate(max_rolls=2)).draw(wants, draw)
    gated = rolled.kept[0].gated
    assert rolls(rolled, 0) == [0, 1, 2] and [len(jobs) for jobs in draw.calls] == [1, 1, 1]
    assert not any(d.passed for d in gated.candidates)
    assert gated.kept == 1 and not gated.image.passed  # split fails flat alone
    assert np.array_equal(rolled.kept[0].pixels, split())
    # with no re-rolls allowed, the one candidate is kept as it is
    never = Roller(Gate(max_rolls=0)).draw(wants, StandIn(wants, script))
    assert rolls(never, 0) == [0] and not never.kept[0].gated.image.passed


def test_best_of_n_draws_every_candidate_in_one_batch_and_keeps_the_best() -> None:
    """With candidates=3 each item's rolls 0-2 are drawn together in one batch; the kept
    one is the best by rank: passing first, then CLIP alignment, then detail."""
    wants = [want("A", 1), want("B", 2)]
    clip = {("a photo of A", 0): 25.0, ("a photo of A", 1): 35.0, ("a photo of A", 2): 50.0}
    clip |= {("a photo of B", 0): 22.0, ("a photo of B", 1): 28.0, ("a photo of B", 2): 40.0}
    draw = StandIn(wants, {("a photo of A", 2): "black"})  # the best aligned of A fails

    def score(images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        return [
            next(
                value
                for (drawn_for, roll), value in clip.items()
                if drawn_for == prompt and np.array_equal(draw.drawn[(prompt, roll)], image)
            )
            for image, prompt in zip(images, prompts, strict=True)
        ]

    gate = Gate(checks=(*quality.DEFAULT_CHECKS, "clip"), candidates=3)
    rolled = Roller(gate, clip=score).draw(wants, draw)
    assert [len(jobs) for jobs in draw.calls] == [6] and rolled.renders == 6
    assert rolled.rerolls == 0
    assert [rolls(rolled, i) for i in (0, 1)] == [[0, 1, 2], [0, 1, 2]]
    assert [k.gated.kept for k in rolled.kept] == [1, 2]
    assert not any(d.reroll for k in rolled.kept for d in k.gated.candidates)
    # without CLIP, detail decides between passing candidates
    draw = StandIn(wants[:1], {("a photo of A", 0): "dim", ("a photo of A", 2): "grey"})
    rolled = Roller(Gate(candidates=3)).draw(wants[:1], draw)
    assert [d.passed for d in rolled.kept[0].gated.candidates] == [True, True, False]
    assert rolled.kept[0].gated.kept == 1


def test_duplicates_across_two_skus_in_one_batch_are_caught() -> None:
    """Two SKUs that draw the same picture in one batch are not both stored with it: the
    copy fails the duplicate check and is re-rolled to a picture of its own. Two shots of
    one SKU may look alike."""
    wants = [want("A", 1), want("B", 2)]
    draw = StandIn(wants, {("a photo of B", 0): "copy:a photo of A"})
    rolled = Roller(Gate()).draw(wants, draw)
    b = rolled.kept[1].gated
    assert b.candidates[0].scores["duplicate"] == {"score": 0.0, "threshold": 6.0, "passed": False}
    assert len(b.candidates) == 2 and b.image.passed and b.image.reroll
    assert quality.hamming(rolled.kept[0].gated.phash, b.phash) > 6
    assert all(k.gated.image.passed for k in rolled.kept)
    # a later batch checks against what earlier ones kept (the run's index)
    index = quality.DuplicateIndex()
    everyone = [want("A", 1), want("C", 3)]
    draw = StandIn(everyone, {("a photo of C", 0): "copy:a photo of A"})
    first = Roller(Gate(), index).draw(everyone[:1], draw)
    again = Roller(Gate(), index).draw(everyone[1:], draw)
    assert rolls(first, 0) == [0] and len(index) == 2
    assert rolls(again, 0) == [0, 1] and again.kept[0].gated.image.passed
    # the same SKU twice (two shots) is never its own duplicate
    shots = [Want("A", "a photo of A", "", 1), Want("A", "a photo of A, back", "", 9)]
    draw = StandIn(shots, {("a photo of A, back", 0): "copy:a photo of A"})
    same = Roller(Gate()).draw(shots, draw)
    assert [rolls(same, i) for i in (0, 1)] == [[0], [0]]


def test_of_two_twins_in_one_batch_the_first_keeps_its_picture() -> None:
    """Only the second of two SKUs that drew the same picture is re-rolled."""
    wants = [want("A", 1), want("B", 2)]
    draw = StandIn(wants, {("a photo of B", 0): "copy:a photo of A"})
    rolled = Roller(Gate()).draw(wants, draw)
    assert rolls(rolled, 0) == [0] and rolls(rolled, 1) == [0, 1]


def test_a_flagged_candidate_is_never_kept_when_a_clean_one_exists() -> None:
    """A candidate the safety checker flagged is re-rolled like any failing one, and ranks
    below every clean candidate, even one that fails another check."""
    wants = [want("A", 1)]
    draw = StandIn(wants, {("a photo of A", 0): "flagged"})
    rolled = Roller(Gate()).draw(wants, draw)
    assert rolls(rolled, 0) == [0, 1] and rolled.kept[0].gated.kept == 1
    assert not rolled.kept[0].flagged
    # every roll fails; the flagged one has more detail than the low-contrast split
    draw = StandIn(wants, {("a photo of A", 0): "flagged", ("a photo of A", 1): "faint split"})
    rolled = Roller(Gate(max_rolls=1)).draw(wants, draw)
    gated = rolled.kept[0].gated
    assert [d.passed for d in gated.candidates] == [False, False]
    first, second = (d.scores["blank"]["score"] for d in gated.candidates)
    assert first > second
    assert gated.kept == 1 and not rolled.kept[0].flagged
    # best-of-N: the clean candidate is kept over the flagged one
    draw = StandIn(wants, {("a photo of A", 0): "flagged"})
    rolled = Roller(Gate(candidates=2)).draw(wants, draw)
    assert rolled.kept[0].gated.kept == 1 and not rolled.kept[0].flagged
    # a flagged image's hash never joins the duplicate index
    index = quality.DuplicateIndex()
    draw = StandIn(wants, {("a photo of A", r): "flagged" for r in range(3)})
    rolled = Roller(Gate(), index).draw(wants, draw)
    assert rolled.kept[0].flagged and len(index) == 0


def test_a_gate_with_no_checks_draws_one_candidate_per_item() -> None:
    """Without checks every item is drawn once, in one batch, and kept as drawn."""
    wants = [want("A", 1), want("B", 2), want("C", 3)]
    draw = StandIn(wants, {("a photo of A", 0): "black", ("a photo of B", 0): "grey"})
    rolled = Roller(Gate(checks=())).draw(wants, draw)
    assert [len(jobs) for jobs in draw.calls] == [3] and rolled.renders == 3
    assert rolled.rerolls == 0
    for k in rolled.kept:
        assert k.gated.kept == 0 and k.gated.image.passed and k.gated.image.scores == {}
    assert np.array_equal(rolled.kept[0].pixels, solid(1, SIZE))


def test_a_gate_with_no_checks_draws_one_candidate_whatever_its_candidates() -> None:
    wants = [want("A", 1)]
    draw = StandIn(wants)
    rolled = Roller(Gate(checks=(), candidates=3)).draw(wants, draw)
    assert rolled.renders == 1
