"""Generation parameters and the render message payload."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from schemas.names import SCHEDULERS, TINY_MODEL

Scheduler = Literal[SCHEDULERS]  # type: ignore[valid-type]


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


class RenderPayload(BaseModel):
    """The body of one ``skufleet.render`` message: ids only, never rows or images."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    run_id: int
    model: str
    item_ids: list[int] = Field(min_length=1, max_length=1024)
