"""Generation parameters, how their layers resolve, and the render message payload.

Parameters resolve as: model defaults < pack ``params`` < category ``params`` < shot keys <
command-line flags, in :func:`layer` alone; the enqueue, ``skufleet generate`` and the
command line's own check all call it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.names import SCHEDULERS, TINY_MODEL
from skufleet.schemas.output import OutputSpec

Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]

DEFAULT_BATCH_SIZE = 8
"""Items per render message: ``--batch-size``'s default, the reconciler's, and a run's when
its enqueue recorded none."""

OUTPUT_KEYS = ("format", "quality", "compression", "max_side", "labels")
"""Keys of a parameter layer that say how the image is stored (:class:`OutputSpec`), not
how it is drawn; ``labels`` names the catalogue column the labels are read from."""


class GenerationParams(BaseModel):
    """How one image is generated; items that share these can share a batch."""

    model_config = ConfigDict(frozen=True)

    width: int = Field(default=512, ge=8, le=2048, multiple_of=8)
    height: int = Field(default=512, ge=8, le=2048, multiple_of=8)
    steps: int = Field(default=30, ge=1, le=500)
    guidance_scale: float = Field(default=7.5, ge=0, le=50)
    scheduler: Scheduler = "default"


def default_params(model: str) -> GenerationParams:
    """Defaults per model: SD 1.5 draws 512×512 in 30 steps; ``tiny`` draws 64×64 fast."""
    if model == TINY_MODEL:
        return GenerationParams(width=64, height=64, steps=8, guidance_scale=7.5)
    return GenerationParams()


def aspect_size(aspect: str, width: int, height: int) -> tuple[int, int]:
    """The size with ratio ``aspect`` whose shorter side is the shorter of the model's default
    ``width``/``height``, both rounded to multiples of 8."""
    ratio_w, ratio_h = (int(part) for part in aspect.split(":"))
    short = min(width, height)
    if ratio_w >= ratio_h:
        return round(short * ratio_w / ratio_h / 8) * 8, short
    return short, round(short * ratio_h / ratio_w / 8) * 8


@dataclass(frozen=True)
class Layered:
    """Parameters resolved from their layers: how the image is drawn, how it is stored."""

    params: GenerationParams
    output: dict[str, Any]
    """The output keys the layers gave (:data:`OUTPUT_KEYS`); ``labels`` is a column name."""

    def spec(self, labels: tuple[str, ...] = ()) -> OutputSpec:
        """How the image is stored, with ``labels`` read from the row's labels column.

        Raises ValueError for labels OutputSpec refuses (too many, too long)."""
        return OutputSpec(**{k: v for k, v in self.output.items() if k != "labels"}, labels=labels)


def layer(
    model: str,
    *,
    pack: Mapping[str, Any] | None = None,
    shot: Mapping[str, Any] | None = None,
    flags: Mapping[str, Any] | None = None,
    context: str = "invalid generation parameters",
) -> Layered:
    """``model``'s defaults < ``pack`` (the pack's ``params``) < ``shot`` (a shot's keys over
    its category's ``params``, as the pack renders them) < ``flags`` (the command line),
    validated.

    An ``aspect`` ratio sets the size, keeping the shorter side of the model's and the pack's
    size, unless the shot or the command line gives a width or height itself. A
    :class:`ConfigError` saying ``context`` names what is invalid.
    """
    pack, shot, flags = pack or {}, shot or {}, flags or {}
    below = {**default_params(model).model_dump(), **pack}
    merged = {**below, **shot, **flags}
    try:
        aspect = merged.pop("aspect", None)
        if aspect and not {"width", "height"} & {*shot, *flags}:
            merged["width"], merged["height"] = aspect_size(aspect, below["width"], below["height"])
        output = {key: merged.pop(key) for key in OUTPUT_KEYS if key in merged}
        layered = Layered(GenerationParams(**merged), output)
        layered.spec()  # the output keys are checked once here, labels aside
    except ValueError as exc:  # pydantic's ValidationError is one
        raise ConfigError(f"{context}: {exc}") from exc
    return layered


class RenderPayload(BaseModel):
    """The body of one ``skufleet.render`` message: ids only, never rows or images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: int
    model: str
    item_ids: list[int] = Field(min_length=1, max_length=1024)
