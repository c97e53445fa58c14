"""The item state machine, written once: every move of an item's status, by name.

Each status-changing statement of the ledger takes the statuses it may start from (its
WHERE) and the status it leaves (its SET) from :data:`TRANSITIONS`, and nothing else moves
an item. ``ItemStatus``'s docstring lists the same table; ``tests/test_transitions.py``
checks the table against ``ItemStatus`` and against that list, and each statement against
the table, on PostgreSQL and SQLite.

``renew``, ``republish`` and ``change_queued`` leave the status as it is (a lease extended,
a lost message replaced, a queued item's content changed under its waiting message), but
they too may only start where the table says. The statuses an item rests in
(:data:`TERMINAL`) are left only by an explicit command: ``skufleet retry``, or an enqueue
that changes, retires or revives the item, or a review (``approve``, ``reject``).
"""

from __future__ import annotations

from dataclasses import dataclass

from skufleet.schemas.tables import ItemStatus

PENDING, QUEUED, RUNNING = ItemStatus.PENDING, ItemStatus.QUEUED, ItemStatus.RUNNING
SUCCEEDED, FAILED, CANCELLED = ItemStatus.SUCCEEDED, ItemStatus.FAILED, ItemStatus.CANCELLED
RETIRED, NEEDS_REVIEW = ItemStatus.RETIRED, ItemStatus.NEEDS_REVIEW


@dataclass(frozen=True)
class Transition:
    """One named move: an item in any of ``sources`` may go to one of ``targets``."""

    sources: tuple[ItemStatus, ...]
    """The statuses the move starts from: the WHERE of its statement."""
    targets: tuple[ItemStatus, ...]
    """The statuses it leaves; more than one when its statement chooses (``expire``)."""
    by: str
    """Who makes the move, and why."""
    command: bool = False
    """Made by an explicit command (``skufleet enqueue``, ``retry``, ``cancel``), never by
    the fleet (workers, the reconciler) on its own."""

    @property
    def target(self) -> ItemStatus:
        """The status the move leaves, for a move with one."""
        if len(self.targets) != 1:
            raise ValueError(f"the move leaves one of {self.targets}: name the one with to()")
        return self.targets[0]

    def to(self, status: ItemStatus) -> ItemStatus:
        """``status``, checked to be a target of the move: for statements that choose."""
        if status not in self.targets:
            raise ValueError(f"{status} is not a target of a move to {self.targets}")
        return status

    def narrowed(self, *statuses: ItemStatus) -> tuple[ItemStatus, ...]:
        """``statuses``, checked to be sources of the move: the WHERE of a statement that
        makes it from some of its sources only."""
        if not set(statuses) <= set(self.sources):
            raise ValueError(f"{statuses} are not all sources of a move from {self.sources}")
        return statuses


INITIAL = PENDING
"""The status a new item starts in."""

TRANSITIONS: dict[str, Transition] = {
    "queue": Transition(
        (PENDING,), (QUEUED,), "the producer, committed before publishing", command=True
    ),
    "unqueue": Transition((QUEUED,), (PENDING,), "the producer, publishing failed", command=True),
    "claim": Transition((QUEUED,), (RUNNING,), "a worker that won the item"),
    "renew": Transition((RUNNING,), (RUNNING,), "its worker, extending the lease"),
    "finish": Transition(
        (RUNNING,),
        (SUCCEEDED, NEEDS_REVIEW),
        "its worker, the image stored (needs review when its best roll failed a check)",
    ),
    "retry_error": Transition((RUNNING,), (QUEUED,), "its worker, a retryable error"),
    "fail": Transition((RUNNING,), (FAILED,), "its worker, a permanent error or the cap"),
    "flag": Transition((RUNNING,), (FAILED,), "its worker, the safety checker refused it"),
    "release": Transition((RUNNING,), (QUEUED,), "its worker, its device failed"),
    "expire": Transition(
        (RUNNING,), (QUEUED, FAILED), "the reconciler, the lease ran out (failed at the cap)"
    ),
    "republish": Transition((QUEUED,), (QUEUED,), "the reconciler, the message presumed lost"),
    "cancel": Transition(
        (PENDING, QUEUED), (CANCELLED,), "skufleet cancel (running items finish)", command=True
    ),
    "retry_run": Transition(
        (FAILED, CANCELLED), (PENDING,), "skufleet retry, with a fresh attempt budget", command=True
    ),
    "change": Transition(
        (PENDING, SUCCEEDED, NEEDS_REVIEW, FAILED, CANCELLED, RETIRED),
        (PENDING,),
        "an enqueue with a changed prompt, parameters or format (a retired item comes back)",
        command=True,
    ),
    "change_queued": Transition(
        (QUEUED,), (QUEUED,), "the same, while the item's message waits", command=True
    ),
    "retire": Transition(
        (PENDING, QUEUED, SUCCEEDED, NEEDS_REVIEW, FAILED, CANCELLED),
        (RETIRED,),
        "an enqueue whose catalogue no longer has the SKU (running items finish first)",
        command=True,
    ),
    "revive": Transition(
        (RETIRED,),
        (SUCCEEDED, NEEDS_REVIEW, PENDING),
        "an enqueue whose catalogue has the SKU again, unchanged: succeeded (needs review if "
        "its image failed the gate unapproved) while the ledger holds its object, else pending",
        command=True,
    ),
    "approve": Transition(
        (NEEDS_REVIEW,), (SUCCEEDED,), "a reviewer, the stored image is fine", command=True
    ),
    "reject": Transition(
        (SUCCEEDED, NEEDS_REVIEW),
        (PENDING,),
        "a reviewer, drawn again with the item's next seed variant",
        command=True,
    ),
}
"""Every move an item's status can make; nothing else moves one."""

OPEN = (PENDING, QUEUED, RUNNING)
"""Statuses the fleet has yet to move an item on from: a run with one is not complete."""
TERMINAL = (SUCCEEDED, NEEDS_REVIEW, FAILED, CANCELLED, RETIRED)
"""Statuses an item rests in, until an explicit command moves it."""
