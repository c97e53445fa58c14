"""The item state machine: its table, checked against ItemStatus, and every status-changing
statement of the ledger held to the table on PostgreSQL and SQLite."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import sqlalchemy as sa

from skufleet.schemas import ledger
from skufleet.schemas.ledger.transitions import INITIAL, OPEN, TERMINAL, TRANSITIONS, Transition
from skufleet.schemas.params import GenerationParams
from skufleet.schemas.tables import Item, ItemStatus
from tests.test_ledger import finish, item

QUEUED, FAILED = ItemStatus.QUEUED, ItemStatus.FAILED
LONG_AGO = datetime(2000, 1, 1, tzinfo=UTC)


def edges() -> set[tuple[ItemStatus, ItemStatus]]:
    return {
        (source, target)
        for move in TRANSITIONS.values()
        for source in move.sources
        for target in move.targets
    }


def reachable(start: ItemStatus) -> set[ItemStatus]:
    found, frontier = {start}, [start]
    while frontier:
        status = frontier.pop()
        for source, target in edges():
            if source == status and target not in found:
                found.add(target)
                frontier.append(target)
    return found


# --- the table ----------------------------------------------------------------------------


def test_the_table_names_only_statuses_of_item_status() -> None:
    """Every move starts from and leads to known statuses, each named once."""
    for name, move in TRANSITIONS.items():
        assert move.sources and move.targets, name
        for status in (*move.sources, *move.targets):
            assert isinstance(status, ItemStatus), (name, status)
        assert len(set(move.sources)) == len(move.sources), name
        assert len(set(move.targets)) == len(move.targets), name


def test_every_status_is_reachable_from_a_new_item() -> None:
    """A new item is pending, and some sequence of moves leads it to each status."""
    assert INITIAL is ItemStatus.PENDING
    assert reachable(INITIAL) == set(ItemStatus)


def test_open_and_terminal_statuses_split_the_statuses_and_open_ones_can_come_to_rest() -> None:
    """Every status is open or terminal, not both, and an open item can always end."""
    assert set(OPEN) | set(TERMINAL) == set(ItemStatus)
    assert not set(OPEN) & set(TERMINAL)
    for status in OPEN:
        assert reachable(status) & set(TERMINAL), status


def test_only_explicit_commands_move_an_item_out_of_a_terminal_status() -> None:
    """Succeeded, failed, cancelled and retired items are left alone by workers and the
    reconciler: only a retry or an enqueue (changing, retiring or reviving them) moves them."""
    leaving = {name for name, move in TRANSITIONS.items() if set(move.sources) & set(TERMINAL)}
    assert leaving == {"retry_run", "change", "retire", "revive", "approve", "reject"}
    assert all(TRANSITIONS[name].command for name in leaving)


def test_a_move_with_two_targets_makes_one_it_names() -> None:
    """``target`` is for moves with one; ``to`` and ``narrowed`` refuse statuses the move
    does not have, so a statement cannot pick one the table does not allow."""
    expire = TRANSITIONS["expire"]
    with pytest.raises(ValueError, match="name the one"):
        _ = expire.target
    assert expire.to(FAILED) is FAILED
    with pytest.raises(ValueError, match="not a target"):
        expire.to(ItemStatus.SUCCEEDED)
    with pytest.raises(ValueError, match="not all sources"):
        TRANSITIONS["retry_run"].narrowed(ItemStatus.SUCCEEDED)


def test_item_status_lists_the_same_moves_as_the_table() -> None:
    """ItemStatus's docstring repeats the table, move by move, and says nothing else."""
    doc = ItemStatus.__doc__ or ""
    listed = {
        match[1]: (set(match[2].split(" | ")), set(match[3].split(" | ")))
        for match in re.finditer(
            r"^\s+([a-z_]+)\s+([a-z_ |]+?) → ([a-z_ |]+?)(?:\s{2,}.*)?$", doc, re.MULTILINE
        )
    }
    assert listed == {
        name: ({s.value for s in move.sources}, {t.value for t in move.targets})
        for name, move in TRANSITIONS.items()
    }


# --- the statements -----------------------------------------------------------------------


def one_per_status(engine: sa.Engine) -> tuple[int, list[int]]:
    """Run ``t`` of model tiny with one item in each status (sku = the status), each with
    one attempt made, its lease run out, queued long ago and last updated long ago."""
    with ledger.begin(engine) as conn:
        run_id = ledger.upsert_run(conn, "t", "tiny", 1, "ecommerce", {})
        staging = ledger.ItemStaging(conn, run_id)
        staging.add([item(status.value, "p") for status in ItemStatus])
        staging.merge()
        for status in ItemStatus:
            conn.execute(
                sa.update(Item)
                .where(Item.sku == status.value)
                .values(
                    status=status,
                    attempts=1,
                    attempts_before_retry=0,
                    worker="w1",
                    lease_expires_at=LONG_AGO,
                    queued_at=LONG_AGO,
                    updated_at=LONG_AGO,
                )
            )
        ids = list(conn.execute(sa.select(Item.id).order_by(Item.id)).scalars())
    return run_id, ids


