"""What `skufleet status` and `skufleet runs` show, and how.

A run's progress keeps succeeded and failed apart: the bar fills with succeeded items (green)
and failed ones (red), each counted in its own figure. The pace and the ETA come from the
run's own recent work (:func:`items_per_second`), failures and retries are grouped by the
kind of their error (``ledger.error_kind``), the quality gate's figures get a line (the
share of finished items usable, re-rolls, renders per stored image) and the items waiting
for review another, with the command that shows them, and ``runs`` fits its table to the
terminal by leaving out the least needed columns, never by cutting a run's name.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, Group
from rich.table import Table
from rich.text import Text
from sqlalchemy.engine import Engine

from skufleet.schemas import ledger

RATE_WINDOW = timedelta(seconds=60)
"""Items/s counts the items finished within this window, or since the run's earliest claim
among them when that is later (see ``ledger.recent_finishes``)."""
MIN_RATE_SECONDS = 1.0
"""Seconds of measured work below which no rate (and no ETA) is given yet: "—"."""
BAR_WIDTH = 50
"""Widest progress bar, in cells."""
STYLES = {"succeeded": "green", "failed": "red", "other": "yellow", "open": "bright_black"}
"""Bar colours: succeeded, failed, otherwise done (cancelled…), and open items."""
_SHOWN = ("pending", "queued", "running", "succeeded", "failed")
"""Statuses the figures line names itself and the table always has; any other one is
listed, and has a column, when it has items (``status --json`` counts every one)."""
_LABELS = {"needs_review": "to review"}
"""How the figures line says a status, where not by its name."""


def items_per_second(finished: int, seconds: float) -> float | None:
    """Items per second over ``seconds`` of the run's recent work in which ``finished``
    items were done; None while there is not enough to go on (nothing finished yet, or
    under :data:`MIN_RATE_SECONDS` measured)."""
    if finished < 1 or seconds < MIN_RATE_SECONDS:
        return None
    return finished / seconds


def eta_seconds(remaining: int, rate: float | None) -> float | None:
    """Seconds until ``remaining`` items are done at ``rate``: 0 when nothing remains, None
    when there is no rate to go on."""
    if remaining <= 0:
        return 0.0
    if not rate:
        return None
    return remaining / rate


def format_eta(remaining: int, rate: float | None) -> str:
    """``done``, ``—`` (no rate yet, or the run stalled) or ``H:MM:SS``."""
    seconds = eta_seconds(remaining, rate)
    if remaining <= 0:
        return "done"
    return "—" if seconds is None else str(timedelta(seconds=round(seconds)))


@dataclass(frozen=True)
class Snapshot:
    """One look at a run: its counts, recent pace, failures and retries."""

    status: ledger.RunStatus
    finished_recently: int
    """Items done within the rate window."""
    measured_seconds: float
    """Seconds of work the rate window covers."""
    failures: list[tuple[str, int]]
    """Failed items by kind of error, commonest first."""
    retrying: int
    """Open items with an earlier attempt's error: being tried again."""
    retry_reasons: list[tuple[str, int]]
    """Their last errors by kind, commonest first."""

    @property
    def remaining(self) -> int:
        """Items not done yet: pending, queued or running."""
        return self.status.total - self.status.done

    @property
    def rate(self) -> float | None:
        return items_per_second(self.finished_recently, self.measured_seconds)

    def as_dict(self) -> dict[str, Any]:
        """``status --json``: the counts and attempts as before, and the new figures."""
        eta = eta_seconds(self.remaining, self.rate)
        rate = self.rate
        return {
            **self.status.as_dict(),
            "total": self.status.total,
            "done": self.status.done,
            "remaining": self.remaining,
            "items_per_second": None if rate is None else round(rate, 3),
            "eta_seconds": None if eta is None else round(eta),
            "failures_by_kind": _kinds(self.failures),
            "retrying": {"count": self.retrying, "by_kind": _kinds(self.retry_reasons)},
            "waiting_for_review": {
                "count": self.status.needs_review,
                "hint": review_hint(self.status) if self.status.needs_review else None,
            },
        }


def review_hint(status: ledger.RunStatus) -> str:
    """The command that shows a run's images waiting for review."""
    return f"skufleet review {status.run_name}"


