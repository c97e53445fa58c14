"""Deterministic seeds: the same (run seed, sku, shot) always gives the same image seed.

The run's *name* is deliberately not an input, so the same catalogue and seed reproduce
the same images in any run.
"""

from __future__ import annotations

import hashlib

SEED_SPACE = 2**32
"""Seeds are unsigned 32-bit, the range every Stable Diffusion tool accepts."""


def derive_seed(run_seed: int, sku: str, shot: str) -> int:
    """The seed of one item: a hash of the run seed, the SKU and the shot name."""
    material = f"{run_seed}\x1f{sku}\x1f{shot}".encode("utf-8", "surrogatepass")
    return int.from_bytes(hashlib.sha256(material).digest()[:8], "big") % SEED_SPACE
