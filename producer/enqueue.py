"""Enqueue a catalogue: rows into the ledger first, then one message per batch of item ids.

1. stream the catalogue, render each row's shots from the template pack, and stage the
   items in a temporary table, thousands of rows per statement;
2. merge the staged items into the run in a few set-based statements: insert the new ones,
   update the changed ones (prompt or parameters differ) back to pending, and count the
   rest, so re-enqueuing an updated catalogue renders only what is new or changed. Each
   item's object key is fixed here; a record with an item whose key another item of the
   run has is rejected (``key_collision``), naming both SKUs, before the merge. Items of
   SKUs the catalogue no longer has are ``retired`` (out of the manifest; their objects
   kept, or deleted after step 3 with ``prune``); a retired SKU that comes back is revived;
3. mark pending items queued, commit, and publish their messages: only committed rows are
   ever announced to the workers.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from sqlalchemy.engine import Engine

from skufleet.producer import downstream
from skufleet.producer.bucket import Bucket
from skufleet.producer.catalogue import Catalogue, Record, Reject, Tally
from skufleet.producer.publish import Publisher
from skufleet.producer.seed import derive_seed
from skufleet.producer.template import Rendered, TemplatePack
from skufleet.producer.tokens import count_tokens
from skufleet.schemas import gate, ledger
from skufleet.schemas.errors import ConfigError, ItemError, NothingAccepted
from skufleet.schemas.key import check_run_name
from skufleet.schemas.names import render_queue
from skufleet.schemas.params import DEFAULT_BATCH_SIZE, Layered, RenderPayload, layer
from skufleet.schemas.vocab import MAX_TOKENS

STAGE_CHUNK = 1000
"""Catalogue records rendered, token-checked and staged per statement."""
PUBLISH_CHUNK = 4000
"""Items queued per ledger transaction, then published, before the next chunk."""

Progress = Callable[[str, int], None]


@dataclass
class EnqueueSummary:
    """What one enqueue did. ``accepted + rejected + duplicates == read`` (records), and
    ``new + changed + unchanged + in_flight == items`` (one item per accepted record and shot).
    """

    run: str
    model: str
    template: str
    queue: str
    read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    items: int = 0
    new: int = 0
    changed: int = 0
    """Items whose prompt or parameters changed since the last enqueue: rendered again."""
    unchanged: int = 0
    in_flight: int = 0
    """Changed items a worker is rendering right now: left alone; enqueue again later."""
    missing: int = 0
    """SKUs of the run this catalogue no longer has: their items are retired."""
    missing_skus: list[str] = field(default_factory=list)
    """The first of them (at most ``ledger.intake.MISSING_SAMPLE``)."""
    retired: int = 0
    """Items retired by this enqueue: out of the manifest, objects kept unless pruned."""
    missing_in_flight: int = 0
    """Items of missing SKUs a worker renders now: left to finish; enqueue again later."""
    revived: int = 0
    """Retired items whose SKU is back unchanged (a changed one counts as changed)."""
    pruned: int = 0
    """Objects of the run's retired items deleted from the bucket (``prune``)."""
    long_prompts: int = 0
    """Items whose prompt or negative prompt exceeds CLIP's 77 tokens (cut by SD 1.5)."""
    enqueued: int = 0
    """Items published for rendering by this enqueue."""
    messages: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    quality: dict[str, Any] = field(default_factory=dict)
    """The run's quality-gate settings as stored (``schemas.gate.resolve``)."""

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class EnqueueRequest:
    catalogue: Path
    run: str
    model: str
    seed: int = 0
    batch_size: int = DEFAULT_BATCH_SIZE
    pack: TemplatePack = field(default_factory=TemplatePack.default)
    overrides: dict[str, Any] = field(default_factory=dict)
    """Generation parameters given on the command line; they win over the pack's."""
    quality: dict[str, Any] = field(default_factory=dict)
    """Quality-gate settings given on the command line (``schemas.gate.from_flags``); they
    win over the pack's ``[quality]``."""
    prune: bool = False
    """Delete the objects of the run's retired items from the bucket."""
    encoding: str = "utf-8"
    delimiter: str | None = None
    """The catalogue's field delimiter; None takes the one its header line uses."""

    def __post_init__(self) -> None:
        check_run_name(self.run)
        if not 1 <= self.batch_size <= 1024:
            raise ConfigError(f"batch size must be 1-1024, got {self.batch_size}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be between 0 and 2**63-1, got {self.seed}")
        self.gate()  # a threshold for a check the run does not make, found before the ledger

    def gate(self) -> dict[str, Any]:
        """The run's quality-gate settings: defaults < the pack's < the flags'."""
        return gate.resolve(self.pack.quality, self.quality)


