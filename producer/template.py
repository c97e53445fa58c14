"""Template packs: per category a subject, a negative prompt, parameters and named shots.

A pack is a TOML file::

    name = "ecommerce"
    category_column = "category"     # which column picks the category (optional)

    [columns]                         # skufleet name = catalogue header (optional)
    sku = "ItemID"

    [params]                          # defaults for every category (optional)
    steps = 30

    [categories.default]              # used when no other category matches
    subject = "{{ title }}"
    negative = "blurry, watermark"
    [categories.default.shots.front]
    prompt = "{{ subject }}, front view, white background"

    [categories.footwear]
    match = ["shoes", "boots"]        # other category values that select it
    ...

Every shot of a row is its own item, with its own seed and object. Templates are Jinja2,
rendered in a ``SandboxedEnvironment`` with strict undefined names: catalogue text is data,
never code, and a template that names a field the row lacks is an error naming the field.
Inside a template every column is a variable (``{{ title }}``), ``row`` holds them all
(``{{ row["Product Name"] }}``), and shots also see ``subject`` and ``category``.
Parameters resolve as: model defaults < pack ``params`` < category ``params`` < shot keys <
command-line flags. Packs usually leave the size to the model and give a shot an ``aspect``
(``"2:3"``): the shorter side keeps the model's default, so one pack serves SD 1.5 (512×768)
and the fast ``tiny`` test model (64×96) alike.

A template is code from the pack run on data from the catalogue, so any failure while it
renders one row (a missing field, a division by zero, a type error, recursion, a runaway
loop) rejects that row alone, as ``template`` with the message, and the catalogue goes on.
The work one row may do is bounded, and the bounds are deterministic where they can be:

- each rendered text is at most ``MAX_PROMPT_CHARS`` characters: rendering stops as soon as
  the output passes it;
- the sandbox is immutable (no ``list.append``), ``range`` gives at most ``MAX_RANGE``
  numbers, and a row's templates run at most ``MAX_TEMPLATE_STEPS`` loop iterations and
  calls in all;
- an operation that could build a value over ``MAX_VALUE_CHARS`` characters or items is
  refused before it runs: ``*``, ``+``, ``~``, the text of a macro or a block, ``%`` and
  ``format`` widths, and the filters and string methods that pad to a width, fill to a
  count or repeat an argument (``center``, ``batch``, ``replace``, ``join``, ``indent``,
  ``wordwrap``, ``expandtabs``, ``translate``, ``tojson``); ``*`` and ``**`` on integers
  stop at ``MAX_INT_BITS``;
- in the main thread, a row also gets ``ROW_SECONDS`` of wall-clock time, enforced with
  ``signal.setitimer(ITIMER_REAL)``. The SIGALRM handler it installs (once, and again if
  someone replaces it) raises only when the row's own deadline has passed while the row is
  rendering; any other alarm goes to the handler it replaced, and an alarm timer set by
  someone else is paused and then restored with its remaining time (or left in charge, if
  it is due first). In other threads the deterministic bounds above apply alone.
"""

from __future__ import annotations

import _signal  # type: ignore[import-not-found]
import math
import re
import signal
import stat
import threading
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from functools import wraps
from pathlib import Path
from string import Formatter
from types import FrameType
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from producer.paths import file_kind
from schemas.errors import ConfigError, ItemError
from schemas.output import OutputSpec
from schemas.params import GenerationParams

PACKS = Path(__file__).resolve().parent / "packs"
"""The packs that ship with skufleet, usable by name (``--template education``)."""
DEFAULT_PACK = "ecommerce"
DEFAULT_CATEGORY = "default"

MAX_PACK_BYTES = 1 << 20
"""A pack file is read only up to this size (1 MiB): the shipped ones are under 20 KB."""
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

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
PARAM_KEYS = ("width", "height", "steps", "guidance_scale", "scheduler", "aspect")
OUTPUT_KEYS = ("format", "quality", "max_side", "labels")


class _OutOfTime(SecurityError):
    """A row's templates ran past ROW_SECONDS."""


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
    if name == "join":
        sep, items = (
            (subject, _argument(args, kwargs, 0, "iterable"))
            if isinstance(subject, str)
            else (_argument(args, kwargs, 0, "d") or "", subject)
        )
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
        _check_built(_GROWS[name](text, args, kwargs), f"{name}()")


