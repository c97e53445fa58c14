"""The render task's final state, from the renderer's outcome: no broker, no services.

The task is called in-process (``Task.apply``): that tests the decision (SUCCESS, FAILURE
with a reason, REJECTED back to the queue), not the queue; the integration test
``tests/integration/test_flower.py`` watches the same states through a real worker and Flower.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery
from celery import signals as celery_signals
from celery.worker import state

from skufleet.schemas import ledger
from skufleet.schemas.errors import EXIT_DEVICE_FAILED, BatchFailed, DeviceError, Stopping
from skufleet.schemas.label import MAX_LENGTH, label, retry_note
from skufleet.schemas.names import TASK_RENDER
from skufleet.schemas.params import GenerationParams, RenderPayload
from skufleet.schemas.settings import Settings
from skufleet.worker.outcome import Outcome
from skufleet.worker.tasks import make_requeue, register_render

PAYLOAD = RenderPayload(run_id=1, model="tiny", item_ids=[1, 2]).model_dump()


def claim(item_id: int, sku: str = "SKU-1") -> ledger.Claim:
    return ledger.Claim(
        id=item_id,
        run_id=1,
        run_name="spring-2026",
        sku=sku,
        shot="hero",
        prompt="p",
        negative_prompt="",
        seed=1,
        params=GenerationParams(),
        output="{}",
        object_key=f"spring-2026/{sku}/hero.png",
        attempt=1,
    )


class FakeRenderer:
    """Hands the task a prepared outcome, or raises what ``handle`` would."""

    def __init__(self, handle: Callable[[RenderPayload], Outcome]) -> None:
        self._handle = handle
        self.settings = Settings()
        self.device = "stand-in"

    def handle(self, payload: RenderPayload) -> Outcome:
        return self._handle(payload)


@pytest.fixture
def app() -> Iterator[Celery]:
    app = Celery("test-tasks", broker="memory://", set_as_current=False)
    app.conf.task_ignore_result = True
    yield app
    app.close()


def run(app: Celery, handle: Callable[[RenderPayload], Outcome], *args: Any) -> Any:
    task = register_render(app, FakeRenderer(handle))  # type: ignore[arg-type]
    return task.apply(args=list(args or (PAYLOAD,)))


def test_a_task_whose_items_were_all_stored_succeeds(app: Celery) -> None:
    """Every claimed item uploaded and recorded: SUCCESS, with the counts."""
    result = run(app, lambda _: Outcome(claimed=2, drawn=2, stored=2))
    assert (result.state, result.result) == ("SUCCESS", {"claimed": 2, "stored": 2})


def test_a_task_with_nothing_to_do_succeeds(app: Celery) -> None:
    """A duplicate message (its items already done or cancelled) claims nothing: SUCCESS."""
    assert run(app, lambda _: Outcome()).state == "SUCCESS"


def test_a_task_with_an_item_failed_for_good_fails_naming_it(app: Celery) -> None:
    """One of two items failed for good: FAILURE, BatchFailed saying how many and why."""
    outcome = Outcome(claimed=2, drawn=2, stored=1, failed=[(claim(2, "SKU-2"), "ItemError: x")])
    result = run(app, lambda _: outcome)
    assert result.state == "FAILURE" and isinstance(result.result, BatchFailed)
    assert str(result.result) == (
        "1 of 2 items not stored (1 failed for good); first: SKU-2 (hero): ItemError: x"
    )


def test_a_task_whose_items_were_retried_fails_and_is_not_retried_itself(app: Celery) -> None:
    """Items sent back for a retry make the task FAILURE (not RETRY, not SUCCESS): their
    retries are messages of their own, so the task itself is never retried."""
    outcome = Outcome(
        claimed=2,
        drawn=0,
        retried=[(claim(1), "RuntimeError: poisoned"), (claim(2, "SKU-2"), "RuntimeError: x")],
    )
    published: list[Any] = []

    def record(**kwargs: Any) -> None:
        published.append(kwargs)

    celery_signals.before_task_publish.connect(record, weak=False)
    try:
        result = run(app, lambda _: outcome)
    finally:
        celery_signals.before_task_publish.disconnect(record)
    assert result.state == "FAILURE" and published == []  # no retry of the message itself
    assert str(result.result).startswith("2 of 2 items not stored (2 retried after an error)")
    assert "SKU-1 (hero): RuntimeError: poisoned" in str(result.result)


def test_a_device_failure_fails_the_task_and_stops_the_worker(
    app: Celery, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device failed: its items were handed back; the task fails saying so, and the
    worker stops consuming with exit code 4."""
    monkeypatch.setattr(state, "should_stop", None)
    error = DeviceError("cuda:0 failed")
    outcome = Outcome(claimed=1, fatal=error, released=[claim(1)])
    result = run(app, lambda _: outcome)
    assert result.state == "FAILURE" and "device out of rotation" in str(result.result)
    assert state.should_stop == EXIT_DEVICE_FAILED


