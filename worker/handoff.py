"""Handing finished images to background threads, so the GPU never waits for the host.

The render loop draws batch n+1 while these threads encode and store batch n. The number
of images waiting is bounded: when storage falls behind, :meth:`Handoff.submit` blocks and
the GPU waits for it instead of piling up memory. Plain threads and no Celery, so the GPU
benchmark uses the same overlap as the worker.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


class Handoff:
    """A bounded pool of threads for per-image work (encode, upload, record)."""

    def __init__(self, threads: int = 4, max_pending: int = 64) -> None:
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="handoff")
        self._slots = threading.BoundedSemaphore(max_pending)
        self._pending = 0
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)

    def submit(self, job: Callable[[], None]) -> Future[None]:
        """Run ``job`` in the background; blocks while ``max_pending`` jobs are waiting."""
        self._slots.acquire()
        with self._lock:
            self._pending += 1
        try:
            return self._pool.submit(self._run, job)
        except BaseException:
            self._done()
            raise

    def _run(self, job: Callable[[], None]) -> None:
        try:
            job()
        except Exception:  # a job records its own failures; this is the last resort
            log.exception("background job failed")
        finally:
            self._done()

    def _done(self) -> None:
        with self._lock:
            self._pending -= 1
            if self._pending == 0:
                self._idle.notify_all()
        self._slots.release()

    @property
    def pending(self) -> int:
        return self._pending

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every submitted job has finished; False if ``timeout`` passed first."""
        with self._lock:
            return self._idle.wait_for(lambda: self._pending == 0, timeout)

    def close(self) -> None:
        """Finish every submitted job, then stop the threads."""
        self.drain()
        self._pool.shutdown(wait=True)


@dataclass
class BatchLog:
    """Collects a batch's background timings and logs one line when its last image is done."""

    run: str
    size: int
    drawn: dict[str, float]
    busy: float
    encode: float = 0.0
    upload: float = 0.0
    remaining: int = 0
    on_done: Callable[[], None] | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, encode: float, upload: float) -> None:
        with self.lock:
            self.encode += encode
            self.upload += upload
            self.remaining -= 1
            last = self.remaining == 0
        if last and self.on_done is not None:
            self.on_done()
        if last:
            stages = ", ".join(f"{k} {v:.2f}s" for k, v in self.drawn.items() if v >= 0.005)
            log.info(
                "run %s: batch of %d drawn in %.2fs (%s); encoded %.2fs, uploaded %.2fs in the "
                "background; GPU busy %.0f%% since the first batch",
                self.run,
                self.size,
                sum(self.drawn.values()),
                stages,
                self.encode,
                self.upload,
                100 * self.busy,
            )
