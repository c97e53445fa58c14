"""Object keys, derived from the item and never taken raw from catalogue text.

A SKU may contain anything a spreadsheet allows: slashes, ``..``, control characters, spaces,
emoji. Keys are built only from normalised segments, so no catalogue value can reach outside
its run's prefix, and two different SKUs never share a key.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata

from schemas.errors import ConfigError

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_SEGMENT = 100


def check_run_name(name: str) -> str:
    """Return ``name`` if it is a valid run name (it becomes the object key prefix)."""
    if not _RUN_NAME.match(name) or ".." in name:
        raise ConfigError(
            f"invalid run name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def safe_segment(value: str) -> str:
    """Normalise ``value`` to one safe key segment.

    A value that is already safe is kept as it is. Any other value is cleaned (NFKC, unsafe
    runs replaced by ``-``, length capped) and suffixed with a hash of the original, so that
    ``A/B`` and ``A-B`` stay two different keys.
    """
    if value and len(value) <= MAX_SEGMENT and _UNSAFE.search(value) is None and value.strip("."):
        return value
    cleaned = _UNSAFE.sub("-", unicodedata.normalize("NFKC", value)).strip("-.")[:MAX_SEGMENT]
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:10]
    return f"{cleaned}-{digest}" if cleaned else digest


def object_key(run: str, sku: str, shot: str, extension: str = "png") -> str:
    """``<run>/<safe sku>/<safe shot>.<extension>``, always inside the run's prefix."""
    return f"{check_run_name(run)}/{safe_segment(sku)}/{safe_segment(shot)}.{extension}"
