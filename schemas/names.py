"""Task and queue names shared by the producer and the workers.

The producer sends tasks by name and never imports the worker, so the names live here.
Each model has its own queue: a worker loads one pipeline and consumes only its model's queue.
"""

from __future__ import annotations

import hashlib
import re

TASK_RENDER = "skufleet.render"

SCHEDULERS = (
    "default",
    "pndm",
    "ddim",
    "euler",
    "euler_a",
    "dpmpp_2m",
    "dpmpp_2m_karras",
    "unipc",
)
"""Samplers an item can ask for; ``default`` is the model's own (SD 1.5: PNDM). The fast
multistep solvers (``dpmpp_2m``, ``unipc``) give usable images in 20-25 steps."""

TINY_MODEL = "tiny"
"""The built-in, randomly initialised Stable Diffusion pipeline for tests and offline demos."""

_HUB_ID = re.compile(r"[A-Za-z0-9_.-]{1,80}(/[A-Za-z0-9_.-]{1,80})?")
_SLUG_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def model_slug(model: str) -> str:
    """A short, queue-safe name for a model id or path.

    Hub ids and plain names stay readable (``org/name`` becomes ``org--name``); anything else
    (paths, long names, names with ``--``) is cleaned and gets a hash of the original, so two
    models never share a queue.
    """
    if _HUB_ID.fullmatch(model) and "--" not in model and len(model) <= 80:
        return model.replace("/", "--")
    cleaned = _SLUG_UNSAFE.sub("-", model).strip("-.")[-60:].strip("-.")
    digest = hashlib.sha256(model.encode("utf-8", "surrogatepass")).hexdigest()[:8]
    return f"{cleaned}-{digest}" if cleaned else digest


def render_queue(prefix: str, model: str) -> str:
    """The queue that carries render batches for ``model``."""
    return f"{prefix}.render.{model_slug(model)}"
