"""The ledger: the SQL tables that are the truth about every run and item, and the only
code that moves an item from one status to another.

Callers write ``from skufleet.schemas import ledger`` and ``ledger.claim(...)``; the parts:

- ``engine``: the engine, the schema check, and the one edge where database errors become
  LedgerUnavailable (:func:`translated`, :func:`begin`, :func:`connect`);
- ``transitions``: the item state machine as a table of named moves, which every
  status-changing statement reads;
- ``columns``: the column lists of ``items`` the statements share;
- ``intake``: a run and a catalogue's items merged into it, the items of SKUs it no longer
  has retired (producer);
- ``queueing``: pending items onto the queue, committed before they are published, and back;
- ``claims``: claiming items and settling them, fenced by attempt (workers);
- ``finishes``: a stored batch's finishes (and lease renewals) in one round trip;
- ``runs``: finding, cancelling, retrying and completing a run, and the objects of its
  retired items (operations);
- ``recovery``: expired leases and lost messages (the reconciler);
- ``review``: a run's stored images with their quality scores, and reviewers' decisions
  (approve, reject: drawn again with the next seed variant);
- ``reports``: counts, recent pace, retries and failures grouped by kind;
- ``manifest``: the records of a run's manifest and their JSON Schemas;
- ``outbox``: webhook events, recorded first and delivered after (``ledger.outbox``).

Two calling conventions, one per module, each stated in its docstring. ``claims``,
``finishes``, ``queueing`` and ``outbox`` take the Engine and commit their own
transactions: what a worker wins or settles, and what is about to be published, is
committed at once. ``intake``,
``runs``, ``review``, ``recovery`` and ``reports`` take a Connection, opened by the caller with
``ledger.begin(engine)`` (a transaction) or ``ledger.connect(engine)`` (a read), so that one
caller's statements commit together and database errors are translated at that one edge.
Everywhere ``run_id`` is a run's id and ``run_name`` its name.
"""

from skufleet.schemas.ledger import outbox
from skufleet.schemas.ledger.claims import (
    Claim,
    ClaimResult,
    Drawn,
    Gated,
    claim,
    fail,
    flag,
    release,
    renew,
    stored_hashes,
    unsigned64,
)
from skufleet.schemas.ledger.columns import CONTENT
from skufleet.schemas.ledger.engine import (
    begin,
    connect,
    create_engine,
    describe,
    require_schema,
    translated,
    unavailable,
    utcnow,
)
from skufleet.schemas.ledger.finishes import Finished, finish, finish_many, renew_many
from skufleet.schemas.ledger.intake import (
    ItemStaging,
    KeyCollision,
    Retirement,
    record_enqueue,
    upsert_run,
)
from skufleet.schemas.ledger.manifest import catalogue_fields, manifest
from skufleet.schemas.ledger.queueing import Queued, queue_pending, unmark_queued
from skufleet.schemas.ledger.recovery import (
    Stranded,
    expire_leases,
    queued_models,
    requeue_stale,
)
from skufleet.schemas.ledger.reports import (
    RunStatus,
    RunSummary,
    error_kind,
    failure_reasons,
    list_runs,
    missing_items,
    recent_finishes,
    retrying,
    run_status,
)
from skufleet.schemas.ledger.review import (
    DECISIONS,
    Decision,
    Reviewed,
    decide,
    decisions,
    find_items,
    reviewable,
)
from skufleet.schemas.ledger.runs import (
    cancel_run,
    complete_run,
    find_run_id,
    find_run_name,
    finished_runs,
    forget_objects,
    record_completion,
    reopen_run,
    retired_objects,
    retry_run,
    run_settings,
)
from skufleet.schemas.ledger.transitions import OPEN, TERMINAL, TRANSITIONS, Transition

__all__ = [
    "CONTENT",
    "DECISIONS",
    "OPEN",
    "TERMINAL",
    "TRANSITIONS",
    "Claim",
    "ClaimResult",
    "Decision",
    "Drawn",
    "Finished",
    "Gated",
    "ItemStaging",
    "KeyCollision",
    "Queued",
    "Retirement",
    "Reviewed",
    "RunStatus",
    "RunSummary",
    "Stranded",
    "Transition",
    "begin",
    "cancel_run",
    "catalogue_fields",
    "claim",
    "complete_run",
    "connect",
    "create_engine",
    "decide",
    "decisions",
    "describe",
    "error_kind",
    "expire_leases",
    "fail",
    "failure_reasons",
    "find_items",
    "find_run_id",
    "find_run_name",
    "finish",
    "finish_many",
    "finished_runs",
    "flag",
    "forget_objects",
    "list_runs",
    "manifest",
    "missing_items",
    "outbox",
    "queue_pending",
    "queued_models",
    "recent_finishes",
    "record_completion",
    "record_enqueue",
    "release",
    "renew",
    "renew_many",
    "reopen_run",
    "requeue_stale",
    "require_schema",
    "retired_objects",
    "retry_run",
    "retrying",
    "reviewable",
    "run_settings",
    "run_status",
    "stored_hashes",
    "translated",
    "unavailable",
    "unmark_queued",
    "unsigned64",
    "upsert_run",
    "utcnow",
]
