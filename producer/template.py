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
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import StrictUndefined, Template, TemplateError, meta
from jinja2.sandbox import SandboxedEnvironment
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from schemas.errors import ConfigError, ItemError
from schemas.output import OutputSpec
from schemas.params import GenerationParams

PACKS = Path(__file__).resolve().parent / "packs"
"""The packs that ship with skufleet, usable by name (``--template education``)."""
DEFAULT_PACK = "ecommerce"
DEFAULT_CATEGORY = "default"

_ENVIRONMENT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)
_NAME = r"^[a-z0-9][a-z0-9_-]{0,31}$"
PARAM_KEYS = ("width", "height", "steps", "guidance_scale", "scheduler", "aspect")
OUTPUT_KEYS = ("format", "quality", "max_side", "labels")


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

    def __init__(self, source: str, where: str) -> None:
        try:
            self.template: Template = _ENVIRONMENT.from_string(source)
            names = meta.find_undeclared_variables(_ENVIRONMENT.parse(source))
            self.constant = None if names else _clean(self.template.render())
        except TemplateError as exc:
            raise ConfigError(f"{where}: invalid template: {exc}") from exc

    def render(self, context: dict[str, Any]) -> str:
        """Render with ``context``, which already holds the environment's globals: a shared
        context skips copying them for every one of a catalogue's many renders."""
        if self.constant is not None:
            return self.constant
        shared = self.template.new_context(context, shared=True)
        return _clean("".join(self.template.root_render_func(shared)))


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
            where = f"{source}: categories.{name}"
            if not re.match(_NAME, name):
                raise ConfigError(f"{where}: category names are lower-case [a-z0-9_-]")
            shots = []
            for shot_name, shot in category.shots.items():
                if not re.match(_NAME, shot_name):
                    raise ConfigError(
                        f"{where}.shots.{shot_name}: shot names are 1-32 of [a-z0-9_-]"
                    )
                spec_shot = shot if isinstance(shot, _Shot) else _Shot(prompt=shot)
                shots.append(
                    Shot(
                        name=shot_name,
                        prompt=_Text(spec_shot.prompt, f"{where}.shots.{shot_name}.prompt"),
                        negative=_Text(
                            category.negative if spec_shot.negative is None else spec_shot.negative,
                            f"{where}.shots.{shot_name}.negative",
                        ),
                        params={**category.params.set(), **spec_shot.set()},
                    )
                )
            compiled = Category(name, _Text(category.subject, f"{where}.subject"), tuple(shots))
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
            data = tomllib.loads(path.read_text(encoding="utf-8"))
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
        """One :class:`Rendered` per shot of the row's category; ItemError names a missing
        field or another template error."""
        category = self.category_for(fields)
        context: dict[str, Any] = {
            **_ENVIRONMENT.globals,
            **fields,
            "row": dict(fields),
            "category": category.name,
        }
        try:
            context["subject"] = category.subject.render(context)
            rendered = []
            for shot in category.shots:
                context["shot"] = shot.name
                rendered.append(
                    Rendered(
                        shot=shot.name,
                        prompt=shot.prompt.render(context),
                        negative=shot.negative.render(context),
                        params=shot.params,
                    )
                )
        except TemplateError as exc:
            raise ItemError(f"template of category {category.name!r}: {exc.message}") from exc
        yield from rendered
