"""A stand-in device for the fleet benchmark: a set time per image, photographs for pixels.

    python bench/standin.py --seconds-per-image 0.05 --size 512 --stats PATH -- \
        --model tiny --device cpu --name w0 [--metrics-port N]

runs a REAL worker process (``skufleet.worker.process``: Celery, the ledger, the quality
gate, encoding, uploads) whose pipeline is :class:`PhotoPipeline`:

- a batch of N images takes ``seconds_per_image`` × N of wall time, as a GPU does: the
  pixels are made first and the rest of the time is slept, which releases the GIL like a
  wait on CUDA does. A batch whose pixels take longer than that (an instant device) takes
  as long as the pixels;
- each image is a photograph (the colour samples scikit-image ships), chosen, cropped,
  scaled, mirrored and brightened by the job's seed, so every item gets a distinct picture
  that passes the worker's quality gate and compresses like real output (a 512×512 PNG of
  a photograph, not of flat colour). The photos are loaded and scaled once per process
  (:class:`PhotoSource`): making an image is a numpy crop and a lookup table, about a
  millisecond at 512×512;
- after every batch it writes its own accounting to ``--stats`` (JSON, replaced
  atomically): batches, images, device seconds, and the CPU seconds its own pixel-making
  cost this process, which the benchmark subtracts from the worker's CPU.

Only Pillow and numpy are needed for the pixels; scikit-image itself is never imported (its
``data`` folder is found on disk).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import threading
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from skufleet.worker.pipeline import Batch, Job  # noqa: E402

if TYPE_CHECKING:
    from skufleet.schemas.params import GenerationParams
    from skufleet.worker.pipeline import ImageModel, PipelineOptions

PHOTOS = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "rocket.jpg",
    "motorcycle_left.png",
    "motorcycle_right.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
)
"""The colour photographs of scikit-image's ``data`` folder."""
SCALES = (1.2, 1.45, 1.75, 2.1, 2.5)
"""Each photo is kept at these multiples of the size that just covers the output (and
mirrored); an image is a crop of one of them, so its field of view varies from most of the
photo to a sixth of it, and even a square photo has crops to choose from."""
BRIGHTNESS = (0.88, 1.12)
"""Gain range of the per-image brightness jitter."""


def photo_folder() -> Path:
    """scikit-image's ``data`` folder, found without importing scikit-image."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(
            "scikit-image is not installed: the fleet benchmark's photos are its sample "
            "images (pip install 'skufleet[dev]')"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    missing = [name for name in PHOTOS if not (folder / name).exists()]
    if missing:
        raise SystemExit(f"scikit-image's data folder {folder} lacks {', '.join(missing)}")
    return folder


class PhotoSource:
    """Photographs, pre-scaled once per output size, cut into distinct images by seed."""

    def __init__(self, folder: Path | None = None) -> None:
        folder = folder or photo_folder()
        self.photos = []
        for name in PHOTOS:
            with Image.open(folder / name) as opened:
                self.photos.append(opened.convert("RGB"))
        self._bases: dict[tuple[int, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self._lock = threading.Lock()

    def bases(self, height: int, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Every photo at every :data:`SCALES` for ``height``×``width`` output, as it is and
        mirrored left to right (made once: mirroring is the one orientation numpy cannot
        copy fast)."""
        key = (height, width)
        with self._lock:
            if key not in self._bases:
                made = []
                for photo in self.photos:
                    cover = max(width / photo.width, height / photo.height)
                    for scale in SCALES:
                        size = (
                            max(width, round(photo.width * cover * scale)),
                            max(height, round(photo.height * cover * scale)),
                        )
                        resized = photo.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
                        pixels = np.asarray(resized)
                        made.append((pixels, np.ascontiguousarray(pixels[:, ::-1])))
                self._bases[key] = made
            return self._bases[key]

    def image(
        self, seed: int, height: int, width: int, out: np.ndarray | None = None
    ) -> np.ndarray:
        """An (height, width, 3) uint8 photograph crop, the same for the same seed: one
        photo at one scale, a random window of it, mirrored or not, upside down or not,
        brightened or darkened a little. Written into ``out`` where given."""
        rng = np.random.default_rng(zlib.crc32(f"standin:{seed}".encode()))
        bases = self.bases(height, width)
        base = bases[int(rng.integers(len(bases)))][int(rng.integers(2))]
        top = int(rng.integers(base.shape[0] - height + 1))
        left = int(rng.integers(base.shape[1] - width + 1))
        crop = base[top : top + height, left : left + width]
        if rng.random() < 0.5:
            crop = crop[::-1]  # rows in reverse: a fast copy, unlike a mirror
        gain = rng.uniform(*BRIGHTNESS)
        lut = np.clip(np.arange(256, dtype=np.float32) * gain + 0.5, 0, 255).astype(np.uint8)
        if out is None:
            out = np.empty((height, width, 3), np.uint8)
        return np.take(lut, crop, out=out)


