"""Template packs: per category a subject, a negative prompt, parameters and named shots.

A pack is a TOML file::

    name = "ecommerce"
    category_column = "category"     # which column picks the category (optional)
    manifest_columns = ["brand"]      # columns each manifest line carries (optional)

    [columns]                         # skufleet name = catalogue header (optional)
    sku = "ItemID"

    [params]                          # defaults for every category (optional)
    steps = 30

    [quality]                         # the quality gate (optional, see schemas.gate)
    checks = ["dark", "blank", "duplicate", "safety"]
    thresholds = { dark = 0.08 }
    max_rolls = 2                     # re-rolls of an item whose every candidate failed
    candidates = 1                    # images drawn per item, the best one kept

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
command-line flags; the quality gate's settings as: defaults < the pack's ``[quality]`` <
``--checks``, ``--threshold``, ``--max-rolls``, ``--candidates`` (``schemas.gate``). Packs
usually leave the size to the model and give a shot an ``aspect`` (``"2:3"``): the shorter
side keeps the model's default, so one pack serves SD 1.5 (512×768) and the fast ``tiny``
test model (64×96) alike.

A template is code from the pack run on data from the catalogue, so any failure while it
renders one row (a missing field, a division by zero, a type error, recursion, a runaway
loop) rejects that row alone, as ``template`` with the message, and the catalogue goes on.
The work one row may do is bounded by :mod:`skufleet.producer.sandbox`, which says how: the
length of each text, ranges, loop steps, the size of what one operation may build and, in
the main thread, the wall-clock time of a row.
"""

from __future__ import annotations

import re
import stat
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from jinja2 import Template, TemplateError, meta
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from skufleet.producer.paths import file_kind
from skufleet.producer.sandbox import ENVIRONMENT, RowLimits, render_bounded
from skufleet.schemas import gate
from skufleet.schemas.errors import ConfigError, ItemError
from skufleet.schemas.output import OutputSpec
from skufleet.schemas.params import OUTPUT_KEYS, GenerationParams

EXAMPLES = Path(str(resources.files("skufleet").joinpath("examples")))
"""What ships with skufleet in its package (the repository's ``examples/``): example
catalogues, the packs and the label fonts."""
PACKS = EXAMPLES / "packs"
"""The packs that ship with skufleet, usable by name (``--template education``)."""
DEFAULT_PACK = "ecommerce"
DEFAULT_CATEGORY = "default"

MAX_PACK_BYTES = 1 << 20
"""A pack file is read only up to this size (1 MiB): the shipped ones are under 20 KB."""

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
PARAM_KEYS = ("width", "height", "steps", "guidance_scale", "scheduler", "aspect")
"""Keys of a table that say how the image is drawn; the others are ``OUTPUT_KEYS``."""


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
    compression: str | None = None
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
    manifest_columns: list[str] = Field(default_factory=list, max_length=64)
    """Catalogue columns (as the templates name them) each manifest line carries."""
    columns: dict[str, str] = Field(default_factory=dict)
    params: _Params = Field(default_factory=_Params)
    quality: dict[str, Any] = Field(default_factory=dict)
    """The quality gate's settings (``schemas.gate.from_table``): checks, thresholds,
    max_rolls, candidates."""
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


class _Text:
    """A compiled template; one that names no variable is rendered once, when loaded."""

    def __init__(self, source: str, label: str, where: str) -> None:
        self.label = label
        """What this text is, in a reject's detail: ``subject``, ``shot 'front' prompt``."""
        try:
            self.template: Template = ENVIRONMENT.from_string(source)
            names = meta.find_undeclared_variables(ENVIRONMENT.parse(source))
        except TemplateError as exc:
            raise ConfigError(f"{where}: invalid template: {exc}") from exc
        self.constant: str | None = None
        if not names:
            try:
                with RowLimits():
                    self.constant = self.render(dict(ENVIRONMENT.globals))
            except Exception as exc:  # the same bounds as for a row, found when loading
                raise ConfigError(f"{where}: {_describe(exc)}") from exc

    def render(self, context: dict[str, Any]) -> str:
        """Render with ``context``, which already holds the environment's globals (see
        :func:`~skufleet.producer.sandbox.render_bounded`); runs of whitespace become one
        space."""
        if self.constant is not None:
            return self.constant
        return " ".join(render_bounded(self.template, context).split())


def _category_key(value: str) -> str:
    return re.sub(r"[\s-]+", "_", value.strip().lower())


class TemplatePack:
    """A compiled template pack."""

    def __init__(self, spec: _Pack, source: str) -> None:
        self.name = spec.name
        self.description = spec.description
        self.source = source
        self.category_column = spec.category_column
        self.manifest_columns = tuple(dict.fromkeys(spec.manifest_columns))
        self.columns = dict(spec.columns)
        self.params = spec.params.set()
        self.quality = gate.from_table(spec.quality)
        """The quality-gate settings the pack sets (only those; flags win over them)."""
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
        (see :mod:`skufleet.producer.sandbox`); ItemError names the text and what went
        wrong: a missing field, any error the template raised, or the bound it hit."""
        category = self.category_for(fields)
        context: dict[str, Any] = {
            **ENVIRONMENT.globals,
            **fields,
            "row": dict(fields),
            "category": category.name,
        }
        rendered = []
        text = category.subject
        try:
            with RowLimits():
                context["subject"] = text.render(context)
                for shot in category.shots:
                    context["shot"] = shot.name
                    text = shot.prompt
                    prompt = text.render(context)
                    text = shot.negative
                    negative = text.render(context)
                    rendered.append(Rendered(shot.name, prompt, negative, shot.params))
        # A template is the pack's code run on the row's data: whatever it raises (a missing
        # field, ZeroDivisionError, RecursionError, MemoryError, a sandbox bound) is this
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
