"""Streaming catalogue reader: one record at a time, in constant memory, nothing dropped.

Every record read ends up in exactly one bucket: accepted, rejected (with its record
number, the physical line it starts on, a reason and a detail) or duplicate. So
``accepted + rejected + duplicates == read`` always holds.

Bytes that are not valid in the file's encoding are kept as surrogate escapes while
parsing, so a bad byte rejects only its own record instead of stopping the file.

Memory stays constant whatever the file holds: a physical line, a record or a field over
``MAX_LINE_BYTES`` is a ``too_long`` reject, read past in chunks and never held whole. A file
that is not a CSV at all (a directory, a PNG, a gzip or zip file, UTF-16 text, old Mac line
endings) is refused at once with one line saying what it is. The bytes-to-lines side of both
is :mod:`skufleet.producer.lines`; this module turns lines into checked records.

Fields are separated by commas, semicolons (what spreadsheets write where the comma is the
decimal mark), tabs or pipes: the one the header line uses most is taken, unless the caller
names one (``--delimiter``).
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import os
import re
import stat
import unicodedata
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from skufleet.producer.lines import (
    DELIMITERS,
    HEAD_BYTES,
    MAX_LINE_BYTES,
    Lines,
    RecordTooLong,
    detect_delimiter,
    not_csv,
)
from skufleet.producer.paths import file_kind
from skufleet.schemas.errors import CatalogueError, ConfigError

REQUIRED_COLUMNS = ("sku", "title")
MAX_FIELD_CHARS = 4000
"""A field longer than this is rejected: it is a broken record, not a product."""
MAX_SKU_CHARS = 256

_SURROGATE = re.compile("[\udc80-\udcff]")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BLANKS = " \t\u00a0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u202f\u205f\u3000"
"""Spaces (Unicode Zs) and tabs, trimmed around a SKU; any other control, format or
separator character in a SKU makes it ``invalid_sku``."""
_BAD_IN_SKU = {
    "Cc": "a control character",
    "Cf": "a format character",
    "Zl": "a line separator",
    "Zp": "a paragraph separator",
    "Cs": "a surrogate",
    "Co": "a private-use character",
    "Cn": "an unassigned code point",
}
"""Unicode general categories a SKU may not hold: invisible, or read differently by the
systems a SKU travels through (spreadsheets, S3 keys, logs)."""


_DELIMITER_NAMES = {
    **{name: char for char, name in DELIMITERS.items()},
    **{char: char for char in DELIMITERS},
    "\\t": "\t",
}


def parse_delimiter(value: str, flag: str = "--delimiter") -> str:
    """A delimiter given by name (``comma``, ``semicolon``, ``tab``, ``pipe``) or as itself
    (``,`` ``;`` ``|``, a tab or ``\\t``)."""
    try:
        return _DELIMITER_NAMES[value.strip().lower() or value]
    except KeyError:
        raise ConfigError(
            f"{flag} must be comma, semicolon, tab or pipe (or , ; | \\t), got {value!r}"
        ) from None


# A record (and so a field) over MAX_LINE_BYTES is stopped by Lines first; the parser's own
# limit, lowered from 16 MiB to the same size, is the backstop.
csv.field_size_limit(MAX_LINE_BYTES)


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


STRUCTURAL = frozenset({"ragged", "malformed_quotes", "unterminated_quote", "too_long"})
"""Reasons that may mean a stray quote swallowed the lines after a record's first line."""