def _kinds(pairs: list[tuple[str, int]]) -> list[dict[str, Any]]:
    return [{"kind": kind, "count": count} for kind, count in pairs]


def snapshot(engine: Engine, run: str, now: datetime | None = None) -> Snapshot:
    """Read one :class:`Snapshot` of run ``run`` from the ledger."""
    with ledger.connect(engine) as conn:
        status = ledger.run_status(conn, run)
        finished, seconds = ledger.recent_finishes(conn, run, now or ledger.utcnow(), RATE_WINDOW)
        failures = ledger.failure_reasons(conn, run)
        retrying, retry_reasons = ledger.retrying(conn, run)
    return Snapshot(status, finished, seconds, failures, retrying, retry_reasons)


class _Headline:
    """``run NAME`` and a bar as wide as the line allows: succeeded, failed and otherwise
    done items (cancelled…) each in their colour, open ones grey."""

    def __init__(self, run: str, status: ledger.RunStatus) -> None:
        self.run = run
        succeeded, failed = status.counts["succeeded"], status.counts["failed"]
        self.parts = [(succeeded, "succeeded"), (failed, "failed")]
        self.parts.append((status.done - succeeded - failed, "other"))
        self.parts.append((status.total - status.done, "open"))
        self.total = sum(count for count, _ in self.parts)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> Iterator[Text]:
        label = Text(f"run {self.run} ")
        room = options.max_width - label.cell_len
        if room < 10:  # a long name on a narrow terminal: the bar goes on its own line
            yield label
            label, room = Text(), options.max_width
        label.append_text(self.bar(min(BAR_WIDTH, room)))
        yield label

    def bar(self, width: int) -> Text:
        # cumulative rounding: the cells add up to the width whatever the counts
        cells, done, drawn = [], 0, 0
        for count, _ in self.parts:
            done += count
            upto = round(width * done / self.total) if self.total else 0
            cells.append(upto - drawn)
            drawn = upto
        failed = 1  # index of "failed" in self.parts
        if self.parts[failed][0] and not cells[failed]:  # a single failure still shows
            cells[max(range(len(cells)), key=cells.__getitem__)] -= 1
            cells[failed] = 1
        bar = Text()
        for (_, name), n in zip(self.parts, cells, strict=True):
            bar.append("━" * n, style=STYLES[name])
        bar.append("━" * (width - sum(cells)), style=STYLES["open"])  # an empty run
        return bar


def status_view(run: str, snap: Snapshot) -> Group:
    """What `skufleet status RUN` prints."""
    status = snap.status
    counts = status.counts
    rate = snap.rate
    figures = Text()
    figures.append(f"{counts['succeeded']:,}/{status.total:,} succeeded", style=STYLES["succeeded"])
    figures.append(" · ")
    figures.append(f"{counts['failed']:,} failed", style="bold red" if counts["failed"] else None)
    for name, count in counts.items():
        if count and name not in _SHOWN:
            figures.append(f" · {count:,} {_LABELS.get(name, name)}", style=STYLES["other"])
    figures.append(f" · {snap.remaining:,} open")
    if snap.retrying:
        figures.append(f" ({snap.retrying:,} retrying)", style="yellow")
    pace = "—" if rate is None else f"{rate:.2f}"
    figures.append(f" · {pace} items/s · ETA {format_eta(snap.remaining, rate)}")
    table = Table(show_header=True, box=None)
    columns = [name for name, n in counts.items() if n or name in _SHOWN]
    for name in columns:
        table.add_column(name, justify="right")
    table.add_column("attempts", justify="right")
    table.add_row(*(f"{counts[name]:,}" for name in columns), f"{status.attempts:,}")
    parts: list[Any] = [_Headline(run, status), figures, table]
    if status.usable_ratio is not None or status.renders:
        parts.append(quality_line(status))
    if status.needs_review:
        waiting = Text(f"waiting for review: {status.needs_review:,}", style="bold yellow")
        parts.append(waiting.append(f" · {review_hint(status)}", style="not bold"))
    if snap.failures:
        parts.append(_kind_table("failures by kind", snap.failures, counts["failed"]))
    if snap.retry_reasons:
        title = f"retrying: {snap.retrying:,} items, by last error"
        parts.append(_kind_table(title, snap.retry_reasons, snap.retrying))
    return Group(*parts)


def quality_line(status: ledger.RunStatus) -> Text:
    """``quality: 90.0% usable · 3 re-rolls · 23 renders, 1.15 per stored image``: of the
    items finished (succeeded, needs_review, failed), the share that succeeded; the images
    drawn again because every candidate before failed a check; the candidate images drawn,
    and how many per stored image (succeeded or needs_review)."""
    usable, per_item = status.usable_ratio, status.renders_per_item
    line = Text("quality: ")
    line.append("—" if usable is None else f"{usable:.1%}", style=_usable_style(usable))
    line.append(f" usable · {status.rerolls:,} re-roll{'' if status.rerolls == 1 else 's'}")
    line.append(f" · {status.renders:,} renders, ")
    line.append(f"{'—' if per_item is None else f'{per_item:.2f}'} per stored image")
    return line


def _usable_style(usable: float | None) -> str | None:
    if usable is None:
        return None
    return "green" if usable >= 0.95 else "yellow" if usable >= 0.8 else "red"


def _kind_table(title: str, kinds: list[tuple[str, int]], total: int) -> Table:
    table = Table(title=title, title_justify="left", show_header=False, box=None)
    table.add_column(justify="right", no_wrap=True)
    table.add_column(overflow="fold")
    for kind, count in kinds:
        table.add_row(f"{count:,}", Text(kind))
    rest = total - sum(count for _, count in kinds)
    if rest > 0:
        table.add_row(f"{rest:,}", Text("of other kinds", style="italic"))
    return table


def run_state(run: ledger.RunSummary) -> str:
    """``running`` while items are open, then ``failed`` (some failed), ``review`` (some
    wait for a reviewer) or ``done`` (all succeeded); ``cancelled`` once cancelled."""
    if run.cancelled:
        return "cancelled"
    if run.status.total - run.status.done:
        return "running"
    if run.status.counts["failed"]:
        return "failed"
    return "review" if run.status.needs_review else "done"


RUN_COLUMNS = (
    "run",
    "state",
    "succeeded",
    "failed",
    "open",
    "review",
    "created",
    "model",
    "pack",
)
"""The columns of `skufleet runs`, most needed first: a narrow terminal loses the last ones
(`runs --json` has them all). ``review``: items waiting for a reviewer."""
_KEPT = 5
"""run, state, succeeded, failed and open are always shown."""
_NUMERIC = ("succeeded", "failed", "open", "review")


def runs_table(found: Sequence[ledger.RunSummary], width: int) -> Table:
    """`skufleet runs` for a terminal ``width`` cells wide: whole run names, and as many of
    the other columns, in :data:`RUN_COLUMNS` order, as fit."""
    rows = [
        {
            "run": run.name,
            "state": run_state(run),
            "succeeded": f"{run.status.counts['succeeded']:,}/{run.status.total:,}",
            "failed": f"{run.status.counts['failed']:,}",
            "open": f"{run.status.total - run.status.done:,}",
            "review": f"{run.status.needs_review:,}",
            "created": f"{run.created_at:%Y-%m-%d %H:%M}",
            "model": run.model,
            "pack": run.template,
        }
        for run in found
    ]
    widths = {
        name: max([cell_len(name), *(cell_len(row[name]) for row in rows)]) for name in RUN_COLUMNS
    }
    shown = list(RUN_COLUMNS[:_KEPT])
    used = sum(widths[name] for name in shown) + 2 * (len(shown) - 1)
    for name in RUN_COLUMNS[_KEPT:]:
        if used + 2 + widths[name] <= width:
            shown.append(name)
            used += 2 + widths[name]
    table = Table(box=None, pad_edge=False, padding=(0, 1))  # columns 2 cells apart
    for name in shown:
        table.add_column(
            name,
            justify="right" if name in _NUMERIC else "left",
            # whole names, folded onto a second line only if the terminal is narrower
            # than the name itself: never cut with an ellipsis
            overflow="fold",
            no_wrap=name not in ("run", "model", "pack"),
        )
    for row in rows:
        table.add_row(*(Text(row[name]) for name in shown))
    return table
