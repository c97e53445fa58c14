"""Object keys never leave their run's prefix and never collide, whatever the SKU says."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.errors import ConfigError
from schemas.key import check_run_name, object_key, safe_segment


def test_a_safe_sku_is_kept_as_it_is() -> None:
    """Ordinary SKUs appear verbatim in their key."""
    assert object_key("spring-2026", "SHOE-1001", "main") == "spring-2026/SHOE-1001/main.png"


@pytest.mark.parametrize(
    "sku",
    ["../../etc/passwd", "a/b", "..", ".", "", "tab\there", "new\nline", "ünï cødé", "x" * 500],
)
def test_unsafe_skus_become_one_safe_segment(sku: str) -> None:
    """Slashes, dot segments, control characters, empty and over-long values are normalised."""
    key = object_key("run", sku, "main")
    run, segment, name = key.split("/")
    assert (run, name) == ("run", "main.png")
    assert segment not in ("", ".", "..")
    assert len(segment) <= 111
    assert all(ch.isalnum() or ch in "._-" for ch in segment)


def test_skus_that_normalise_alike_keep_distinct_keys() -> None:
    """``A/B``, ``A B`` and ``A-B`` are three products and three objects."""
    keys = {safe_segment(sku) for sku in ("A/B", "A B", "A-B", "a-b")}
    assert len(keys) == 4


@given(st.text(max_size=300), st.text(max_size=40))
def test_no_sku_or_shot_can_escape_the_run_prefix(sku: str, shot: str) -> None:
    """Property: every key is exactly ``run/segment/segment.png`` with safe segments."""
    parts = object_key("run-1", sku, shot).split("/")
    assert len(parts) == 3 and parts[0] == "run-1"
    assert all(part not in ("", ".", "..") for part in parts)
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-") for part in parts for ch in part)


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace", "a..b"])
def test_invalid_run_names_are_refused_with_the_name(name: str) -> None:
    """A run name becomes the key prefix, so only a safe one is accepted."""
    with pytest.raises(ConfigError, match="invalid run name"):
        check_run_name(name)