def _grown_by_replace(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    old, new = _argument(args, kwargs, 0, "old"), _argument(args, kwargs, 1, "new")
    if not (isinstance(old, str) and isinstance(new, str)) or len(new) <= len(old):
        return len(text)
    count = text.count(old) if old else len(text) + 1
    limit = _argument(args, kwargs, 2, "count")
    if isinstance(limit, int) and limit >= 0:
        count = min(count, limit)
    return len(text) + count * (len(new) - len(old))


def _grown_by_indent(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    width = _argument(args, kwargs, 0, "width")
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 4
    return len(text) + (text.count("\n") + 1) * abs(per_line)


def _grown_by_tabs(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    size = _argument(args, kwargs, 0, "tabsize")
    return len(text) + text.count("\t") * abs(size if isinstance(size, int) else 8)


def _grown_by_wrapping(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    wrap = _argument(args, kwargs, 2, "wrapstring")
    return len(text) * (1 + (len(wrap) if isinstance(wrap, str) else 1))


def _grown_by_translate(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    table = _argument(args, kwargs, 0, "table")
    values = table.values() if isinstance(table, Mapping) else ()
    return len(text) * max((len(v) for v in values if isinstance(v, str)), default=1)


def _padded(text: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int:
    width = _argument(args, kwargs, 0, "width")
    return max(len(text), width if isinstance(width, int) else 0)


_GROWS: dict[str, Callable[[str, tuple[Any, ...], Mapping[str, Any]], int]] = {
    "replace": _grown_by_replace,
    "indent": _grown_by_indent,
    "expandtabs": _grown_by_tabs,
    "wordwrap": _grown_by_wrapping,
    "translate": _grown_by_translate,
    "center": _padded,
    "ljust": _padded,
    "rjust": _padded,
    "zfill": _padded,
}
"""Upper bounds of the length of what these filters and string methods return."""


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


class _Limits:
    """One row's budget: MAX_TEMPLATE_STEPS loop iterations and calls and, in the main
    thread, ROW_SECONDS of wall-clock time (see the module docstring)."""

    __slots__ = ("_outer", "_token", "steps")

    def __enter__(self) -> _Limits:
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


_LIMITS: ContextVar[_Limits | None] = ContextVar("skufleet_template_limits", default=None)


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
            raise _OutOfTime(f"the templates took over {ROW_SECONDS} s")
        return  # the row's alarm, come as the row finished
    replaced = _ALARM.replaced
    if callable(replaced):
        replaced(signum, frame)
    elif replaced != signal.SIG_IGN:  # the default action ends the process: so it does
        signal.signal(signum, signal.SIG_DFL)
        signal.raise_signal(signum)


def _start_alarm(seconds: float) -> tuple[float, float, float] | None:
    """Arm SIGALRM for one row; someone else's paused alarm timer, to restore, if any."""
    # _signal.getsignal: signal.getsignal wraps it in an enum lookup that raises and catches
    # a ValueError for a function handler, a microsecond per row
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


_ENVIRONMENT = _Sandbox()


def _describe(exc: Exception) -> str:
    """One line for a template failure: Jinja's own message, or the Python error."""
    if isinstance(exc, TemplateError) and exc.message:
        return exc.message
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _Params(_Strict):
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    scheduler: str | None = None
    aspect: str | None = Field(default=None, pattern=r"^[1-9][0-9]?:[1-9][0-9]?$")
    """Width:height; the shorter side keeps the model's default size (SD 1.5 2:3 → 512×768)."""
    format: str | None = None
    quality: int | None = None
    max_side: int | None = None
    labels: str | None = None
    """A column whose ``;``-separated points are drawn beside the image."""

    def set(self) -> dict[str, Any]:
        """The keys this table sets, checked against GenerationParams' and OutputSpec's rules."""
        values = self.model_dump(include={*PARAM_KEYS, *OUTPUT_KEYS}, exclude_none=True)
        generation = {k: v for k, v in values.items() if k in PARAM_KEYS and k != "aspect"}
        GenerationParams(**{**GenerationParams().model_dump(), **generation})
        try:
            OutputSpec(**{k: v for k, v in values.items() if k in OUTPUT_KEYS and k != "labels"})
        except ValueError as exc:
            raise ConfigError(str(exc)) from exc
        return values


class _Shot(_Params):
    prompt: str
    negative: str | None = None


class _Category(_Strict):
    subject: str = "{{ title }}"
    negative: str = ""
    match: list[str] = Field(default_factory=list)
    params: _Params = Field(default_factory=_Params)
    shots: dict[str, _Shot | str] = Field(min_length=1)


class _Pack(_Strict):
    name: str
    description: str = ""
    category_column: str = "category"
    columns: dict[str, str] = Field(default_factory=dict)
    params: _Params = Field(default_factory=_Params)
    categories: dict[str, _Category] = Field(min_length=1)


@dataclass(frozen=True)
class Shot:
    """One named variant of an item, compiled."""

    name: str
    prompt: _Text
    negative: _Text
    params: dict[str, Any]
    """Parameters this shot sets, on top of the pack's and its category's."""


@dataclass(frozen=True)
class Category:
    name: str
    subject: _Text
    shots: tuple[Shot, ...]


@dataclass(frozen=True)
class Rendered:
    """One item's text and parameter overrides, as a pack renders it from a row."""

    shot: str
    prompt: str
    negative: str
    params: dict[str, Any]


def _clean(text: str) -> str:
    return " ".join(text.split())


class _Text:
    """A compiled template; one that names no variable is rendered once, when loaded."""

    def __init__(self, source: str, label: str, where: str) -> None:
        self.label = label
        """What this text is, in a reject's detail: ``subject``, ``shot 'front' prompt``."""
        try:
            self.template: Template = _ENVIRONMENT.from_string(source)
            names = meta.find_undeclared_variables(_ENVIRONMENT.parse(source))
        except TemplateError as exc:
            raise ConfigError(f"{where}: invalid template: {exc}") from exc
        self.constant: str | None = None
        if not names:
            try:
                with _Limits():
                    self.constant = self.render(dict(_ENVIRONMENT.globals))
            except Exception as exc:  # the same bounds as for a row, found when loading
                raise ConfigError(f"{where}: {_describe(exc)}") from exc

    def render(self, context: dict[str, Any]) -> str:
        """Render with ``context``, which already holds the environment's globals: a shared
        context skips copying them for every one of a catalogue's many renders. The output
        is taken piece by piece and refused once it passes MAX_PROMPT_CHARS."""
        if self.constant is not None:
            return self.constant
        shared = self.template.new_context(context, shared=True)
        parts = []
        size = 0
        for part in self.template.root_render_func(shared):
            size += len(part)
            if size > MAX_PROMPT_CHARS:
                raise SecurityError(f"the text is over {MAX_PROMPT_CHARS:,} characters")
            parts.append(part)
        return _clean("".join(parts))


def _category_key(value: str) -> str:
    return re.sub(r"[\s-]+", "_", value.strip().lower())


class TemplatePack:
    """A compiled template pack."""

    def __init__(self, spec: _Pack, source: str) -> None:
        self.name = spec.name
        self.description = spec.description
        self.source = source
        self.category_column = spec.category_column
        self.columns = dict(spec.columns)
        self.params = spec.params.set()
        self.categories: dict[str, Category] = {}
        self._lookup: dict[str, Category] = {}
        for name, category in spec.categories.items():
            where = f"categories.{name}"  # load() names the file
            if not _NAME.fullmatch(name):
                raise ConfigError(f"{where}: category names are lower-case [a-z0-9_-], 1-32 long")
            shots = []
            for shot_name, shot in category.shots.items():
                if not _NAME.fullmatch(shot_name):
                    raise ConfigError(
                        f"{where}.shots.{shot_name}: shot names are 1-32 of [a-z0-9_-]"
                    )
                spec_shot = shot if isinstance(shot, _Shot) else _Shot(prompt=shot)
                shot_where = f"{where}.shots.{shot_name}"
                shots.append(
                    Shot(
                        name=shot_name,
                        prompt=_Text(
                            spec_shot.prompt, f"shot {shot_name!r} prompt", f"{shot_where}.prompt"
                        ),
                        negative=_Text(
                            category.negative if spec_shot.negative is None else spec_shot.negative,
                            f"shot {shot_name!r} negative prompt",
                            f"{shot_where}.negative",
                        ),
                        params={**category.params.set(), **spec_shot.set()},
                    )
                )
            subject = _Text(category.subject, "subject", f"{where}.subject")
            compiled = Category(name, subject, tuple(shots))
            self.categories[name] = compiled
            for key in [name, *category.match]:
                taken = self._lookup.get(_category_key(key))
                if taken is not None and taken.name != name:
                    raise ConfigError(f"{where}: {key!r} already selects category {taken.name!r}")
                self._lookup[_category_key(key)] = compiled

    @classmethod
    def load(cls, name_or_path: str | Path) -> TemplatePack:
        """A shipped pack by name (``ecommerce``, ``education``, ``medical``) or a TOML file."""
        path = Path(name_or_path)
        if not path.suffix and (PACKS / f"{name_or_path}.toml").exists():
            path = PACKS / f"{name_or_path}.toml"
        try:
            data = tomllib.loads(_read_pack(path))
        except FileNotFoundError:
            shipped = ", ".join(sorted(p.stem for p in PACKS.glob("*.toml")))
            raise ConfigError(
                f"template pack {str(name_or_path)!r} not found (shipped packs: {shipped})"
            ) from None
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"template pack {path}: {exc}") from exc
        try:
            spec = _Pack.model_validate(data)
            pack = cls(spec, str(path))
        except ConfigError as exc:
            raise ConfigError(f"template pack {path}: {exc}") from exc
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()
            )
            raise ConfigError(f"template pack {path}: {problems}") from exc
        return pack

    @classmethod
    def default(cls) -> TemplatePack:
        return cls.load(DEFAULT_PACK)

    def with_columns(self, mapping: Mapping[str, str]) -> TemplatePack:
        """This pack with more column mappings (``sku="ItemID"``) from the command line."""
        clone = object.__new__(TemplatePack)
        clone.__dict__.update(self.__dict__)
        clone.columns = {**self.columns, **mapping}
        return clone

    def category_for(self, fields: Mapping[str, str]) -> Category:
        """The category a row belongs to; ItemError when none matches and none is default."""
        value = fields.get(self.category_column, "")
        found = self._lookup.get(_category_key(value)) or self.categories.get(DEFAULT_CATEGORY)
        if found is None:
            known = ", ".join(sorted(self.categories))
            raise ItemError(
                f"category {value!r} matches none of this pack's categories ({known}) "
                "and the pack has no 'default' category"
            )
        return found

    def render(self, fields: Mapping[str, str]) -> Iterator[Rendered]:
        """One :class:`Rendered` per shot of the row's category, within one row's bounds
        (see the module docstring); ItemError names the text and what went wrong: a missing
        field, any error the template raised, or the bound it hit."""
        category = self.category_for(fields)
        context: dict[str, Any] = {
            **_ENVIRONMENT.globals,
            **fields,
            "row": dict(fields),
            "category": category.name,
        }
        rendered = []
        text = category.subject
        try:
            with _Limits():
                context["subject"] = text.render(context)
                for shot in category.shots:
                    context["shot"] = shot.name
                    text = shot.prompt
                    prompt = text.render(context)
                    text = shot.negative
                    negative = text.render(context)
                    rendered.append(Rendered(shot.name, prompt, negative, shot.params))
        # A template is the pack's code run on the row's data: whatever it raises (a missing
        # field, ZeroDivisionError, RecursionError, MemoryError, a bound above) is this
        # row's failure, never the catalogue's.
        except Exception as exc:
            raise ItemError(
                f"template of category {category.name!r}, {text.label}: {_describe(exc)}"
            ) from exc
        yield from rendered


def _read_pack(path: Path) -> str:
    """The text of a pack file: a regular file of at most MAX_PACK_BYTES of UTF-8.

    Checked before reading, so a directory, ``/dev/zero`` or a FIFO is one clear error
    instead of a hang or a traceback."""
    mode = path.stat().st_mode
    if not stat.S_ISREG(mode):
        raise ConfigError(f"template pack {path} is {file_kind(mode)}, not a TOML file")
    with path.open("rb") as file:
        data = file.read(MAX_PACK_BYTES + 1)
    if len(data) > MAX_PACK_BYTES:
        raise ConfigError(
            f"template pack {path} is over {MAX_PACK_BYTES:,} bytes: packs are small TOML files"
        )
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"template pack {path} is not UTF-8 text: byte {exc.start} is 0x{data[exc.start]:02x}"
        ) from None
