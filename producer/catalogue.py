"""Streaming catalogue reader: one record at a time, in constant memory, nothing dropped.

Every record read ends up in exactly one bucket: accepted, rejected (with its record
number, the physical line it starts on, a reason and a detail) or duplicate. So
``accepted + rejected + duplicates == read`` always holds.

Bytes that are not valid in the file's encoding are kept as surrogate escapes while
parsing, so a bad byte rejects only its own record instead of stopping the file.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from schemas.errors import CatalogueError

REQUIRED_COLUMNS = ("sku", "title")
MAX_FIELD_CHARS = 4000
"""A field longer than this is rejected: it is a broken record, not a product."""
MAX_SKU_CHARS = 256

_SURROGATE = re.compile("[\udc80-\udcff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

csv.field_size_limit(1 << 24)  # let over-long fields reach our own check and be reported


@dataclass(frozen=True)
class Record:
    """An accepted catalogue row."""

    number: int
    """1-based record number, header excluded."""
    line: int
    """Physical line the record starts on (the header is line 1)."""
    fields: dict[str, str]

    @property
    def sku(self) -> str:
        return self.fields["sku"]


@dataclass(frozen=True)
class Reject:
    """A record that was not accepted, and why."""

    record: int
    line: int
    reason: str
    detail: str

    def as_dict(self) -> dict[str, object]:
        return {
            "record": self.record,
            "line": self.line,
            "reason": self.reason,
            "detail": self.detail,
        }


@dataclass
class Tally:
    """Counts of records by outcome; ``accepted + rejected + duplicates == read``."""

    read: int = 0
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def count(self, outcome: Record | Reject) -> None:
        self.read += 1
        if isinstance(outcome, Record):
            self.accepted += 1
            return
        if outcome.reason == "duplicate":
            self.duplicates += 1
        else:
            self.rejected += 1
        self.reasons[outcome.reason] = self.reasons.get(outcome.reason, 0) + 1


class Catalogue:
    """Iterate over a CSV catalogue's records, accepted ones as :class:`Record`, others as
    :class:`Reject`. The header is read and checked when the object is created.
    """

    def __init__(
        self,
        path: Path,
        *,
        encoding: str = "utf-8-sig",
        required: Sequence[str] = REQUIRED_COLUMNS,
        max_field_chars: int = MAX_FIELD_CHARS,
    ) -> None:
        self.path = path
        self.encoding = encoding
        self.max_field_chars = max_field_chars
        try:
            self._file = open(  # noqa: SIM115 - closed by close() / __exit__
                path, encoding=encoding, errors="surrogateescape", newline=""
            )
        except (OSError, LookupError) as exc:
            raise CatalogueError(f"cannot open catalogue {path}: {exc}") from exc
        self._reader = csv.reader(self._file, strict=True)
        try:
            header = next(self._reader)
        except StopIteration:
            raise CatalogueError(f"catalogue {path} is empty: it has no header row") from None
        except csv.Error as exc:
            raise CatalogueError(f"catalogue {path}: cannot parse the header: {exc}") from exc
        self.columns = [name.strip() for name in header]
        if any(_SURROGATE.search(name) for name in self.columns):
            raise CatalogueError(
                f"catalogue {path}: the header is not valid {encoding}; choose --encoding"
            )
        missing = [name for name in required if name not in self.columns]
        if missing:
            raise CatalogueError(
                f"catalogue {path} has no column {', '.join(map(repr, missing))}; "
                f"columns found: {', '.join(map(repr, self.columns))}"
            )
        self._header_lines = self._reader.line_num

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Record | Reject]:
        seen: set[bytes] = set()  # 8-byte digests of SKUs: ~60 MB per million SKUs
        next_line = self._header_lines + 1
        number = 0
        while True:
            line = next_line
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                next_line = self._reader.line_num + 1
                reason = "unterminated_quote" if "end of data" in str(exc) else "malformed_quotes"
                yield Reject(number, line, reason, str(exc))
                continue
            next_line = self._reader.line_num + 1
            if not row:  # a blank line is not a record
                continue
            number += 1
            outcome = self._check(number, line, row)
            if isinstance(outcome, Record):
                digest = hashlib.blake2b(outcome.sku.encode(), digest_size=8).digest()
                if digest in seen:
                    outcome = Reject(
                        number,
                        line,
                        "duplicate",
                        f"sku {outcome.sku!r} appeared earlier in the file",
                    )
                else:
                    seen.add(digest)
            yield outcome

    def _check(self, number: int, line: int, row: list[str]) -> Record | Reject:
        if len(row) != len(self.columns):
            return Reject(
                number, line, "ragged", f"{len(row)} fields, the header has {len(self.columns)}"
            )
        for name, value in zip(self.columns, row, strict=True):
            if "\x00" in value:
                return Reject(number, line, "nul_byte", f"column {name!r} has a NUL byte")
            bad = _SURROGATE.search(value)
            if bad:
                byte = ord(bad.group()) - 0xDC00
                return Reject(
                    number,
                    line,
                    "encoding",
                    f"column {name!r} has byte 0x{byte:02x}, not valid {self.encoding}",
                )
            if len(value) > self.max_field_chars:
                return Reject(
                    number,
                    line,
                    "too_long",
                    f"column {name!r} has {len(value)} characters, "
                    f"the limit is {self.max_field_chars}",
                )
        fields = dict(zip(self.columns, row, strict=True))
        sku = fields["sku"].strip()
        if not sku:
            return Reject(number, line, "invalid_sku", "the sku is empty")
        if _CONTROL.search(sku):
            return Reject(number, line, "invalid_sku", f"the sku {sku!r} has control characters")
        if len(sku) > MAX_SKU_CHARS:
            return Reject(
                number,
                line,
                "invalid_sku",
                f"the sku has {len(sku)} characters, the limit is {MAX_SKU_CHARS}",
            )
        fields["sku"] = sku
        return Record(number, line, fields)
