"""Streaming catalogue reader: one record at a time, in constant memory, nothing dropped.

Every record read ends up in exactly one bucket: accepted, rejected (with its record
number, the physical line it starts on, a reason and a detail) or duplicate. So
``accepted + rejected + duplicates == read`` always holds.

Bytes that are not valid in the file's encoding are kept as surrogate escapes while
parsing, so a bad byte rejects only its own record instead of stopping the file.

Memory stays constant whatever the file holds: a physical line, a record or a field over
``MAX_LINE_BYTES`` is a ``too_long`` reject, read past in chunks and never held whole. A file
that is not a CSV at all (a directory, a PNG, a gzip or zip file, UTF-16 text, old Mac line
endings) is refused at once with one line saying what it is.
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
from typing import BinaryIO

from producer.paths import file_kind
from schemas.errors import CatalogueError

REQUIRED_COLUMNS = ("sku", "title")
MAX_FIELD_CHARS = 4000
"""A field longer than this is rejected: it is a broken record, not a product."""
MAX_SKU_CHARS = 256
MAX_LINE_BYTES = 1 << 20
"""A physical line, a record or a field over this many bytes (1 MiB) is ``too_long``."""

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

_HEAD_BYTES = 64 * 1024
"""The first block of a file, looked at for signs that it is not a CSV at all."""
_SKIP_BYTES = 64 * 1024
"""Chunk in which the rest of an over-long line is read past."""
_STAND_IN = "-\n"
"""What the CSV parser reads in place of an over-long line (whose record is rejected)."""
_NOT_CSV = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image", ""),
    (b"\xff\xd8\xff", "a JPEG image", ""),
    (b"GIF87a", "a GIF image", ""),
    (b"GIF89a", "a GIF image", ""),
    (b"%PDF-", "a PDF document", ""),
    (b"\x1f\x8b", "a gzip file", "decompress it first"),
    (b"\xfd7zXZ\x00", "an xz file", "decompress it first"),
    (b"(\xb5/\xfd", "a zstd file", "decompress it first"),
    (b"PK\x03\x04", "a zip archive (an .xlsx workbook is one)", "extract or export the CSV"),
    (b"PK\x05\x06", "an empty zip archive", ""),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive", "extract the CSV first"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Office file (.xls)", "export it as CSV"),
    (b"\xff\xfe\x00\x00", "UTF-32 text", "save it as UTF-8"),
    (b"\x00\x00\xfe\xff", "UTF-32 text", "save it as UTF-8"),
    (b"\xff\xfe", "UTF-16 text", "save it as UTF-8"),
    (b"\xfe\xff", "UTF-16 text", "save it as UTF-8"),
)
"""Magic bytes of files often given instead of a CSV: what it is, what to do. Other binary
files (SQLite, Parquet, executables) have a NUL byte in what would be the header line."""

# A record (and so a field) over MAX_LINE_BYTES is stopped by _Lines first; the parser's own
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


class _RecordTooLong(Exception):
    """A record's lines passed MAX_LINE_BYTES together (raised through the CSV parser)."""


class _Lines:
    """Physical lines of a file, decoded one by one, with their count and the byte offset
    after the line that starts the current record (where parsing resumes after a bad one).

    A line over MAX_LINE_BYTES is read past in chunks and given to the parser as a short
    stand-in, with ``too_long`` saying why the record it belongs to is rejected; a record
    whose lines pass MAX_LINE_BYTES together stops the parser with :class:`_RecordTooLong`.
    """

    def __init__(self, raw: BinaryIO, encoding: str) -> None:
        self.raw = raw
        self.encoding = encoding
        self.count = 0
        self.resume_offset = 0
        self.too_long: str | None = None
        """Why the current record is too long, once one of its lines was."""
        self._marked = False
        self._record_bytes = 0

    def mark(self) -> None:
        """The next line read starts a record."""
        self._marked = True
        self.too_long = None
        self._record_bytes = 0

    def seek(self, offset: int, count: int) -> None:
        self.raw.seek(offset)
        self.count = count

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        data = self.raw.readline(MAX_LINE_BYTES + 1)
        if not data:
            raise StopIteration
        self.count += 1
        overlong = len(data) > MAX_LINE_BYTES and not data.endswith(b"\n")
        if overlong:
            while (rest := self.raw.readline(_SKIP_BYTES)) and not rest.endswith(b"\n"):
                pass
        if self._marked:
            self.resume_offset = self.raw.tell()
            self._marked = False
        if overlong:
            self.too_long = self.too_long or f"line {self.count} is over {MAX_LINE_BYTES:,} bytes"
            return _STAND_IN
        self._record_bytes += len(data)
        if self._record_bytes > MAX_LINE_BYTES:
            raise _RecordTooLong(
                f"the record runs over {MAX_LINE_BYTES:,} bytes by line {self.count} "
                "(a quote left open?)"
            )
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
            mode = os.stat(path).st_mode
            if not stat.S_ISREG(mode):
                raise CatalogueError(f"catalogue {path} is {file_kind(mode)}, not a CSV file")
            self._raw = open(path, "rb")  # noqa: SIM115 - closed by close() / __exit__
        except OSError as exc:
            raise CatalogueError(f"cannot open catalogue {path}: {exc}") from exc
        problem = _not_csv(self._raw.read(_HEAD_BYTES))
        if problem:
            self.close()
            raise CatalogueError(f"catalogue {path} {problem}")
        self._raw.seek(0)
        self._lines = _Lines(self._raw, self.encoding)
        self._reader = csv.reader(self._lines, strict=True)
        try:
            header = next(self._reader)
        except StopIteration:
            self.close()
            raise CatalogueError(f"catalogue {path} is empty: it has no header row") from None
        except (csv.Error, _RecordTooLong) as exc:
            self.close()
            raise CatalogueError(f"catalogue {path}: cannot parse the header: {exc}") from exc
        if self._lines.too_long:
            self.close()
            raise CatalogueError(f"catalogue {path}: the header's {self._lines.too_long}")
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
            except (csv.Error, _RecordTooLong) as exc:
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
    if isinstance(exc, _RecordTooLong) or "larger than field limit" in str(exc):
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


def _not_csv(head: bytes) -> str | None:
    """What is wrong with a file whose first block is ``head``, if it is plainly not a CSV."""
    for magic, kind, advice in _NOT_CSV:
        if head.startswith(magic):
            return f"is {kind}, not CSV" + (f": {advice}" if advice else "")
    if b"\x00" in head.split(b"\n", 1)[0]:
        return "has NUL bytes in its header line: it is a binary file or UTF-16 text, not CSV"
    if b"\r" in head and b"\n" not in head:
        return "has old Mac line endings (CR only): convert them to LF or CRLF first"
    return None
