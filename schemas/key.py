"""Object keys, derived from the item and never taken raw from catalogue text.

A SKU may contain anything a spreadsheet allows: slashes, ``..``, control characters, spaces,
emoji. Keys are built only from normalised segments, so no catalogue value can reach outside
its run's prefix, and the scheme is injective: no SKU text can produce another SKU's key.

- A SKU made only of ``A-Z a-z 0-9 . _ -`` (at most 100 characters, not only dots) is kept
  verbatim: ``spring/SHOE-1001/front.png``.
- Any other SKU becomes ``<cleaned>~<hash>``: the cleaned text for readability, then ``~``
  and 16 hex digits of the SHA-256 of the original. A verbatim segment never contains
  ``~``, so the two kinds cannot meet, and two different non-verbatim SKUs differ in their
  hash. The ledger backs this with a unique (run, object key) constraint.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from skufleet.schemas.errors import ConfigError

_VERBATIM = re.compile(r"[A-Za-z0-9._-]{1,100}")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SEGMENT = 100
MARKER = "~"
"""Separates a cleaned segment from its hash; never part of a verbatim segment."""
HASH_DIGITS = 16
"""64 bits of SHA-256: a collision among a billion distinct SKUs is about 3 in 100,000."""


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a valid run name (it becomes the object key prefix)."""
    if not _RUN_NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"invalid run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def is_verbatim(value: str) -> bool:
    """Whether ``value`` is used in a key as it is."""
    return _VERBATIM.fullmatch(value) is not None and value.strip(".") != ""


def safe_segment(value: str) -> str:
    """Normalise ``value`` to one safe key segment (see the module docstring)."""
    if is_verbatim(value):
        return value
    # readable where it can be: accents dropped (ü → u), every other unsafe run becomes '-'
    letters = "".join(
        ch for ch in unicodedata.normalize("NFKD", value) if not unicodedata.combining(ch)
    )
    cleaned = _UNSAFE.sub("-", letters).strip("-.")[:MAX_SEGMENT]
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:HASH_DIGITS]
    return f"{cleaned.rstrip('-.')}{MARKER}{digest}" if cleaned else f"{MARKER}{digest}"


def object_key(run: str, sku: str, shot: str, extension: str = "png") -> str:
    """``<run>/<safe sku>/<safe shot>.<extension>``, always inside the run's prefix."""
    return f"{check_run_name(run)}/{safe_segment(sku)}/{safe_segment(shot)}.{extension}"