def test_a_task_stopped_before_it_claimed_gives_its_message_back(app: Celery) -> None:
    """Stopping before anything was claimed: the message is rejected and requeued."""

    def stopping(_: RenderPayload) -> Outcome:
        raise Stopping("the worker is stopping")

    assert run(app, stopping).state == "REJECTED"


@pytest.mark.parametrize("args", [[], ["x"], [{"run_id": "x"}]])
def test_a_malformed_message_fails_without_rendering(app: Celery, args: list[Any]) -> None:
    """A message that is no render payload is dropped as a FAILURE; nothing is rendered."""
    called: list[RenderPayload] = []
    task = register_render(app, FakeRenderer(lambda p: called.append(p) or Outcome()))  # type: ignore[arg-type]
    result = task.apply(args=args)
    assert result.state == "FAILURE" and isinstance(result.result, BatchFailed) and not called


def test_a_refused_message_fails_naming_the_reason(app: Celery) -> None:
    """A message the ledger refuses (another run's items, another model) is a FAILURE."""
    result = run(app, lambda _: Outcome(refused="run r is for model 'x', not 'tiny'"))
    assert str(result.result) == "message refused: run r is for model 'x', not 'tiny'"


def test_a_retry_is_published_with_its_label_as_what_flower_shows(app: Celery) -> None:
    """make_requeue sends the label as the message's argsrepr, the payload as its argument."""
    sent: list[dict[str, Any]] = []

    def capture(headers: dict[str, Any], body: Any, **_: Any) -> None:
        sent.append({"argsrepr": headers["argsrepr"], "task": headers["task"], "args": body[0]})

    celery_signals.before_task_publish.connect(capture, weak=False)
    try:
        make_requeue(app, "q")(RenderPayload(**PAYLOAD), 0.0, "spring-2026 · hero · retry")
    finally:
        celery_signals.before_task_publish.disconnect(capture)
    assert sent == [
        {"argsrepr": "spring-2026 · hero · retry", "task": TASK_RENDER, "args": [PAYLOAD]}
    ]


def test_a_label_names_the_run_the_shot_and_the_first_skus() -> None:
    """Run name, shot, three SKUs, how many more, the item count; a retry's attempt."""
    items = [(f"SKU-{i}", "hero") for i in range(1, 9)]
    assert label("spring-2026", items) == "spring-2026 · hero · SKU-1, SKU-2, SKU-3 +5 (8 items)"
    assert label("spring-2026", items[:1], retry_note(2, 3)) == (
        "spring-2026 · hero · SKU-1 (1 item) · retry, attempt 2 of 3"
    )
    assert label("r", [("a", "front"), ("b", "lifestyle"), ("c", "side")]) == (
        "r · front, lifestyle +1 · a, b, c (3 items)"
    )


def test_a_label_is_one_bounded_line_whatever_the_skus() -> None:
    """Control characters become ?, long parts are cut, the count and note always show."""
    long = [("X" * 300 + "\n<script>", "s" * 100)] * 20
    text = label("run\u2028name" * 20, long, retry_note(3, 3))
    assert len(text) <= MAX_LENGTH and "\n" not in text and "\u2028" not in text
    assert text.endswith("(20 items) · retry, attempt 3 of 3")
