"""Quality-gate benchmark: how many bad images reach the bucket, and what the gate costs.

    python bench/quality.py                  # 500 items, 512×512, 30% of draws bad
    python bench/quality.py --smoke          # 40 items, 128×128: a few seconds

A stand-in for the model draws every image (no diffusers): deterministic per (prompt,
seed), so a re-roll at the item's next seed variant is a new draw. A share of the draws
(``--bad-share``) is bad, split evenly between

- ``black``: all but zero, half of them also marked non-finite (the fp16 VAE overflow);
- ``blank``: one colour with faint grain;
- ``duplicate``: a copy, slightly jittered (brightness, grain, a one-pixel shift), of an
  image delivered for another SKU earlier in the run;

the others are distinct, photograph-like images (smooth colour fields, shapes, grain). The
stand-in remembers what it made of every draw: that is the ground truth.

Each configuration draws the same items, in batches of 8, through ``worker.gate.Roller``
(the code the worker runs): without the gate (no checks: whatever is drawn is delivered),
with the default gate (re-rolls up to 2, one candidate), and with best-of-2. Per
configuration it reports items delivered as succeeded, bad images among them, items left
for review, renders per item, re-rolls, the checks' host time per image (``Rolled.
check_seconds``: hashing and every check), the host time to encode a stored image as the
worker does (``postprocess.process`` to PNG, then SHA-256; timed on a sample of the stored
images), and the checks' share of the host time (checks of every render, encoding of every
stored image).

Prints one JSON object and writes it to ``bench/results/quality-<date>.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import time
import zlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from skufleet.schemas.output import OutputSpec  # noqa: E402
from skufleet.worker import quality  # noqa: E402
from skufleet.worker.gate import Roller, Want  # noqa: E402
from skufleet.worker.pipeline import Batch, Job  # noqa: E402
from skufleet.worker.postprocess import process  # noqa: E402

BAD_KINDS = ("black", "blank", "duplicate")
BATCH = 8
NOISE_SEED = 20261204


@dataclass
class Drawn:
    """What the stand-in made of one draw."""

    sku: str
    kind: str
    """``good`` or one of :data:`BAD_KINDS`."""


@dataclass
class StandIn:
    """The model: draws an image per job, a share of them bad (see the module docstring).

    The kind and the pixels of a draw depend only on its prompt and seed; a duplicate copies
    one of the images delivered so far (:meth:`delivered`) for another SKU."""

    size: int
    bad_share: float
    prompts: dict[str, str]
    """Prompt → SKU."""
    truth: dict[tuple[str, int], Drawn] = field(default_factory=dict)
    pool: list[tuple[str, np.ndarray]] = field(default_factory=list)
    """Good images delivered so far, with their SKUs: what duplicates copy."""
    seconds: float = 0.0

    def __post_init__(self) -> None:
        # grain: crops of one noise field, so that drawing stays cheap
        noise = np.random.default_rng(NOISE_SEED).normal(0, 5, (2 * self.size, 2 * self.size, 3))
        self.noise = noise.astype(np.int16)
        ramp = np.linspace(0, 1, self.size, dtype=np.float32)
        self.coords = np.meshgrid(ramp, ramp, indexing="ij")

    def __call__(self, jobs: list[Job]) -> Batch:
        started = time.perf_counter()
        images, nonfinite = [], []
        for job in jobs:
            image, bad_output = self.draw(job)
            images.append(image)
            nonfinite.append(bad_output)
        seconds = time.perf_counter() - started
        self.seconds += seconds
        return Batch(np.stack(images), [False] * len(jobs), {"denoise": seconds}, nonfinite)

    def draw(self, job: Job) -> tuple[np.ndarray, bool]:
        sku = self.prompts[job.prompt]
        rng = np.random.default_rng([zlib.crc32(job.prompt.encode()), job.seed])
        kind = "good"
        if rng.random() < self.bad_share:
            kind = BAD_KINDS[int(rng.integers(len(BAD_KINDS)))]
        sources = [image for other, image in self.pool if other != sku]
        if kind == "duplicate" and not sources:
            kind = "black"  # nothing delivered yet to copy
        nonfinite = False
        if kind == "good":
            image = self.photograph(rng)
        elif kind == "black":
            image = rng.integers(0, 4, (self.size, self.size, 3), dtype=np.uint8)
            nonfinite = bool(rng.random() < 0.5)
        elif kind == "blank":
            colour = rng.integers(30, 226, 3).astype(np.int16)
            image = _pixels(colour + self.crop(rng) // 4)
        else:
            source = sources[int(rng.integers(len(sources)))]
            shifted = np.roll(source, tuple(rng.integers(-1, 2, 2)), axis=(0, 1))
            jitter = shifted.astype(np.int16) + int(rng.integers(-6, 7))
            image = _pixels(jitter + self.crop(rng) // 3)
        self.truth[(job.prompt, job.seed)] = Drawn(sku, kind)
        return image, nonfinite

    def photograph(self, rng: np.random.Generator) -> np.ndarray:
        """Smooth colour field from a random 5×5 grid, a few soft shapes, grain."""
        size = self.size
        weights = _bilinear(size, 5)
        grid = rng.uniform(0.1, 0.9, (5, 5, 3)).astype(np.float32)
        image = np.stack([weights @ grid[..., c] @ weights.T for c in range(3)], axis=-1)
        y, x = self.coords
        for _ in range(int(rng.integers(2, 6))):
            cy, cx, radius = rng.uniform(0.1, 0.9), rng.uniform(0.1, 0.9), rng.uniform(0.05, 0.25)
            top, bottom = int(max(0, cy - radius) * size), int(min(1, cy + radius) * size) + 1
            left, right = int(max(0, cx - radius) * size), int(min(1, cx + radius) * size) + 1
            box = (slice(top, bottom), slice(left, right))
            inside = (y[box] - cy) ** 2 + (x[box] - cx) ** 2 < radius * radius
            shade = rng.uniform(0, 1, 3).astype(np.float32)
            image[box][inside] = shade * (0.75 + 0.25 * y[box][inside][:, None])
        return _pixels((image * 255).astype(np.int16) + self.crop(rng))

    def crop(self, rng: np.random.Generator) -> np.ndarray:
        top, left = rng.integers(0, self.size, 2)
        return self.noise[top : top + self.size, left : left + self.size]

    def delivered(self, sku: str, prompt: str, seed: int, pixels: np.ndarray) -> None:
        if self.truth[(prompt, seed)].kind == "good":
            self.pool.append((sku, pixels))


def _pixels(values: np.ndarray) -> np.ndarray:
    return np.asarray(values.clip(0, 255), dtype=np.uint8)


_weights: dict[tuple[int, int], np.ndarray] = {}


def _bilinear(size: int, points: int) -> np.ndarray:
    """(size, points) weights that interpolate ``points`` control values linearly."""
    key = (size, points)
    if key not in _weights:
        position = np.linspace(0, points - 1, size)
        low = np.minimum(position.astype(int), points - 2)
        frac = position - low
        weights = np.zeros((size, points), np.float32)
        weights[np.arange(size), low] = 1 - frac
        weights[np.arange(size), low + 1] = frac
        _weights[key] = weights
    return _weights[key]


def run(
    name: str, gate: quality.Gate, items: int, size: int, bad_share: float, sample: int
) -> dict[str, Any]:
    """Draw ``items`` items through ``gate``; the figures of one configuration."""
    skus = [f"SKU-{n:05d}" for n in range(items)]
    wants = [
        Want(sku, f"studio photo of product {sku}", "blurry", 1000 + n)
        for n, sku in enumerate(skus)
    ]
    stand_in = StandIn(size, bad_share, {w.prompt: w.sku for w in wants})
    roller = Roller(gate, quality.DuplicateIndex())
    spec = OutputSpec()
    every = max(1, items // max(1, sample))
    bad_delivered = dict.fromkeys(BAD_KINDS, 0)
    counts = dict.fromkeys(
        ("succeeded", "needs_review", "bad_stored_for_review", "good_failed", "bad_passed"), 0
    )
    check_seconds = encode_seconds = 0.0
    renders = rerolls = encoded = encoded_bytes = 0
    started = time.perf_counter()
    for first in range(0, items, BATCH):
        batch = wants[first : first + BATCH]
        rolled = roller.draw(batch, stand_in)
        check_seconds += rolled.check_seconds
        renders += rolled.renders
        rerolls += rolled.rerolls
        for n, (want, kept) in enumerate(zip(batch, rolled.kept, strict=True), first):
            image = kept.gated.image
            for candidate in kept.gated.candidates:  # the gate's verdict against the truth
                good = stand_in.truth[(want.prompt, candidate.seed)].kind == "good"
                counts["good_failed"] += good and not candidate.passed
                counts["bad_passed"] += not good and candidate.passed
            kind = stand_in.truth[(want.prompt, image.seed)].kind
            if image.passed:
                counts["succeeded"] += 1
                if kind != "good":
                    bad_delivered[kind] += 1
            else:
                counts["needs_review"] += 1
                counts["bad_stored_for_review"] += kind != "good"
            stand_in.delivered(want.sku, want.prompt, image.seed, kept.pixels)
            if n % every == 0:  # encode as the worker stores: PNG with metadata, SHA-256
                meta = {"prompt": want.prompt, "seed": str(image.seed), "sku": want.sku}
                encode_started = time.perf_counter()
                body = process(Image.fromarray(kept.pixels), spec, meta).body
                hashlib.sha256(body).hexdigest()
                encode_seconds += time.perf_counter() - encode_started
                encoded += 1
                encoded_bytes += len(body)
    wall = time.perf_counter() - started
    draws = list(stand_in.truth.values())
    first_draws = [stand_in.truth[(w.prompt, quality.seed_variant(w.seed, 0))] for w in wants]
    check_ms = 1000 * check_seconds / renders
    encode_ms = 1000 * encode_seconds / encoded
    host_checks, host_encode = check_seconds, encode_seconds / encoded * items
    return {
        "configuration": name,
        "gate": {
            "checks": list(gate.checks),
            "max_rolls": gate.max_rolls,
            "candidates": gate.candidates,
        },
        "items": items,
        "delivered_as_succeeded": counts["succeeded"],
        "bad_delivered_as_succeeded": sum(bad_delivered.values()),
        "bad_delivered_by_kind": bad_delivered,
        "needs_review": counts["needs_review"],
        "bad_stored_for_review": counts["bad_stored_for_review"],
        "bad_first_draws": sum(d.kind != "good" for d in first_draws),
        "bad_draws": sum(d.kind != "good" for d in draws),
        "good_draws_failed": counts["good_failed"],
        "bad_draws_passed": counts["bad_passed"],
        "renders": renders,
        "renders_per_item": round(renders / items, 3),
        "rerolls": rerolls,
        "check_ms_per_image": round(check_ms, 3),
        "encode_sha256_ms_per_image": round(encode_ms, 2),
        "encoded_sample": encoded,
        "png_kb_per_image": round(encoded_bytes / encoded / 1024, 1),
        "checks_share_per_image": round(check_ms / (check_ms + encode_ms), 4),
        "checks_share_of_host_time": round(host_checks / (host_checks + host_encode), 4),
        "stand_in_draw_seconds": round(stand_in.seconds, 2),
        "wall_seconds": round(wall, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, help="items per configuration [500; smoke: 40]")
    parser.add_argument("--size", type=int, help="square image side [512; smoke: 128]")
    parser.add_argument("--bad-share", type=float, default=0.3, help="share of bad draws [0.3]")
    parser.add_argument(
        "--encode-sample", type=int, default=48, help="stored images encoded and timed [48]"
    )
    parser.add_argument(
        "--no-best-of-2", action="store_true", help="skip the best-of-2 configuration"
    )
    parser.add_argument("--smoke", action="store_true", help="40 items at 128×128")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    items = args.items or (40 if args.smoke else 500)
    size = args.size or (128 if args.smoke else 512)
    if items < 1 or size < 16 or not 0 <= args.bad_share <= 1:
        parser.error("--items must be at least 1, --size at least 16, --bad-share 0-1")
    started = time.perf_counter()
    configurations = [
        ("no gate", quality.Gate(checks=())),
        ("gate", quality.Gate(max_rolls=2, candidates=1)),
    ]
    if not args.no_best_of_2:
        configurations.append(("gate, best of 2", quality.Gate(max_rolls=2, candidates=2)))
    runs = []
    for name, gate in configurations:
        print(f"{name}: {items} items at {size}×{size} …", file=sys.stderr)
        runs.append(run(name, gate, items, size, args.bad_share, args.encode_sample))
        print(f"  {json.dumps(runs[-1])}", file=sys.stderr)
    gated = runs[1]
    result = {
        "benchmark": "quality",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "settings": {
            "items": items,
            "width": size,
            "height": size,
            "bad_share": args.bad_share,
            "bad_kinds": list(BAD_KINDS),
            "batch_size": BATCH,
            "encode": "postprocess.process to PNG (compress level 6) + SHA-256, as the worker "
            "stores, timed on a sample of the stored images",
        },
        "runs": runs,
        "targets": {
            "bad_delivered_with_gate": 0,
            "renders_per_item_with_gate": 1.5,
            "checks_share_of_host_time": 0.10,
        },
        "met": {
            "bad_delivered_with_gate": gated["bad_delivered_as_succeeded"] == 0,
            "renders_per_item_with_gate": gated["renders_per_item"] <= 1.5,
            "checks_share_of_host_time": gated["checks_share_of_host_time"] <= 0.10,
        },
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"quality-{datetime.now(UTC):%Y-%m-%d}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"written to {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
