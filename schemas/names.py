"""Task and queue names shared by the producer and the workers.

The producer sends tasks by name and never imports the worker, so the names live here.
Each model has its own queue: a worker loads one pipeline and consumes only its model's queue.
"""

from __future__ import annotations

import hashlib
import re

TASK_RENDER = "skufleet.render"

TINY_MODEL = "tiny"
"""The built-in, randomly initialised Stable Diffusion pipeline for tests and offline demos."""

_SLUG_UNSAFE = re.compile(r"[^a-z0-9_.-]+")


def model_slug(model: str) -> str:
    """A short, queue-safe name for a model id or path.

    Hub ids keep a readable form (``stable-diffusion-v1-5--stable-diffusion-v1-5``); anything
    long, or changed by the cleaning, gets a hash suffix so two models never share a queue.
    """
    cleaned = _SLUG_UNSAFE.sub("-", model.strip().lower().replace("/", "--")).strip("-.")
    if cleaned == model and len(cleaned) <= 80:
        return cleaned
    digest = hashlib.sha256(model.encode()).hexdigest()[:8]
    return f"{cleaned[-60:].strip('-.')}-{digest}"


def render_queue(prefix: str, model: str) -> str:
    """The queue that carries render batches for ``model``."""
    return f"{prefix}.render.{model_slug(model)}"
