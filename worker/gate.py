"""Drawing through the quality gate: best-of-N candidates, re-rolls, the image each item keeps.

:class:`Roller` takes a batch of items and a ``draw`` function (the renderer's, which holds
the device) and returns, per item, the image to store and the ledger's record of every
candidate (:class:`ledger.Gated`):

1. draw ``candidates`` images per item, rolls ``next_roll`` … ``next_roll + N - 1`` (roll
   ``r``'s seed is :func:`quality.seed_variant` of the item's seed), all in one batch;
2. run the run's checks on each (``worker.quality``), CLIP scores in one call per batch;
3. for items whose every candidate failed a check, draw one more, at the next roll, all
   those items in one batch again; up to ``max_rolls`` times;
4. keep each item's best candidate (:func:`quality.best`); if it still fails, the item ends
   ``needs_review`` with that image stored.

The roll of each candidate is fixed by the item's ``next_roll`` and its place in the
sequence, so a render repeated after a crash draws the very same seeds; a reviewer's reject
moves ``next_roll`` past every roll stored, so the item's next image is new.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError, ItemError, LedgerUnavailable
from skufleet.schemas.gate import MAX_CANDIDATES, MAX_ROLLS
from skufleet.worker import quality
from skufleet.worker.pipeline import Batch, Job

log = logging.getLogger(__name__)

HASH_REFRESH_SECONDS = 30.0
"""How often a run's stored images' hashes are topped up from the ledger: images other
workers stored meanwhile join the duplicate check then."""


def gate_from(settings: Mapping[str, Any]) -> quality.Gate:
    """The run's :class:`quality.Gate` from its recorded settings (``Run.params["quality"]``:
    checks, thresholds, max_rolls, candidates; each missing one takes its default)."""
    checks = settings.get("checks")
    thresholds = dict(settings.get("thresholds") or {})
    gate = quality.Gate(
        checks=quality.DEFAULT_CHECKS if checks is None else tuple(checks),
        thresholds=thresholds or None,
        max_rolls=int(settings.get("max_rolls", 2)),
        candidates=int(settings.get("candidates", 1)),
    )
    check_gate(gate)
    return gate


def check_gate(gate: quality.Gate) -> None:
    """ConfigError naming the first bad value of a gate's settings."""
    for name in (*gate.checks, *(gate.thresholds or {})):
        if name not in quality.CHECKS:
            raise ConfigError(f"unknown quality check {name!r}; known: {', '.join(quality.CHECKS)}")
    if not 0 <= gate.max_rolls <= MAX_ROLLS:
        raise ConfigError(f"max rolls must be 0-{MAX_ROLLS}, got {gate.max_rolls}")
    if not 1 <= gate.candidates <= MAX_CANDIDATES:
        raise ConfigError(f"candidates must be 1-{MAX_CANDIDATES}, got {gate.candidates}")


@dataclass(frozen=True)
class Want:
    """One item to draw through the gate."""

    sku: str
    prompt: str
    negative_prompt: str
    seed: int
    next_roll: int = 0


@dataclass
class _Drawn:
    roll: int
    seed: int
    pixels: np.ndarray
    flagged: bool
    nonfinite: bool
    reroll: bool
    assessment: quality.Assessment | None = None


@dataclass
class Kept:
    """What one item keeps: the pixels to store, whether the safety checker flagged them,
    and the ledger's record of every candidate."""

    pixels: np.ndarray
    flagged: bool
    gated: ledger.Gated


@dataclass
class Rolled:
    """A batch drawn through the gate: what each item keeps, and where the time went."""

    kept: list[Kept]
    batches: list[Batch] = field(default_factory=list)
    """Every batch drawn: the first, then one per re-roll round."""
    check_seconds: float = 0.0
    """Host time spent in the checks (CLIP included)."""

    @property
    def renders(self) -> int:
        return sum(len(b.images) for b in self.batches)

    @property
    def rerolls(self) -> int:
        return sum(len(b.images) for b in self.batches[1:])


Scorer = Callable[[Sequence[np.ndarray], Sequence[str]], list[float]]
"""CLIP: images and their prompts to scores (``worker.clip.ClipScorer.score``)."""


