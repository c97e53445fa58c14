"""Streaming catalogue reader: one record at a time, in constant memory, nothing dropped.

Every record read ends up in exactly one bucket: accepted, rejected (with its record
number, the physical line it starts on, a reason and a detail) or duplicate. So
``accepted + rejected + duplicates == read`` always holds.

Bytes that are not valid in the file's encoding are kept as surrogate escapes while
parsing, so a bad byte rejects only its own record instead of stopping the file.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

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


class _Lines:
    """Physical lines of a file, decoded one by one, with their count and the byte offset
    after the line that starts the current record (where parsing resumes after a bad one)."""

    def __init__(self, raw: BinaryIO, encoding: str) -> None:
        self.raw = raw
        self.encoding = encoding
        self.count = 0
        self.resume_offset = 0
        self._marked = False

    def mark(self) -> None:
        """The next line read starts a record."""
        self._marked = True

    def seek(self, offset: int, count: int) -> None:
        self.raw.seek(offset)
        self.count = count

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        data = self.raw.readline()
        if not data:
            raise StopIteration
        self.count += 1
        if self._marked:
            self.resume_offset = self.raw.tell()
            self._marked = False
        if self.count == 1 and data.startswith(codecs.BOM_UTF8) and self.encoding == "utf-8":
            data = data[len(codecs.BOM_UTF8) :]
        return data.decode(self.encoding, "surrogateescape")


STRUCTURAL = frozenset({"ragged", "malformed_quotes", "unterminated_quote", "too_long"})
"""Reasons that may mean a stray quote swallowed the lines after a record's first line."""


class Catalogue:
    """Iterate over a CSV catalogue's records, accepted ones as :class:`Record`, others as
    :class:`Reject`. The header is read and checked when the object is created.

    ``columns`` maps skufleet's names to the catalogue's headers (``{"sku": "ItemID"}``).
    When a record that spans several physical lines is rejected for its structure (a stray
    quote makes the following lines part of it), only its first line is consumed: parsing
    resumes on the next line, so the records a stray quote swallowed are still read.
    """

    def __init__(
        self,
        path: Path,
        *,
        encoding: str = "utf-8",
        required: Sequence[str] = REQUIRED_COLUMNS,
        max_field_chars: int = MAX_FIELD_CHARS,
        columns: Mapping[str, str] | None = None,
    ) -> None:
        self.path = path
        self.max_field_chars = max_field_chars
        try:
            codec = codecs.lookup(encoding)
        except LookupError:
            raise CatalogueError(f"unknown encoding {encoding!r}") from None
        if "\n".encode(codec.name) != b"\n" or ",".encode(codec.name) != b",":
            raise CatalogueError(
                f"encoding {encoding!r} is not ASCII-compatible; convert the catalogue to UTF-8"
            )
        # utf-8-sig is read as utf-8 with the BOM of the first line removed
        self.encoding = "utf-8" if codec.name in ("utf-8", "utf-8-sig") else codec.name
        try:
            self._raw = open(path, "rb")  # noqa: SIM115 - closed by close() / __exit__
        except OSError as exc:
            raise CatalogueError(f"cannot open catalogue {path}: {exc}") from exc
        self._lines = _Lines(self._raw, self.encoding)
        self._reader = csv.reader(self._lines, strict=True)
        try:
            header = next(self._reader)
        except StopIteration:
            self.close()
            raise CatalogueError(f"catalogue {path} is empty: it has no header row") from None
        except csv.Error as exc:
            self.close()
            raise CatalogueError(f"catalogue {path}: cannot parse the header: {exc}") from exc
        self.columns = self._map_header([name.strip() for name in header], columns or {})
        missing = [name for name in required if name not in self.columns]
        if missing:
            self.close()
            raise CatalogueError(
                f"catalogue {path} has no column {', '.join(map(repr, missing))}; "
                f"columns found: {', '.join(map(repr, self.columns))}"
                + ("" if columns else "; map other headers with --column NAME=HEADER")
            )

    def _map_header(self, header: list[str], mapping: Mapping[str, str]) -> list[str]:
        if any(_SURROGATE.search(name) for name in header):
            self.close()
            raise CatalogueError(
                f"catalogue {self.path}: the header is not valid {self.encoding}; "
                "choose another --encoding"
            )
        repeated = sorted({name for name in header if header.count(name) > 1})
        if repeated:
            self.close()
            raise CatalogueError(
                f"catalogue {self.path}: column {', '.join(map(repr, repeated))} appears twice"
            )
        renamed = {source: name for name, source in mapping.items()}
        for name, source in mapping.items():
            if source not in header:
                self.close()
                raise CatalogueError(
                    f"column mapping {name}={source!r}: catalogue {self.path} has no column "
                    f"{source!r}; columns found: {', '.join(map(repr, header))}"
                )
            if name in header and name != source:
                self.close()
                raise CatalogueError(
                    f"column mapping {name}={source!r}: catalogue {self.path} already has a "
                    f"column {name!r}"
                )
        return [renamed.get(name, name) for name in header]

    def close(self) -> None:
        self._raw.close()

    def __enter__(self) -> Catalogue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _resume_after(self, line: int) -> None:
        """Parse again from the physical line after ``line``, the first line of a bad record."""
        self._lines.seek(self._lines.resume_offset, line)
        self._reader = csv.reader(self._lines, strict=True)

    def __iter__(self) -> Iterator[Record | Reject]:
        seen: set[bytes] = set()  # 8-byte digests of SKUs: ~60 MB per million SKUs
        number = 0
        while True:
            self._lines.mark()
            line = self._lines.count + 1
            try:
                row = next(self._reader)
            except StopIteration:
                return
            except csv.Error as exc:
                number += 1
                reason = "unterminated_quote" if "end of data" in str(exc) else "malformed_quotes"
                outcome: Record | Reject = Reject(number, line, reason, str(exc))
            else:
                if not row:  # a blank line is not a record
                    continue
                number += 1
                outcome = self._check(number, line, row)
            if isinstance(outcome, Reject):
                if outcome.reason in STRUCTURAL and self._lines.count > line:
                    self._resume_after(line)
            else:
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