class _Parameters:
    """Item columns from a shot's keys: generation parameters and the output spec, each
    distinct set layered (``schemas.params.layer``) and validated once."""

    def __init__(self, request: EnqueueRequest) -> None:
        self.request = request
        self.cache: dict[tuple[tuple[str, Any], ...], tuple[dict[str, Any], Layered]] = {}

    def _resolve(self, rendered: Rendered) -> tuple[dict[str, Any], Layered]:
        key = tuple(sorted(rendered.params.items()))
        found = self.cache.get(key)
        if found is None:
            request = self.request
            layered = layer(
                request.model,
                pack=request.pack.params,
                shot=rendered.params,
                flags=request.overrides,
                context=f"{request.pack.source}: shot {rendered.shot!r} gives invalid parameters",
            )
            found = self.cache[key] = (layered.params.model_dump(), layered)
        return found

    def __call__(self, rendered: Rendered, fields: dict[str, str]) -> dict[str, Any]:
        """The item's parameter columns and its ``output`` JSON for one row and shot."""
        params, layered = self._resolve(rendered)
        labels: tuple[str, ...] = ()
        column = layered.output.get("labels")
        if column is not None:
            if column not in fields:
                raise ItemError(f"labels column {column!r} is not in the catalogue")
            labels = tuple(p.strip() for p in fields[column].split(";") if p.strip())
        try:
            spec = layered.spec(labels)
        except ValueError as exc:
            raise ItemError(f"column {column!r}: {exc}") from exc
        return {**params, "output": spec.to_json()}


