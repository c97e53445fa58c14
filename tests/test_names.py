"""Each model has its own queue, with a name safe for any broker."""

from __future__ import annotations

import re

from skufleet.schemas.names import model_slug, render_queue


def test_queue_names_carry_prefix_and_model() -> None:
    """Workers of one model consume only that model's queue."""
    assert render_queue("skufleet", "tiny") == "skufleet.render.tiny"
    assert render_queue("fleet-a", "stable-diffusion-v1-5/stable-diffusion-v1-5") == (
        "fleet-a.render.stable-diffusion-v1-5--stable-diffusion-v1-5"
    )


def test_different_models_never_share_a_queue() -> None:
    """Paths and ids that clean up alike still get distinct queues."""
    models = ["/models/SD 1.5", "/models/sd-1.5", "org/model", "org--model", "x" * 200, "y" * 200]
    slugs = [model_slug(m) for m in models]
    assert len(set(slugs)) == len(models)
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", slug) for slug in slugs)