class PhotoPipeline:
    """The worker's ``ImageModel``: ``seconds_per_image`` a picture, photographs for pixels
    (see the module docstring)."""

    def __init__(
        self,
        model: str,
        seconds_per_image: float,
        *,
        source: PhotoSource | None = None,
        stats: Path | None = None,
    ) -> None:
        self.model = model
        self.seconds_per_image = seconds_per_image
        self.source = source or PhotoSource()
        self.stats_path = stats
        self.batches = 0
        self.images = 0
        self.device_seconds = 0.0
        self.pixel_cpu_seconds = 0.0
        self.first_start: float | None = None
        self.last_end: float | None = None
        self.gaps: list[float] = []
        """Seconds the device sat idle between one batch and the next."""

    def describe_device(self) -> str:
        return f"stand-in ({1000 * self.seconds_per_image:g} ms per image)"

    def free_memory(self) -> None:
        pass

    def render(self, jobs: Sequence[Job], params: GenerationParams) -> Batch:
        started = time.perf_counter()
        cpu = time.thread_time()
        images = np.empty((len(jobs), params.height, params.width, 3), np.uint8)
        for index, job in enumerate(jobs):
            self.source.image(job.seed, params.height, params.width, out=images[index])
        self.pixel_cpu_seconds += time.thread_time() - cpu
        remaining = self.seconds_per_image * len(jobs) - (time.perf_counter() - started)
        if remaining > 0:
            time.sleep(remaining)  # the device works; the GIL is free meanwhile
        ended = time.perf_counter()
        if self.last_end is not None:
            self.gaps.append(started - self.last_end)
        self.first_start = started if self.first_start is None else self.first_start
        self.last_end = ended
        self.batches += 1
        self.images += len(jobs)
        self.device_seconds += ended - started
        self._write_stats()
        return Batch(images, [False] * len(jobs), {"denoise": ended - started})

    def stats(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "seconds_per_image": self.seconds_per_image,
            "batches": self.batches,
            "images": self.images,
            "device_seconds": self.device_seconds,
            "pixel_cpu_seconds": self.pixel_cpu_seconds,
            "first_start": self.first_start,
            "last_end": self.last_end,
            "gaps": [round(gap, 5) for gap in self.gaps],
            "profile": {
                name: {"calls": calls, "wall_seconds": wall, "cpu_seconds": cpu}
                for name, (calls, wall, cpu) in PROFILE.items()
            },
        }

    def _write_stats(self) -> None:
        if self.stats_path is None:
            return
        partial = self.stats_path.with_name(self.stats_path.name + ".part")
        partial.write_text(json.dumps(self.stats()))
        partial.replace(self.stats_path)


PROFILED = (
    ("skufleet.schemas.ledger", None, "claim"),
    ("skufleet.worker.gate", "Roller", "_assess"),
    ("skufleet.worker.store", "Store", "_encode"),
    ("skufleet.worker.store", "Store", "_upload"),
    ("skufleet.schemas.ledger", None, "renew_many"),
    ("skufleet.schemas.ledger", None, "finish_many"),
)
"""The worker's steps :func:`profile` times: the claim and the quality checks (both while
the device is held), then the storing of each image (encode, upload) and of each batch
(leases renewed, finishes recorded)."""
PROFILE: dict[str, list[Any]] = {}
"""Step → [calls, wall seconds, CPU seconds of the calling thread]."""
_PROFILE_LOCK = threading.Lock()


def profile() -> None:
    """Wrap each of :data:`PROFILED` that this checkout has, by name, to count its calls
    and sum their wall and thread CPU time (a microsecond or two a call). A step the worker
    no longer has is left out of the figures."""
    import functools
    import importlib

    for module_name, class_name, name in PROFILED:
        owner: Any = importlib.import_module(module_name)
        if class_name is not None:
            owner = getattr(owner, class_name, None)
        step = getattr(owner, name, None)
        if step is None:
            continue

        def timed(*args: Any, _step: Any = step, _name: str = name, **kwargs: Any) -> Any:
            started, cpu = time.perf_counter(), time.thread_time()
            try:
                return _step(*args, **kwargs)
            finally:
                wall, used = time.perf_counter() - started, time.thread_time() - cpu
                with _PROFILE_LOCK:
                    entry = PROFILE.setdefault(_name, [0, 0.0, 0.0])
                    entry[0] += 1
                    entry[1] += wall
                    entry[2] += used

        setattr(owner, name, functools.wraps(step)(timed))


def main() -> int:
    from skufleet.worker import process

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds-per-image", type=float, default=0.0)
    parser.add_argument(
        "--size", type=int, default=512, help="output size to pre-scale the photos for"
    )
    parser.add_argument("--stats", type=Path, help="where to write the stand-in's accounting")
    parser.add_argument(
        "--profile", action="store_true", help="time the worker's steps (see profile())"
    )
    args, rest = parser.parse_known_args()
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.profile:
        profile()
    source = PhotoSource()
    source.bases(args.size, args.size)  # before the worker starts: not in what is measured

    def load(model: str, device: str, cache_dir: Path, options: PipelineOptions) -> ImageModel:
        return PhotoPipeline(model, args.seconds_per_image, source=source, stats=args.stats)

    return process.main(rest, load=load)


if __name__ == "__main__":
    sys.exit(main())
