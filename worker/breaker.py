"""Circuit breakers: a worker pauses while the storage or the ledger is down.

Without one, an outage of the bucket or the database makes every image of every batch fail
its upload or its ledger write: the GPU keeps drawing images nobody can keep, and items use
up their attempts for an outage that was not theirs.

A :class:`Breaker` guards one service. The first failure *of the service* (refused, reset,
timed out, a 5xx: never an error about one item) opens it; one probe thread then calls the
service's cheapest request with exponential backoff until it answers, and closes it. While
it is open:

- the render task waits before claiming, so the worker takes no new message (its Celery
  heartbeats go on: the GPU shows as online and idle in Flower);
- each image already drawn waits in memory (at most two batches, one per task thread) and
  is stored as soon as the service answers, its lease renewed meanwhile: no attempt is
  spent and no image is drawn again.

Plain threads, no Celery, so the renderer's tests drive it directly.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Breaker:
    """Open while ``probe()`` raises; closed again by the first probe that returns."""

    def __init__(
        self,
        name: str,
        probe: Callable[[], None],
        *,
        first_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> None:
        self.name = name
        self._probe = probe
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._closed = threading.Event()
        self._closed.set()
        self._lock = threading.Lock()
        self._opened_at = 0.0
        self._stopping = threading.Event()
        self.trips = 0
        """How many times the breaker opened (for logs and tests)."""

    @property
    def is_open(self) -> bool:
        return not self._closed.is_set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def trip(self, error: BaseException) -> None:
        """The service failed: open (if not open yet) and start probing it."""
        with self._lock:
            if not self._closed.is_set():
                return
            self._closed.clear()
            self._opened_at = time.monotonic()
            self.trips += 1
        log.warning("%s unavailable (%s); pausing until it answers", self.name, error)
        threading.Thread(
            target=self._probe_until_up, name=f"probe-{self.name}", daemon=True
        ).start()

    def wait(self, timeout: float | None = None) -> bool:
        """Block while open; True once closed, False on timeout or when stopping."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._closed.is_set():
            if self._stopping.is_set():
                return False
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self._closed.wait(min(1.0, left) if left is not None else 1.0)
        return True

    def stop(self) -> None:
        """Release every waiter: the process is shutting down and hands its work back."""
        self._stopping.set()

    def _probe_until_up(self) -> None:
        delay = self.first_delay
        while not self._stopping.is_set():
            time.sleep(delay)
            try:
                self._probe()
            except Exception as exc:  # any failure means: still down
                log.debug("%s probe failed: %s", self.name, exc)
                delay = min(self.max_delay, delay * 2)
                continue
            with self._lock:
                down = time.monotonic() - self._opened_at
                self._closed.set()
            log.warning("%s answers again after %.1fs; resuming", self.name, down)
            return