class Roller:
    """Draws items through one run's gate (see the module docstring). ``duplicates`` holds
    the run's stored images' hashes; what each item keeps is added to it."""

    def __init__(
        self,
        gate: quality.Gate,
        duplicates: quality.DuplicateIndex | None = None,
        clip: Scorer | None = None,
    ) -> None:
        check_gate(gate)
        self.gate = gate
        self.duplicates = duplicates if duplicates is not None else quality.DuplicateIndex()
        self.clip = clip if "clip" in gate.checks else None

    def draw(self, wants: Sequence[Want], draw: Callable[[list[Job]], Batch]) -> Rolled:
        gate = self.gate
        n = gate.candidates if gate.enabled else 1  # nothing to rank candidates by
        rolled = Rolled([])
        drawn: list[list[_Drawn]] = [[] for _ in wants]
        pending = [(i, w.next_roll + k) for i, w in enumerate(wants) for k in range(n)]
        rounds = 0
        while pending:
            jobs = [
                Job(wants[i].prompt, wants[i].negative_prompt, _seed(wants[i], roll))
                for i, roll in pending
            ]
            batch = draw(jobs)
            rolled.batches.append(batch)
            nonfinite = batch.nonfinite or [False] * len(jobs)
            fresh = []
            for j, (i, roll) in enumerate(pending):
                candidate = _Drawn(
                    roll,
                    jobs[j].seed,
                    batch.images[j],
                    batch.flagged[j],
                    nonfinite[j],
                    reroll=rounds > 0,
                )
                drawn[i].append(candidate)
                fresh.append((i, candidate))
            started = time.perf_counter()
            self._assess(wants, fresh, drawn)
            rolled.check_seconds += time.perf_counter() - started
            if rounds >= gate.max_rolls or not gate.enabled:
                break
            rounds += 1
            pending = [
                (i, max(c.roll for c in drawn[i]) + 1)
                for i in range(len(wants))
                if not any(_passed(c) for c in drawn[i])
            ]
        for i, want in enumerate(wants):
            assessments = [_assessment(c) for c in drawn[i]]
            index = quality.best(assessments)
            kept = drawn[i][index]
            record = tuple(
                ledger.Drawn(c.roll, c.seed, a.scores(), a.passed, c.reroll)
                for c, a in zip(drawn[i], assessments, strict=True)
            )
            phash = assessments[index].phash
            rolled.kept.append(Kept(kept.pixels, kept.flagged, ledger.Gated(record, index, phash)))
            if not kept.flagged:
                self.duplicates.add([(want.sku, phash)])
        return rolled

    def _assess(
        self,
        wants: Sequence[Want],
        fresh: list[tuple[int, _Drawn]],
        drawn: list[list[_Drawn]],
    ) -> None:
        """Check each new candidate against the run's index, the other items' passing
        candidates of earlier rounds, and those drawn before it in this batch."""
        clip_scores: list[float | None] = [None] * len(fresh)
        if self.clip is not None and fresh:
            scores = self.clip([c.pixels for _, c in fresh], [wants[i].prompt for i, _ in fresh])
            clip_scores = list(scores)
        prepared = [quality.prepare(c.pixels) for _, c in fresh]
        hashes = [(i, p.phash) for (i, _), p in zip(fresh, prepared, strict=True)]
        # an earlier round's candidate counts only where it passed (it may be kept); in
        # this round, the first item to draw a picture keeps it and later ones are copies
        earlier = [
            (k, c.assessment.phash)
            for k, candidates in enumerate(drawn)
            for c in candidates
            if c.assessment is not None and c.assessment.passed
        ]
        for at, ((i, candidate), clip_score) in enumerate(zip(fresh, clip_scores, strict=True)):
            others = [
                (wants[k].sku, value)
                for k, value in (*earlier, *hashes[:at])
                if k != i and wants[k].sku != wants[i].sku
            ]
            candidate.assessment = quality.assess(
                self.gate,
                candidate.pixels,
                sku=wants[i].sku,
                flagged=candidate.flagged,
                nonfinite=candidate.nonfinite,
                duplicates=self.duplicates,
                batch=others,
                clip_score=clip_score,
                prepared=prepared[at],
            )


def _seed(want: Want, roll: int) -> int:
    return quality.seed_variant(want.seed, roll)


def _assessment(candidate: _Drawn) -> quality.Assessment:
    assert candidate.assessment is not None
    return candidate.assessment


def _passed(candidate: _Drawn) -> bool:
    return candidate.assessment is not None and candidate.assessment.passed


@dataclass
class _RunHashes:
    index: quality.DuplicateIndex
    since: datetime | None = None
    loaded: float = 0.0


class RunGates:
    """A worker's gates, one per run it draws: each run's recorded settings and its stored
    images' hashes, loaded from the ledger once and topped up every
    ``HASH_REFRESH_SECONDS``; ``clip``, where a CLIP model is configured, joins the checks
    of a run that did not choose its own (``default_checks``)."""

    def __init__(self, engine: Engine, clip: Any = None) -> None:
        self.engine = engine
        self.clip = clip
        """A ``worker.clip.ClipScorer``, or None."""
        self._hashes: dict[int, _RunHashes] = {}

    def roller(self, result: ledger.ClaimResult) -> Roller:
        """The roller for the claims' run; ItemError when its settings are bad."""
        run_id = result.claims[0].run_id
        try:
            gate = gate_from(result.quality)
        except ConfigError as exc:
            raise ItemError(f"run {result.run_name}'s quality settings: {exc}") from exc
        if self.clip is not None and result.quality.get("default_checks", True):
            gate = dataclasses.replace(gate, checks=(*gate.checks, "clip"))
        known = self._hashes.get(run_id)
        if known is None or time.monotonic() - known.loaded > HASH_REFRESH_SECONDS:
            known = known or _RunHashes(quality.DuplicateIndex())
            self._hashes[run_id] = known
            try:
                pairs, known.since = ledger.stored_hashes(self.engine, run_id, known.since)
                known.index.add(pairs)
                known.loaded = time.monotonic()
            except LedgerUnavailable as exc:  # checked against what is known; tried again
                log.warning("cannot load run %s's image hashes: %s", result.run_name, exc)
        scorer = None if self.clip is None else self.clip.score
        return Roller(gate, known.index, scorer)