def _chunks(values: Iterable[Any], size: int) -> Iterator[list[Any]]:
    chunk: list[Any] = []
    for value in values:
        chunk.append(value)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class _Stager:
    """Turns catalogue records into staged item rows, reporting every reject and long prompt."""

    def __init__(self, request: EnqueueRequest, report: TextIO | None) -> None:
        self.request = request
        self.report = report
        self.params = _Parameters(request)
        self.tally = Tally()
        self.items = 0
        self.long_prompts = 0
        self.kept: list[str] = []
        """SKUs of rejected records since :meth:`kept_skus`: still in the catalogue."""

    def kept_skus(self) -> list[str]:
        kept, self.kept = self.kept, []
        return kept

    def _fields(self, row: dict[str, str]) -> str:
        """The catalogue fields of the record's manifest lines: its title, its category
        and the pack's ``manifest_columns`` (None where the row lacks one or it is empty)."""
        pack = self.request.pack
        return ledger.catalogue_fields(
            row["title"],
            row.get(pack.category_column) or None,
            {name: row.get(name) or None for name in pack.manifest_columns},
        )

    def _write(self, entry: dict[str, Any]) -> None:
        if self.report is not None:
            self.report.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def _render(self, record: Record) -> list[tuple[Rendered, dict[str, Any]]] | Reject:
        pack = self.request.pack
        try:
            pack.category_for(record.fields)
        except ItemError as exc:
            return Reject(record.number, record.line, "unknown_category", str(exc))
        try:
            return [(shot, self.params(shot, record.fields)) for shot in pack.render(record.fields)]
        except ItemError as exc:
            return Reject(record.number, record.line, "template", str(exc))

    def rows(self, records: list[Record | Reject]) -> list[dict[str, Any]]:
        """Staging rows for one chunk of catalogue outcomes."""
        rows: list[dict[str, Any]] = []
        origins: list[Record] = []
        for outcome in records:
            shots = self._render(outcome) if isinstance(outcome, Record) else outcome
            if isinstance(shots, Reject):
                self.tally.count(shots)
                self._write(shots.as_dict())
                if isinstance(outcome, Record):  # rejected, yet its SKU is in the catalogue
                    self.kept.append(outcome.sku)
                continue
            self.tally.count(outcome)
            assert isinstance(outcome, Record)
            fields = self._fields(outcome.fields)
            for shot, params in shots:
                rows.append(
                    {
                        "record": outcome.number,
                        "line": outcome.line,
                        "sku": outcome.sku,
                        "shot": shot.shot,
                        "prompt": shot.prompt,
                        "negative_prompt": shot.negative,
                        "seed": derive_seed(self.request.seed, outcome.sku, shot.shot),
                        "fields": fields,
                        **params,
                    }
                )
                origins.append(outcome)
        self._check_tokens(rows, origins)
        self.items += len(rows)
        return rows

    def reject_collisions(self, collisions: list[ledger.KeyCollision], dropped: int) -> None:
        """Count and report records unstaged because an item's object key was taken; they
        were counted as accepted when read. ``dropped``: their staged items."""
        for found in collisions:
            other = (
                f"record {found.other_record}"
                if found.other_record is not None
                else "an item already in the run"
            )
            reject = Reject(
                found.record,
                found.line or 0,
                "key_collision",
                f"SKU {found.sku!r} shot {found.shot!r} would be stored at {found.key!r}, the "
                f"object key of SKU {found.other_sku!r} shot {found.other_shot!r} ({other}); "
                "no image may replace another's",
            )
            self.tally.read -= 1  # counted again, as rejected
            self.tally.accepted -= 1
            self.tally.count(reject)
            self._write(reject.as_dict())
        self.items -= dropped

    def _check_tokens(self, rows: list[dict[str, Any]], origins: list[Record]) -> None:
        """Report prompts SD 1.5 would cut at 77 tokens; the items are kept."""
        counts = count_tokens(
            [row["prompt"] for row in rows] + [row["negative_prompt"] for row in rows]
        )
        for i, (row, record) in enumerate(zip(rows, origins, strict=True)):
            too_long = [
                (kind, count)
                for kind, count in (
                    ("prompt", counts[i]),
                    ("negative prompt", counts[len(rows) + i]),
                )
                if count.too_long
            ]
            if not too_long:
                continue
            self.long_prompts += 1
            detail = "; ".join(
                f"{kind} of shot {row['shot']!r} has {count.tokens} tokens, SD 1.5 reads "
                f"{MAX_TOKENS} and drops {count.cut!r}"
                for kind, count in too_long
            )
            self._write(
                {
                    "record": record.number,
                    "line": record.line,
                    "reason": "prompt_too_long",
                    "detail": detail,
                    "accepted": True,
                }
            )


def publish_pending(
    engine: Engine,
    publisher: Publisher,
    run_id: int,
    model: str,
    queue: str,
    batch_size: int,
    progress: Progress | None = None,
) -> tuple[int, int]:
    """Mark the run's pending items queued and publish them, a committed chunk at a time;
    ``(items, messages)``.

    If publishing a chunk fails, its items go back to pending (later chunks were never
    touched), so nothing is left queued without a message.
    """
    items = messages = 0
    for chunk in ledger.queue_pending(engine, run_id, batch_size, PUBLISH_CHUNK):
        batches = chunk.batches
        try:
            publisher.publish(
                queue,
                [RenderPayload(run_id=run_id, model=model, item_ids=ids) for ids in batches],
                [chunk.label(ids) for ids in batches],
            )
        except BaseException:
            ledger.unmark_queued(engine, [i for batch in batches for i in batch])
            raise
        items += sum(len(batch) for batch in batches)
        messages += len(batches)
        if progress is not None:
            progress("queued", items)
    return items, messages


