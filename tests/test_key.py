"""Object keys never leave their run's prefix and never collide, whatever the SKU says."""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.key import check_run_name, is_verbatim, object_key, safe_segment


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
    assert len(segment) <= 117
    assert all(ch.isalnum() or ch in "._-~" for ch in segment)
    assert segment.count("~") == 1  # not kept verbatim: the hash follows the marker


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
    assert all(ch.isascii() and (ch.isalnum() or ch in "._-~") for part in parts for ch in part)


@given(st.text(max_size=120), st.text(max_size=120))
def test_two_different_skus_never_share_a_key(first: str, second: str) -> None:
    """Property: the key scheme is injective, whatever the two SKUs are."""
    if first != second:
        assert object_key("run", first, "main") != object_key("run", second, "main")


@given(st.from_regex(r"[A-Za-z0-9._/~ -]{0,12}", fullmatch=True))
def test_a_sku_never_gets_the_key_of_its_own_key_segment(sku: str) -> None:
    """Property: the text of a SKU's key segment, used as a SKU, is another key; with an
    alphabet this small, hypothesis tries the verbatim/hashed boundary hard."""
    segment = safe_segment(sku)
    if segment != sku:
        assert safe_segment(segment) != segment
        assert object_key("run", segment, "main") != object_key("run", sku, "main")


def test_a_sku_equal_to_another_skus_cleaned_form_gets_its_own_key() -> None:
    """The attack: ``A/B`` next to the text of its old key segment (``A-B-<10 hex>``) and of
    its new one (``A-B~<16 hex>``): three SKUs, three keys."""
    digest = hashlib.sha256(b"A/B").hexdigest()
    old_form, new_form = f"A-B-{digest[:10]}", f"A-B~{digest[:16]}"
    assert safe_segment("A/B") == new_form
    keys = {object_key("run", sku, "main") for sku in ("A/B", old_form, new_form)}
    assert len(keys) == 3
    assert object_key("run", old_form, "main") == f"run/{old_form}/main.png"  # kept verbatim
    assert is_verbatim(old_form) and not is_verbatim(new_form)


@pytest.mark.parametrize("sku", ["x" * 100, "...a", "a.b_c-D"])
def test_every_safe_sku_up_to_100_characters_is_kept_verbatim(sku: str) -> None:
    """Safe SKUs read as themselves in the bucket."""
    assert safe_segment(sku) == sku


@pytest.mark.parametrize("sku", ["x" * 101, "...", "a~b"])
def test_a_long_all_dots_or_marked_sku_is_hashed(sku: str) -> None:
    """Over 100 characters, only dots, or a ``~`` (the marker): hashed, never verbatim."""
    assert safe_segment(sku).count("~") == 1 and safe_segment(sku) != sku


@pytest.mark.parametrize("name", ["", "../x", "a/b", ".hidden", "x" * 65, "sp ace", "a..b"])
def test_invalid_run_names_are_refused_with_the_name(name: str) -> None:
    """A run name becomes the key prefix, so only a safe one is accepted."""
    with pytest.raises(ConfigError, match="invalid run name"):
        check_run_name(name)