def items(engine: sa.Engine) -> dict[str, tuple[ItemStatus, Any]]:
    """sku → (status, updated_at) of every item."""
    with ledger.connect(engine) as conn:
        rows = conn.execute(sa.select(Item.sku, Item.status, Item.updated_at)).all()
    return {r.sku: (ItemStatus(r.status), r.updated_at) for r in rows}


def held(engine: sa.Engine, item_id: int) -> ledger.Claim:
    """The claim a worker would hold on the item as it stands now."""
    with ledger.connect(engine) as conn:
        r = conn.execute(sa.select(Item.__table__).where(Item.id == item_id)).one()
    return ledger.Claim(
        id=r.id,
        run_id=r.run_id,
        run_name="t",
        sku=r.sku,
        shot=r.shot,
        prompt=r.prompt,
        negative_prompt=r.negative_prompt,
        seed=r.seed,
        params=GenerationParams(
            **{name: getattr(r, name) for name in GenerationParams.model_fields}
        ),
        output=r.output,
        object_key=r.object_key,
        attempt=r.attempts,
        attempts_before_retry=r.attempts_before_retry,
        next_roll=r.next_roll,
    )


def failing_gate(claim: ledger.Claim) -> ledger.Gated:
    """The gate's record of two candidates that both failed the ``blank`` check."""
    scores = {"blank": {"score": 0.0, "threshold": 0.02, "passed": False}}
    drawn = tuple(
        ledger.Drawn(roll, claim.seed + roll, scores, passed=False, reroll=roll > 0)
        for roll in (0, 1)
    )
    return ledger.Gated(drawn, kept=0, phash=(1 << 64) - 1)


def decide_each(decision: ledger.Decision) -> Statement:
    """A reviewer's decision on every item of the run."""

    def run(engine: sa.Engine, run_id: int, ids: list[int]) -> object:
        with ledger.begin(engine) as conn:
            return [ledger.decide(conn, run_id, i, decision, "reviewer@example") for i in ids]

    return run


Statement = Callable[[sa.Engine, int, list[int]], object]


def each(settle: Callable[[sa.Engine, ledger.Claim], object]) -> Statement:
    """A worker's statement, tried on every item as if the worker held it."""
    return lambda engine, _run, ids: [settle(engine, held(engine, i)) for i in ids]


def in_transaction(statement: Callable[[Any, int], object]) -> Statement:
    """A statement on the whole run, in the caller's transaction."""

    def run(engine: sa.Engine, run_id: int, _ids: list[int]) -> object:
        with ledger.begin(engine) as conn:
            return statement(conn, run_id)

    return run


def restage(engine: sa.Engine, run_id: int, _ids: list[int]) -> object:
    """Enqueue the run again with every item's prompt changed."""
    with ledger.begin(engine) as conn:
        staging = ledger.ItemStaging(conn, run_id)
        staging.add([item(status.value, "a new prompt") for status in ItemStatus])
        return staging.merge()


def retire_all(engine: sa.Engine, run_id: int, _ids: list[int]) -> object:
    """Enqueue the run again with a catalogue that has none of its SKUs."""
    with ledger.begin(engine) as conn:
        staging = ledger.ItemStaging(conn, run_id)
        retirement = staging.retire_missing()
        staging.merge()
        return retirement


def restage_unchanged(engine: sa.Engine, run_id: int, _ids: list[int]) -> object:
    """Enqueue the run again with every item as it was."""
    with ledger.begin(engine) as conn:
        staging = ledger.ItemStaging(conn, run_id)
        staging.add([item(status.value, "p") for status in ItemStatus])
        return staging.merge()


def stored_then_restaged(engine: sa.Engine, run_id: int, ids: list[int]) -> object:
    """The retired item's object is still held by the ledger; then the same enqueue."""
    with ledger.begin(engine) as conn:
        conn.execute(
            sa.update(Item).where(Item.sku == ItemStatus.RETIRED.value).values(sha256="0" * 64)
        )
    return restage_unchanged(engine, run_id, ids)


def unreviewed_then_restaged(engine: sa.Engine, run_id: int, ids: list[int]) -> object:
    """The retired item's object failed the gate and was never approved; the same enqueue."""
    with ledger.begin(engine) as conn:
        conn.execute(
            sa.update(Item)
            .where(Item.sku == ItemStatus.RETIRED.value)
            .values(sha256="0" * 64, verdict="failed")
        )
    return restage_unchanged(engine, run_id, ids)