class Catalogue:
    """Iterate over a CSV catalogue's records, accepted ones as :class:`Record`, others as
    :class:`Reject`. The header is read and checked when the object is created.

    ``columns`` maps skufleet's names to the catalogue's headers (``{"sku": "ItemID"}``);
    ``delimiter`` is one of :data:`~skufleet.producer.lines.DELIMITERS`, or None to take the
    one the header line uses (:func:`~skufleet.producer.lines.detect_delimiter`).
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
        delimiter: str | None = None,
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
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise CatalogueError(f"catalogue {path} is {file_kind(mode)}, not a CSV file")
            self._raw = open(path, "rb")  # noqa: SIM115 - closed by close() / __exit__
        except OSError as exc:
            raise CatalogueError(f"cannot open catalogue {path}: {exc}") from exc
        head = self._raw.read(HEAD_BYTES)
        problem = not_csv(head)
        if problem:
            self.close()
            raise CatalogueError(f"catalogue {path} {problem}")
        if delimiter is not None and delimiter not in DELIMITERS:
            self.close()
            raise CatalogueError(f"delimiter {delimiter!r} is not one of {''.join(DELIMITERS)!r}")
        self.detected = delimiter is None
        """Whether the delimiter was taken from the header line rather than given."""
        self.delimiter = delimiter or detect_delimiter(
            head.split(b"\n", 1)[0].decode(self.encoding, "replace")
        )
        self._raw.seek(0)
        self._lines = Lines(self._raw, self.encoding)
        self._reader = csv.reader(self._lines, delimiter=self.delimiter, strict=True)
        try:
            header = next(self._reader)
        except StopIteration:
            self.close()
            raise CatalogueError(f"catalogue {path} is empty: it has no header row") from None
        except (csv.Error, RecordTooLong) as exc:
            self.close()
            raise CatalogueError(f"catalogue {path}: cannot parse the header: {exc}") from exc
        if self._lines.too_long:
            self.close()
            raise CatalogueError(f"catalogue {path}: the header's {self._lines.too_long}")
        self.columns = self._map_header([name.strip() for name in header], columns or {})
        missing = [name for name in required if name not in self.columns]
        if missing:
            self.close()
            split = DELIMITERS[self.delimiter] + "s"
            if self.detected:
                split += ", the header's" if len(header) > 1 else ": the header has no delimiter"
            raise CatalogueError(
                f"catalogue {path} has no column {', '.join(map(repr, missing))}; "
                f"columns found: {', '.join(map(repr, self.columns))} (split at {split})"
                + ("" if columns else "; map other headers with --column NAME=HEADER")
                + ("; name the delimiter with --delimiter" if len(self.columns) == 1 else "")
            )

    def _map_header(self, header: list[str], mapping: Mapping[str, str]) -> list[str]:
        if any(_SURROGATE.search(name) for name in header):
            self.close()
            raise CatalogueError(
                f"catalogue {self.path}: the header is not valid {self.encoding}; "
                "choose another --encoding"
            )
        repeated = sorted(name for name, count in Counter(header).items() if count > 1)
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
        self._reader = csv.reader(self._lines, delimiter=self.delimiter, strict=True)

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
            except (csv.Error, RecordTooLong) as exc:
                number += 1
                outcome: Record | Reject = Reject(number, line, _reason(exc), str(exc))
            else:
                if not row:  # a blank line is not a record
                    continue
                number += 1
                outcome = self._check(number, line, row)
            if self._lines.too_long:
                outcome = Reject(number, line, "too_long", self._lines.too_long)
            if isinstance(outcome, Reject):
                if outcome.reason in STRUCTURAL and self._lines.count > line:
                    self._resume_after(line)
            else:
                # SKUs that differ only in how their accents are encoded are one product
                sku = outcome.sku
                key = sku if sku.isascii() else unicodedata.normalize("NFC", sku)
                digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
                if digest in seen:
                    outcome = Reject(
                        number,
                        line,
                        "duplicate",
                        f"sku {sku!r} appeared earlier in the file"
                        + ("" if sku.isascii() else " (compared in Unicode NFC form)"),
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
        sku = fields["sku"].strip(_BLANKS)
        if not sku:
            return Reject(number, line, "invalid_sku", "the sku is empty")
        unfit = _bad_character(sku)
        if unfit:
            return Reject(number, line, "invalid_sku", f"the sku {sku!r} has {unfit}")
        if len(sku) > MAX_SKU_CHARS:
            return Reject(
                number,
                line,
                "invalid_sku",
                f"the sku has {len(sku)} characters, the limit is {MAX_SKU_CHARS}",
            )
        fields["sku"] = sku
        return Record(number, line, fields)


def _reason(exc: Exception) -> str:
    """The reject reason of a record the CSV parser could not finish."""
    if isinstance(exc, RecordTooLong) or "larger than field limit" in str(exc):
        return "too_long"
    return "unterminated_quote" if "end of data" in str(exc) else "malformed_quotes"


def _bad_character(sku: str) -> str | None:
    """The first character of ``sku`` in one of the _BAD_IN_SKU categories, described."""
    if sku.isascii():  # nearly every SKU: one regular expression, no per-character loop
        found = _CONTROL.search(sku)
        return None if found is None else f"a control character U+{ord(found.group()):04X}"
    for char in sku:
        kind = _BAD_IN_SKU.get(unicodedata.category(char))
        if kind:
            name = unicodedata.name(char, "")
            return f"{kind} U+{ord(char):04X}" + (f" ({name})" if name else "")
    return None
