"""The bounded Jinja environment that template packs render in.

A template is code from a pack run on data from a catalogue. Jinja's immutable sandbox keeps
it to the values it is given (no ``list.append``); this module bounds the work it may do for
one row, deterministically where it can, and a bound that is hit raises ``SecurityError``:

- each rendered text is at most ``MAX_PROMPT_CHARS`` characters, cut off as it passes them;
- ``range`` gives at most ``MAX_RANGE`` numbers, and a row's templates run at most
  ``MAX_TEMPLATE_STEPS`` loop iterations and calls in all;
- an operation that could build a value over ``MAX_VALUE_CHARS`` characters or items is
  refused before it runs: ``*``, ``+``, ``~``, the text of a macro or a block, ``%`` and
  ``format`` widths, and the filters and string methods that pad to a width, fill to a count
  or repeat an argument (``center``, ``batch``, ``replace``, ``join``, ``indent``,
  ``wordwrap``, ``expandtabs``, ``translate``, ``tojson``); ``*`` and ``**`` on integers stop
  at ``MAX_INT_BITS``;
- in the main thread, a row also gets ``ROW_SECONDS`` of wall-clock time, enforced with
  ``signal.setitimer(ITIMER_REAL)``. The SIGALRM handler it installs (once, and again if
  someone replaces it) raises only when the row's own deadline has passed while the row is
  rendering; any other alarm goes to the handler it replaced, and an alarm timer set by
  someone else is paused and then restored with its remaining time (or left in charge, if it
  is due first). In other threads the deterministic bounds above apply alone.

Templates are compiled with :data:`ENVIRONMENT`; one row's texts are rendered with
:func:`render_bounded` inside one ``with RowLimits():``, the row's steps and deadline.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import math
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from functools import wraps
from string import Formatter
from types import FrameType
from typing import Any

from jinja2 import StrictUndefined, Template, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

MAX_PROMPT_CHARS = 20_000
"""Characters one rendered text may have before whitespace is tidied (CLIP reads ~300)."""
MAX_VALUE_CHARS = 200_000
"""Characters (or items) of a string or list one template operation may build."""
MAX_INT_BITS = 10_000
"""Bits of an integer ``*`` or ``**`` may build (about 3,000 digits)."""
MAX_RANGE = 1000
"""Numbers one ``range()`` in a template may give (Jinja's own sandbox allows 100,000)."""
MAX_TEMPLATE_STEPS = 10_000
"""Loop iterations and calls all of one row's templates may run together."""
ROW_SECONDS = 0.5
"""Wall-clock time all of one row's templates may take, when rendering in the main thread."""


# --- What one operation may build: checked before it runs ---------------------------------

_SEQUENCES = (str, bytes, list, tuple)
_SIZED = (*_SEQUENCES, range, dict, set, frozenset)
_PERCENT_SPEC = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?")


def _length(value: object) -> int:
    """Characters or items of a string or list, counting the characters of the strings it
    holds (a list of long strings joins into a long string)."""
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, list | tuple):
        return len(value) + sum(len(item) for item in value if isinstance(item, str))
    return len(value) if isinstance(value, _SIZED) else 1


def _check_built(size: int, what: str) -> None:
    if size > MAX_VALUE_CHARS:
        raise SecurityError(
            f"{what} would build {size:,} characters or items; the limit is {MAX_VALUE_CHARS:,}"
        )


def _check_bits(bits: int, what: str) -> None:
    if bits > MAX_INT_BITS:
        raise SecurityError(
            f"{what} would build an integer of about {bits:,} bits; the limit is {MAX_INT_BITS:,}"
        )


def _width(digits: str) -> int:
    """A width written in a format, without converting a thousand-digit run."""
    return int(digits.lstrip("0")[:12] or "0")


def _check_widths(widths: Iterable[object], what: str) -> None:
    for width in widths:
        if isinstance(width, int):
            _check_built(abs(width), what)


def _check_percent(text: str, values: Any) -> None:
    """``text % values``: refuse widths and precisions that would pad past the limit."""
    for spec in _PERCENT_SPEC.finditer(text):
        for number in spec.groups():
            if number == "*":  # taken from the values
                _check_widths(values if isinstance(values, tuple) else (values,), "'%'")
            elif number:
                _check_built(_width(number), "'%'")