@dataclass(frozen=True)
class Case:
    moves: tuple[str, ...]
    """The moves the statement makes."""
    statement: Statement
    sources: Callable[[Transition], tuple[ItemStatus, ...]] = lambda move: move.sources
    """Those of the move's sources the statement is asked to start from."""
    target: Callable[[Transition], ItemStatus] = lambda move: move.target
    """The target this case expects, for a move with several."""


CASES = {
    "queue": Case(
        ("queue",), lambda engine, run_id, _: list(ledger.queue_pending(engine, run_id, 10))
    ),
    "unqueue": Case(("unqueue",), lambda engine, _, ids: ledger.unmark_queued(engine, ids)),
    "claim": Case(
        ("claim",),
        lambda engine, run_id, ids: ledger.claim(engine, run_id, "tiny", ids, "w2", "cpu", 60),
    ),
    "renew": Case(("renew",), each(lambda engine, c: ledger.renew(engine, c, 60))),
    "finish": Case(
        ("finish",),
        each(lambda engine, c: finish(engine, c)),
        target=lambda move: move.to(ItemStatus.SUCCEEDED),
    ),
    "finish, every roll failing the gate": Case(
        ("finish",),
        each(lambda engine, c: finish(engine, c, gated=failing_gate(c))),
        target=lambda move: move.to(ItemStatus.NEEDS_REVIEW),
    ),
    "approve": Case(("approve",), decide_each("approved")),
    "reject": Case(("reject",), decide_each("rejected")),
    "retry_error": Case(
        ("retry_error",),
        each(lambda engine, c: ledger.fail(engine, c, "boom", retry=True, max_attempts=3)),
    ),
    "fail": Case(
        ("fail",),
        each(lambda engine, c: ledger.fail(engine, c, "bad", retry=False, max_attempts=3)),
    ),
    "fail at the cap": Case(
        ("fail",),
        each(lambda engine, c: ledger.fail(engine, c, "boom", retry=True, max_attempts=1)),
    ),
    "flag": Case(("flag",), each(lambda engine, c: ledger.flag(engine, c, "unsafe"))),
    "release": Case(("release",), each(lambda engine, c: ledger.release(engine, c, "device lost"))),
    "expire": Case(
        ("expire",),
        in_transaction(lambda conn, _: ledger.expire_leases(conn, 3, 10)),
        target=lambda move: move.to(QUEUED),
    ),
    "expire at the cap": Case(
        ("expire",),
        in_transaction(lambda conn, _: ledger.expire_leases(conn, 1, 10)),
        target=lambda move: move.to(FAILED),
    ),
    "republish": Case(
        ("republish",),
        in_transaction(lambda conn, _: ledger.requeue_stale(conn, "tiny", ledger.utcnow(), 10)),
    ),
    "cancel": Case(("cancel",), in_transaction(ledger.cancel_run)),
    "retry_run": Case(
        ("retry_run",),
        in_transaction(lambda conn, run_id: ledger.retry_run(conn, run_id, failed_only=False)),
    ),
    "retry_run --failed": Case(
        ("retry_run",),
        in_transaction(lambda conn, run_id: ledger.retry_run(conn, run_id, failed_only=True)),
        sources=lambda move: move.narrowed(FAILED),
    ),
    "change": Case(("change", "change_queued"), restage),
    "retire": Case(("retire",), retire_all),
    "revive": Case(("revive",), restage_unchanged, target=lambda move: move.to(ItemStatus.PENDING)),
    "revive with its object": Case(
        ("revive",), stored_then_restaged, target=lambda move: move.to(ItemStatus.SUCCEEDED)
    ),
    "revive with an unreviewed object": Case(
        ("revive",),
        unreviewed_then_restaged,
        target=lambda move: move.to(ItemStatus.NEEDS_REVIEW),
    ),
}


def test_every_move_of_the_table_has_its_statement_checked() -> None:
    """The cases below cover the whole table."""
    assert {name for case in CASES.values() for name in case.moves} == set(TRANSITIONS)


@pytest.mark.parametrize("case", list(CASES))
def test_a_statement_moves_exactly_the_items_its_transition_allows(
    engine: sa.Engine, case: str
) -> None:
    """Applied to one item in each status, the statement moves (or touches, for a move
    that keeps the status) the items in its move's sources to its target, and leaves every
    other item as it was."""
    run_id, ids = one_per_status(engine)
    before = items(engine)
    CASES[case].statement(engine, run_id, ids)
    after = items(engine)
    expected: dict[str, ItemStatus] = {}
    for name in CASES[case].moves:
        move = TRANSITIONS[name]
        for source in CASES[case].sources(move):
            expected[source.value] = CASES[case].target(move)
    for sku, (status, updated_at) in after.items():
        if sku in expected:
            assert (status, updated_at != before[sku][1]) == (expected[sku], True), sku
        else:
            assert (status, updated_at) == before[sku], sku