def enqueue(
    engine: Engine,
    publisher: Publisher,
    request: EnqueueRequest,
    *,
    queue_prefix: str,
    report: TextIO | None = None,
    progress: Progress | None = None,
    bucket: Bucket | None = None,
) -> EnqueueSummary:
    """Stage, merge and publish a catalogue (see the module docstring).

    ``report`` receives one JSON line per rejected record (duplicates included) and per
    accepted record whose prompt is too long. ``progress(stage, n)`` is called with
    ``("read", records)`` and ``("queued", items)``. ``bucket``: where ``request.prune``
    deletes the retired items' objects.
    """
    if request.prune and bucket is None:
        raise ConfigError("pruning retired items' objects needs the bucket")
    ledger.require_schema(engine)
    queue = render_queue(queue_prefix, request.model)
    summary = EnqueueSummary(
        run=request.run,
        model=request.model,
        template=request.pack.name,
        queue=queue,
        quality=request.gate(),
    )
    stager = _Stager(request, report)

    # 1. stage the catalogue, 2. merge it into the run, in one transaction
    with (
        Catalogue(
            request.catalogue,
            encoding=request.encoding,
            columns=request.pack.columns,
            delimiter=request.delimiter,
        ) as catalogue,
        ledger.begin(engine) as conn,
    ):
        run_id = ledger.upsert_run(
            conn,
            request.run,
            request.model,
            request.seed,
            request.pack.name,
            {**request.overrides, "batch_size": request.batch_size, "quality": summary.quality},
        )
        staging = ledger.ItemStaging(conn, run_id)
        for chunk in _chunks(catalogue, STAGE_CHUNK):
            staging.add(stager.rows(chunk))
            staging.keep(stager.kept_skus())
            if progress is not None:
                progress("read", stager.tally.read)
        stager.reject_collisions(*staging.drop_collisions())
        if stager.tally.accepted == 0:  # leaving the block rolls the run back: none is made
            tally = stager.tally
            raise NothingAccepted(
                f"no record of {request.catalogue} was accepted ({tally.read:,} read, "
                f"{tally.rejected:,} rejected, {tally.duplicates:,} duplicates): nothing was "
                f"enqueued and run {request.run!r} was not created or changed"
            )
        retirement = staging.retire_missing()
        summary.new, summary.changed, summary.in_flight = staging.merge()
    summary.missing, summary.missing_skus = retirement.missing, retirement.sample
    summary.retired, summary.missing_in_flight = retirement.retired, retirement.in_flight
    summary.revived = staging.revived

    tally = stager.tally
    summary.read, summary.accepted = tally.read, tally.accepted
    summary.rejected, summary.duplicates = tally.rejected, tally.duplicates
    summary.reasons = dict(tally.reasons)
    summary.items, summary.long_prompts = stager.items, stager.long_prompts
    summary.unchanged = summary.items - summary.new - summary.changed - summary.in_flight

    # 3. pending items → queued (committed) → published
    summary.enqueued, summary.messages = publish_pending(
        engine, publisher, run_id, request.model, queue, request.batch_size, progress
    )
    if request.prune and bucket is not None:
        summary.pruned = downstream.prune_retired(engine, bucket, run_id)
    with ledger.begin(engine) as conn:
        ledger.record_enqueue(conn, run_id, summary.as_dict())
    return summary


def retry(
    engine: Engine, publisher: Publisher, name: str, *, failed_only: bool, queue_prefix: str
) -> dict[str, Any]:
    """Put a run's failed (and cancelled) items back to pending and publish them."""
    with ledger.begin(engine) as conn:
        run_id = ledger.find_run_id(conn, name)
        model, batch_size = ledger.run_settings(conn, run_id)
        retried = ledger.retry_run(conn, run_id, failed_only=failed_only)
    enqueued, messages = publish_pending(
        engine, publisher, run_id, model, render_queue(queue_prefix, model), batch_size
    )
    return {"run": name, "retried": retried, "enqueued": enqueued, "messages": messages}
