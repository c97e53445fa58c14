"""What became of one render message, item by item, and the one line its task fails with.

:class:`Outcome` is plain data the renderer (``worker.render``) fills as it settles each
item it claimed; the task (``worker.tasks``) ends SUCCESS when :meth:`Outcome.problem` is
None and FAILURE with that line otherwise. Counting happens in one place, so Flower's
"succeeded" means the same as the ledger's.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from skufleet.schemas import ledger
from skufleet.schemas.errors import FatalError
from skufleet.schemas.label import clean

MAX_PROBLEM = 500
"""Characters of the reason a failed task shows at most."""


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


@dataclass
class Outcome:
    """What :meth:`Renderer.handle` did with a message, item by item.

    Every result of a message is data here; ``handle`` raises only :class:`Stopping`, when
    the process stops (or the device left the rotation) before the message's items were
    claimed: then the message goes back to the queue as it is."""

    claimed: int = 0
    drawn: int = 0
    stored: int = 0
    """Uploaded and recorded as succeeded."""
    refused: str | None = None
    """Why the message was not rendered at all (it does not match the ledger or this worker)."""
    fatal: FatalError | None = None
    """Set when the device cannot go on; its items were handed back to the fleet."""
    failed: list[tuple[ledger.Claim, str]] = field(default_factory=list)
    """Failed for good (or flagged), with the reason."""
    retried: list[tuple[ledger.Claim, str]] = field(default_factory=list)
    """Back on the queue after an error, in retry messages of their own, with the error."""
    taken_over: list[ledger.Claim] = field(default_factory=list)
    """No longer ours: the lease expired and another attempt holds the item."""
    released: list[ledger.Claim] = field(default_factory=list)
    """Handed back without spending an attempt: the device failed, or the worker stopped
    while storage or the ledger was down."""

    def problem(self) -> str | None:
        """Why the message's task fails, in one line naming how many items were not stored
        and the first reason; None when every item it claimed was stored, or it claimed
        none (a duplicate, or items already done or cancelled: nothing to do)."""
        if self.refused is not None:
            return f"message refused: {self.refused}"
        counts = [
            (len(self.failed), "failed for good"),
            (len(self.retried), "retried after an error"),
            (len(self.taken_over), "taken over by another attempt"),
            (len(self.released), "handed back"),
        ]
        missed = sum(n for n, _ in counts)
        if not missed and self.fatal is None:
            return None
        listed = ", ".join(f"{n} {what}" for n, what in counts if n)
        line = f"{missed} of {self.claimed} items not stored" + (f" ({listed})" if listed else "")
        if self.fatal is not None:
            line += f"; device out of rotation: {describe_error(self.fatal)}"
        first = (self.failed or self.retried)[:1]
        if first:
            claim, reason = first[0]
            line += f"; first: {clean(claim.sku, 40)} ({clean(claim.shot, 24)}): {reason}"
        line = " ".join(line.split())
        return line if len(line) <= MAX_PROBLEM else line[: MAX_PROBLEM - 1] + "…"
