"""What a worker does while a service it needs is down: wait, keep what it drew, spend nothing.

:class:`Services` holds one :class:`~worker.breaker.Breaker` for the bucket and one for the
ledger, and every call the renderer makes to either goes through it:

- :meth:`Services.in_ledger` runs a ledger statement through short and long outages: one quick
  retry (the pool replaces a dropped connection), then the breaker opens and the call waits;
- :meth:`Services.upload` waits out a storage outage with the image in memory, and checks
  that the item is still the worker's before it writes the object;
- :meth:`Services.wait` holds a new message back while either service is down;
- a lease keeper renews the leases of drawn items until they are stored (behind a busy
  uploader, a slow disk or a storage outage), so the reconciler never hands a drawn image to
  another worker to draw again; an item still drawing is not renewed, so a hung device still
  loses its lease.

When the process stops, :meth:`Services.interrupt` releases every waiter with
:class:`~schemas.errors.Stopping`, so shutdown never waits for an outage to end.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger
from skufleet.schemas.errors import LedgerUnavailable, Stopping, StorageUnavailable
from skufleet.schemas.settings import Settings
from skufleet.worker.breaker import Breaker
from skufleet.worker.storage import Storage

T = TypeVar("T")


class Services:
    """The ledger and the bucket as the renderer sees them: behind circuit breakers."""

    def __init__(self, settings: Settings, engine: Engine, storage: Storage) -> None:
        self.settings = settings
        self.engine = engine
        self.storage = storage
        self.storage_breaker = Breaker("storage", storage.probe)
        self.ledger_breaker = Breaker("ledger", self._ping_ledger)
        self._held: dict[int, ledger.Claim] = {}
        """Drawn items waiting to be stored, whose leases the lease keeper renews."""
        self._held_lock = threading.Lock()
        threading.Thread(target=self._keep_leases, name="lease-keeper", daemon=True).start()

    @property
    def stopping(self) -> bool:
        return self.storage_breaker.stopping or self.ledger_breaker.stopping

    def interrupt(self) -> None:
        """The process is stopping: every waiter gives up with Stopping."""
        self.storage_breaker.stop()
        self.ledger_breaker.stop()

    def wait(self) -> None:
        """Block while the ledger or storage is down; Stopping if the process stops first."""
        for breaker in (self.ledger_breaker, self.storage_breaker):
            if not breaker.wait():
                raise Stopping(f"the worker is stopping while {breaker.name} is unavailable")

    def hold(self, claims: Sequence[ledger.Claim]) -> None:
        """These drawn items wait to be stored: keep their leases until they are."""
        with self._held_lock:
            self._held.update((claim.id, claim) for claim in claims)

    def unhold(self, claim: ledger.Claim) -> None:
        with self._held_lock:
            self._held.pop(claim.id, None)

    def in_ledger(self, write: Callable[[], T]) -> T:
        """Run a ledger statement, carried through outages (see the module docstring)."""
        failures = 0
        while True:
            try:
                return write()
            except LedgerUnavailable as exc:
                failures += 1
                if failures > 1:
                    self.ledger_breaker.trip(exc)
                    if not self.ledger_breaker.wait():
                        raise Stopping("the worker is stopping while the ledger is down") from exc

    def upload(
        self,
        claim: ledger.Claim,
        key: str,
        body: bytes,
        *,
        digest: str,
        content_type: str,
        metadata: Mapping[str, str],
    ) -> bool:
        """Upload, waiting out storage outages with the image kept in memory; False if the
        item stopped being ours meanwhile (then nothing is uploaded)."""
        renew = functools.partial(ledger.renew, self.engine, claim, self.settings.lease_seconds)
        while True:
            try:
                self.storage.put(
                    key, body, sha256_hex=digest, content_type=content_type, metadata=metadata
                )
                return True
            except StorageUnavailable as exc:
                self.storage_breaker.trip(exc)
            if not self.storage_breaker.wait():
                raise Stopping("the worker is stopping while storage is down")
            if not self.in_ledger(renew):  # still ours before its object is written?
                return False

    def _ping_ledger(self) -> None:
        with ledger.connect(self.engine) as conn:
            conn.execute(sa.text("SELECT 1"))

    def _keep_leases(self) -> None:
        interval = max(0.5, self.settings.lease_seconds / 3)
        while True:
            time.sleep(interval)
            if self.ledger_breaker.is_open:
                continue
            with self._held_lock:
                held = list(self._held.values())
            for claim in held:
                try:
                    ledger.renew(self.engine, claim, self.settings.lease_seconds)
                except LedgerUnavailable:
                    break  # the ledger breaker takes it from here
