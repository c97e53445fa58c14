"""Seeds derive from (run seed, sku, shot) and nothing else."""

from __future__ import annotations

from skufleet.producer.seed import SEED_SPACE, derive_seed


def test_the_same_inputs_give_the_same_seed() -> None:
    """Re-running a catalogue with the same run seed reproduces every item's seed."""
    assert derive_seed(7, "SHOE-1", "main") == derive_seed(7, "SHOE-1", "main")


def test_each_input_changes_the_seed() -> None:
    """Run seed, SKU and shot each feed the seed."""
    base = derive_seed(7, "SHOE-1", "main")
    assert derive_seed(8, "SHOE-1", "main") != base
    assert derive_seed(7, "SHOE-2", "main") != base
    assert derive_seed(7, "SHOE-1", "side") != base


def test_field_boundaries_are_unambiguous() -> None:
    """("ab", "c") and ("a", "bc") are different items with different seeds."""
    assert derive_seed(0, "ab", "c") != derive_seed(0, "a", "bc")


def test_seeds_are_unsigned_32_bit() -> None:
    """Every seed fits the range other Stable Diffusion tools accept."""
    seeds = {derive_seed(1, f"SKU-{i}", "main") for i in range(2000)}
    assert all(0 <= seed < SEED_SPACE for seed in seeds)
    assert len(seeds) == 2000
