"""Enqueue a catalogue: rows into the ledger first, then one message per batch of item ids."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

from sqlalchemy.engine import Engine

from producer.catalogue import Catalogue, Record, Reject, Tally
from producer.publish import Publisher
from producer.seed import derive_seed
from producer.template import DEFAULT_SHOT, PromptTemplate
from schemas import ledger
from schemas.errors import ConfigError, ItemError
from schemas.key import check_run_name
from schemas.names import render_queue
from schemas.params import GenerationParams, RenderPayload

PUBLISH_CHUNK = 1000
"""Items marked queued per ledger transaction before their messages are published."""


@dataclass
class EnqueueSummary:
    """What one enqueue did; ``accepted + rejected + duplicates == read``."""

    run: str
    model: str
    queue: str
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    new: int = 0
    """Items inserted into the ledger by this enqueue."""
    enqueued: int = 0
    """Items published for rendering by this enqueue."""
    messages: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass(frozen=True)
class EnqueueRequest:
    catalogue: Path
    run: str
    model: str
    seed: int = 0
    batch_size: int = 8
    params: GenerationParams = field(default_factory=GenerationParams)
    template: PromptTemplate = field(default_factory=PromptTemplate)
    encoding: str = "utf-8-sig"

    def __post_init__(self) -> None:
        check_run_name(self.run)
        if not 1 <= self.batch_size <= 1024:
            raise ConfigError(f"batch size must be 1-1024, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63-1, got {self.seed}")


def _items(
    catalogue: Catalogue,
    request: EnqueueRequest,
    tally: Tally,
    on_reject: Callable[[Reject], None],
) -> Iterator[ledger.NewItem]:
    """Ledger items for every accepted record; every outcome is counted in ``tally``."""
    for outcome in catalogue:
        if isinstance(outcome, Record):
            try:
                prompt, negative = request.template.render(outcome.fields)
            except ItemError as exc:
                outcome = Reject(outcome.number, outcome.line, "template", str(exc))
        tally.count(outcome)
        if isinstance(outcome, Reject):
            on_reject(outcome)
            continue
        yield ledger.NewItem(
            sku=outcome.sku,
            shot=DEFAULT_SHOT,
            prompt=prompt,
            negative_prompt=negative,
            seed=derive_seed(request.seed, outcome.sku, DEFAULT_SHOT),
            params=request.params,
        )


def enqueue(
    engine: Engine,
    publisher: Publisher,
    request: EnqueueRequest,
    *,
    queue_prefix: str,
    rejects: TextIO | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> EnqueueSummary:
    """Insert the catalogue's items into the ledger, then publish the pending ones.

    Items already in the run keep their row and status, so enqueuing the same run again
    publishes nothing for items that are queued, running or done.
    ``progress(stage, n)`` is called with ``("read", records)`` and ``("queued", items)``.
    """
    ledger.require_schema(engine)
    queue = render_queue(queue_prefix, request.model)
    summary = EnqueueSummary(run=request.run, model=request.model, queue=queue)
    tally = Tally()

    def on_reject(reject: Reject) -> None:
        if rejects is not None:
            rejects.write(json.dumps(reject.as_dict(), ensure_ascii=False) + "\n")

    # 1. rows into the ledger, in one transaction, thousands per statement
    with (
        Catalogue(request.catalogue, encoding=request.encoding) as catalogue,
        engine.begin() as conn,
    ):
        run_id = ledger.upsert_run(
            conn,
            request.run,
            request.model,
            request.seed,
            {**request.params.model_dump(), "batch_size": request.batch_size},
        )
        items = _items(catalogue, request, tally, on_reject)
        if progress is not None:
            items = _reporting(items, tally, progress)
        summary.new = ledger.insert_items(conn, run_id, items)
    summary.read, summary.accepted = tally.read, tally.accepted
    summary.rejected, summary.duplicates = tally.rejected, tally.duplicates
    summary.reasons = dict(tally.reasons)

    # 2. pending items → queued (committed) → published; only committed rows are announced
    with engine.connect() as conn:
        batches = ledger.pending_batches(conn, run_id, request.batch_size)
    for chunk in _chunked_batches(batches, PUBLISH_CHUNK):
        with engine.begin() as conn:
            queued = set(ledger.mark_queued(conn, [i for batch in chunk for i in batch]))
        payloads = [
            RenderPayload(
                run_id=run_id, model=request.model, item_ids=[i for i in batch if i in queued]
            )
            for batch in chunk
        ]
        payloads = [p for p in payloads if p.item_ids]
        try:
            publisher.publish(queue, payloads)
        except Exception:
            with engine.begin() as conn:
                ledger.unmark_queued(conn, sorted(queued))
            raise
        summary.enqueued += len(queued)
        summary.messages += len(payloads)
        if progress is not None:
            progress("queued", summary.enqueued)

    with engine.begin() as conn:
        ledger.record_enqueue(conn, run_id, summary.as_dict())
    return summary


def _reporting(
    items: Iterator[ledger.NewItem], tally: Tally, progress: Callable[[str, int], None]
) -> Iterator[ledger.NewItem]:
    for item in items:
        yield item
        if tally.read % 1000 == 0:
            progress("read", tally.read)
    progress("read", tally.read)


def _chunked_batches(batches: list[list[int]], items_per_chunk: int) -> Iterator[list[list[int]]]:
    chunk: list[list[int]] = []
    size = 0
    for batch in batches:
        chunk.append(batch)
        size += len(batch)
        if size >= items_per_chunk:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk
