"""What Flower shows for a render message: the run by its name, its shot and its first SKUs.

    spring-2026 · hero · SKU-1, SKU-2, SKU-3 +5 (8 items)
    spring-2026 · hero · SKU-4 (1 item) · retry, attempt 2 of 3

A label is for people only. It travels as the message's ``argsrepr`` (the header Celery sends
in its task events, and Flower shows, in place of the arguments), never in the payload, and
nothing reads it back: a worker renders only from the ledger rows it claims
(:class:`~schemas.params.RenderPayload` carries ids). Whoever publishes a message builds its
label from rows it already holds: the enqueue from the items it marks queued, the reconciler
from the items it requeues, a worker from the items it claimed.

Run names and SKUs are user text. A character that is not printable (a control, format or
separator character) becomes ``?`` so that a label is one line in any log, each part is cut
to a few dozen characters, and a label never exceeds :data:`MAX_LENGTH`. HTML is not escaped
here: Flower escapes what it shows (its task table and task page), and escaping twice would
show ``&amp;`` to the reader.
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_LENGTH = 120
"""Characters a label has at most."""
SKUS_SHOWN = 3
SHOTS_SHOWN = 2
_PART = {"run": 40, "shot": 24, "sku": 32}
"""Characters each part keeps at most before the whole label is bounded."""


def clean(text: str, limit: int) -> str:
    """``text`` on one line (non-printable characters as ``?``), cut to ``limit`` characters."""
    text = "".join(c if c.isprintable() else "?" for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _listed(values: Sequence[str], shown: int, limit: int) -> str:
    named = ", ".join(clean(v, limit) for v in values[:shown])
    return named + (f" +{len(values) - shown}" if len(values) > shown else "")


def label(run: str, items: Sequence[tuple[str, str]], note: str = "") -> str:
    """The label of a message for ``items``, ``(sku, shot)`` pairs of run ``run`` in the
    message's order; ``note`` says why it was published again (``retry, attempt 2 of 3``)."""
    shots = list(dict.fromkeys(shot for _, shot in items))
    head = " · ".join(
        (
            clean(run, _PART["run"]),
            _listed(shots, SHOTS_SHOWN, _PART["shot"]),
            _listed([sku for sku, _ in items], SKUS_SHOWN, _PART["sku"]),
        )
    )
    tail = f" ({len(items)} item{'s' if len(items) != 1 else ''})"
    if note:
        tail += f" · {clean(note, 40)}"
    room = MAX_LENGTH - len(tail)
    return (head if len(head) <= room else head[: room - 1] + "…") + tail


def retry_note(next_attempt: int, max_attempts: int) -> str:
    """The note of a retry: which attempt (counted towards the cap) it will be."""
    return f"retry, attempt {next_attempt} of {max_attempts}"