def _check_format(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """``text.format(...)`` and ``format_map``: the same, for ``{:999999}``-style widths."""
    for _, _, spec, _ in Formatter().parse(text):
        if not spec:
            continue
        for number in re.findall(r"\d+", spec):
            _check_built(_width(number), "format()")
        if "{" in spec:  # a width taken from the arguments
            mapped = args[0].values() if args and isinstance(args[0], Mapping) else ()
            _check_widths((*args, *kwargs.values(), *mapped), "format()")


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse ``left <operator> right`` when its result would be huge."""
    ints = isinstance(left, int) and isinstance(right, int)
    if operator == "*":
        if ints:
            _check_bits(left.bit_length() + right.bit_length(), "'*'")
        elif isinstance(right, int) and isinstance(left, _SEQUENCES):
            _check_built(_length(left) * right, "'*'")
        elif isinstance(left, int) and isinstance(right, _SEQUENCES):
            _check_built(_length(right) * left, "'*'")
    elif operator == "**":
        if ints and right > 0 and abs(left) > 1:
            _check_bits(right * abs(left).bit_length(), "'**'")
    elif operator == "+":
        if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
            _check_built(_length(left) + _length(right), "'+'")
    elif operator == "%" and isinstance(left, str):
        _check_percent(left, right)


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], index: int, name: str) -> Any:
    return args[index] if len(args) > index else kwargs.get(name)


def _check_call(name: str, subject: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
    """Refuse a filter or string method whose result could be huge: the ones that pad to a
    width, repeat an argument per line, character or match, or fill to a count."""
    if name == "join":  # separator.join(items), or the filter: items|join(separator)
        sep = subject if isinstance(subject, str) else _argument(args, kwargs, 0, "d") or ""
        items = _argument(args, kwargs, 0, "iterable") if isinstance(subject, str) else subject
        if isinstance(sep, str) and isinstance(items, _SIZED):
            _check_built(_length(items) + len(sep) * len(items), "join()")
    elif name in ("batch", "slice"):
        count, fill = _argument(args, kwargs, 0, "linecount"), _argument(args, kwargs, 1, "fill")
        if isinstance(count, int) and (name == "slice" or fill is not None):
            _check_built(count, f"{name}()")
    elif name == "tojson":
        indent = _argument(args, kwargs, 0, "indent")
        if isinstance(indent, int):
            items = len(subject) if isinstance(subject, list | tuple | dict) else 1
            _check_built(indent * items, "tojson()")
    elif name in _GROWS:
        text = subject if isinstance(subject, str) else str(subject)
        _check_built(_grown(name, text, args, kwargs), f"{name}()")


_GROWS = frozenset("replace indent expandtabs wordwrap translate center ljust rjust zfill".split())
"""Filters and string methods whose result may be many times longer than their subject."""


def _grown(name: str, text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    """An upper bound of the length of what ``name``, one of _GROWS, returns for ``text``."""
    if name == "replace":
        old, new = _argument(args, kwargs, 0, "old"), _argument(args, kwargs, 1, "new")
        if not (isinstance(old, str) and isinstance(new, str)) or len(new) <= len(old):
            return len(text)
        count = text.count(old) if old else len(text) + 1
        limit = _argument(args, kwargs, 2, "count")
        if isinstance(limit, int) and limit >= 0:
            count = min(count, limit)
        return len(text) + count * (len(new) - len(old))
    if name == "indent":
        width = _argument(args, kwargs, 0, "width")
        per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
        return len(text) + (text.count("\n") + 1) * abs(per_line)
    if name == "expandtabs":
        size = _argument(args, kwargs, 0, "tabsize")
        return len(text) + text.count("\t") * abs(size if isinstance(size, int) else 8)
    if name == "wordwrap":
        wrap = _argument(args, kwargs, 2, "wrapstring")
        return len(text) * (1 + (len(wrap) if isinstance(wrap, str) else 1))
    if name == "translate":
        table = _argument(args, kwargs, 0, "table")
        values = table.values() if isinstance(table, Mapping) else ()
        return len(text) * max((len(v) for v in values if isinstance(v, str)), default=1)
    width = _argument(args, kwargs, 0, "width")  # center, ljust, rjust, zfill: pad to a width
    return max(len(text), width if isinstance(width, int) else 0)


def _joined(parts: Iterable[Any]) -> str:
    """``environment.concat`` (the text of a macro, a ``{% set %}`` block, a ``~`` chain),
    refused before it is joined when it would pass MAX_VALUE_CHARS: doubling a value in a
    loop stops there instead of at the end of memory."""
    texts = [part if isinstance(part, str) else str(part) for part in parts]
    _check_built(sum(map(len, texts)), "joining text")
    return "".join(texts)


def _bounded_range(*args: int) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_RANGE:
        raise SecurityError(
            f"range() of {len(numbers):,} numbers is over the limit of {MAX_RANGE:,}"
        )
    return numbers


def _materialised(value: Any) -> Any:
    """A generator (from ``map``, ``select``, ``batch``) as a list, so its size can be
    checked; a loop's ``loop`` object is left alone."""
    if isinstance(value, Iterator) and not isinstance(value, LoopContext):
        return list(value)
    return value


def _bounded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    skip = 1 if hasattr(func, "jinja_pass_arg") else 0  # a context or environment comes first

    @wraps(func)  # keeps jinja_pass_arg
    def bounded(*args: Any, **kwargs: Any) -> Any:
        if len(args) == skip + 1 and not kwargs and type(args[skip]) is str:
            return func(*args)  # a string and no arguments: defaults grow it a few times at most
        if len(args) > skip:
            value = _materialised(args[skip])
            args = (*args[:skip], value, *args[skip + 1 :])
            if name == "format" and isinstance(value, str):
                _check_percent(value, kwargs or args[skip + 1 :])
            else:
                _check_call(name, value, args[skip + 1 :], kwargs)
        return func(*args, **kwargs)

    return bounded


# --- How much one row may do: steps and, in the main thread, time -------------------------


class RowLimits:
    """One row's budget: MAX_TEMPLATE_STEPS loop iterations and calls and, in the main
    thread, ROW_SECONDS of wall-clock time (see the module docstring)."""

    __slots__ = ("_outer", "_token", "steps")

    def __enter__(self) -> RowLimits:
        self.steps = MAX_TEMPLATE_STEPS
        self._token = _LIMITS.set(self)
        self._outer: tuple[float, float, float] | None = None
        if _TIMED and threading.get_ident() == threading.main_thread().ident:
            self._outer = _start_alarm(ROW_SECONDS)
        return self

    def __exit__(self, *exc: object) -> None:
        try:
            if _ALARM.rendering or self._outer is not None:
                _stop_alarm(self._outer)
        finally:
            _LIMITS.reset(self._token)


_LIMITS: ContextVar[RowLimits | None] = ContextVar("skufleet_template_limits", default=None)


def _step() -> None:
    limits = _LIMITS.get()
    if limits is not None:
        limits.steps -= 1
        if limits.steps < 0:
            raise SecurityError(
                f"the templates ran over {MAX_TEMPLATE_STEPS:,} loop iterations and calls"
            )


def _counted(iterable: Iterable[Any]) -> Iterator[Any]:
    """What every ``{% for %}`` loops over: the items of ``iterable``, one step each."""
    for item in iterable:
        _step()
        yield item


_TIMED = hasattr(signal, "setitimer")
_LATE = 1.0
"""Seconds after a row during which a SIGALRM is still taken as that row's (late) alarm."""
_SLACK = 0.01
"""Seconds by which an alarm may seem early, the timer and time.monotonic() disagreeing."""


class _Alarm:
    """The state of the main thread's row alarm, shared with the SIGALRM handler."""

    rendering = False
    """A row is rendering under its own alarm."""
    due = math.inf
    """When the current or last row's alarm is due (time.monotonic())."""
    until = math.inf
    """Alarms from ``due`` until then are the row's: someone else's timer is due then, or
    the row finished ``_LATE`` seconds before."""
    replaced: Any = signal.SIG_DFL
    """The handler ``_on_alarm`` replaced; alarms that are not a row's go to it."""


_ALARM = _Alarm()


def _on_alarm(signum: int, frame: FrameType | None) -> None:
    now = time.monotonic()
    if _ALARM.due - _SLACK <= now < _ALARM.until:
        if _ALARM.rendering:
            _ALARM.rendering = False  # once: the row is unwinding
            _ALARM.until = min(_ALARM.until, now + _LATE)
            raise SecurityError(f"the templates took over {ROW_SECONDS} s")
        return  # the row's alarm, come as the row finished
    replaced = _ALARM.replaced
    if callable(replaced):
        replaced(signum, frame)
    elif replaced != signal.SIG_IGN:  # the default action ends the process: so it does
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _start_alarm(seconds: float) -> tuple[float, float, float] | None:
    """Arm SIGALRM for one row; someone else's paused alarm timer, to restore, if any."""
    # _signal.getsignal: signal.getsignal's enum lookup raises and catches a ValueError (1 µs)
    if _signal.getsignal(signal.SIGALRM) is not _on_alarm:
        _ALARM.replaced = signal.signal(signal.SIGALRM, _on_alarm)
    now = time.monotonic()
    outer_delay, outer_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    if 0 < outer_delay < seconds:  # someone else's alarm is due first: leave it in charge
        signal.setitimer(signal.ITIMER_REAL, outer_delay, outer_interval)
        return None
    _ALARM.due = now + seconds
    _ALARM.until = now + outer_delay if outer_delay else math.inf
    _ALARM.rendering = True
    return (outer_delay, outer_interval, now) if outer_delay else None


def _stop_alarm(outer: tuple[float, float, float] | None) -> None:
    """Disarm the row's alarm and give back someone else's, with the time it had left."""
    try:
        signal.setitimer(signal.ITIMER_REAL, 0)
    finally:
        _ALARM.rendering = False
        now = time.monotonic()
        if now < _ALARM.due - _SLACK:  # finished in time: no alarm of the row's can come
            _ALARM.due = math.inf
        else:
            _ALARM.until = min(_ALARM.until, now + _LATE)
        if outer is not None:
            delay, interval, armed_at = outer
            signal.setitimer(signal.ITIMER_REAL, max(delay - (now - armed_at), 1e-6), interval)


# --- The sandbox ---------------------------------------------------------------------------


class _Bounds(NodeTransformer):
    """Rewrites a parsed template so that every ``for`` loop counts its iterations and every
    ``~`` chain is checked before it is joined (Jinja has no hook for either)."""

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self.generic_visit(node)
        counted = nodes.EnvironmentAttribute("counted")
        node.iter = nodes.Call(counted, [node.iter], [], None, None).set_lineno(node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        joined = nodes.EnvironmentAttribute("concat")
        return nodes.Call(joined, [nodes.List(node.nodes)], [], None, None).set_lineno(node.lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with the bounds of the module docstring."""

    intercepted_binops = frozenset({"*", "**", "%", "+"})
    concat = staticmethod(_joined)
    counted = staticmethod(_counted)

    def __init__(self) -> None:
        super().__init__(undefined=StrictUndefined, autoescape=False)
        self.globals["range"] = _bounded_range
        del self.globals["lipsum"]  # lorem ipsum has no place in a prompt, and is slow
        self.filters = {name: _bounded_filter(name, f) for name, f in self.filters.items()}

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        # Jinja's one step from source to tree, for parse() and for compiling alike
        tree = _Bounds().visit(super()._parse(source, name, filename))
        tree.set_environment(self)
        return tree  # type: ignore[no-any-return]

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _step()
        args = tuple(_materialised(arg) for arg in args)
        subject = getattr(obj, "__self__", None)
        if isinstance(subject, str):
            _check_call(obj.__name__, subject, args, kwargs)
        return super().call(context, obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        formatted = super().wrap_str_format(value)
        if formatted is None:
            return None
        text: str = value.__self__

        @wraps(formatted)
        def checked(*args: Any, **kwargs: Any) -> str:
            _check_format(text, args, kwargs)
            return formatted(*args, **kwargs)

        return checked


ENVIRONMENT = _Sandbox()
"""The one environment every pack's templates are compiled in."""


def render_bounded(template: Template, context: dict[str, Any]) -> str:
    """``template`` rendered with ``context``, which already holds the environment's globals:
    a shared context skips copying them for every one of a catalogue's many renders. The
    output is taken piece by piece and refused once it passes MAX_PROMPT_CHARS."""
    shared = template.new_context(context, shared=True)
    parts = []
    size = 0
    for part in template.root_render_func(shared):
        size += len(part)
        if size > MAX_PROMPT_CHARS:
            raise SecurityError(f"the text is over {MAX_PROMPT_CHARS:,} characters")
        parts.append(part)
    return "".join(parts)
