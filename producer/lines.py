"""A catalogue file as physical lines: first checked to be lines of text at all, then read
one line at a time in bounded memory.

:func:`not_csv` looks at the first block of a file for what is plainly not a CSV (an image,
an archive, UTF-16 text, old Mac line endings), and :func:`detect_delimiter` at its header
line for the field delimiter (comma, semicolon, tab or pipe). :class:`Lines` gives the CSV
parser one decoded physical line at a time; a line over ``MAX_LINE_BYTES`` is read past in
chunks and never held whole, and a record whose lines pass it together stops the parser.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterator
from typing import BinaryIO

MAX_LINE_BYTES = 1 << 20
"""A physical line, a record or a field over this many bytes (1 MiB) is ``too_long``."""

HEAD_BYTES = 64 * 1024
"""The first block of a file, looked at for signs that it is not a CSV at all."""
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


def not_csv(head: bytes) -> str | None:
    """What is wrong with a file whose first block is ``head``, if it is plainly not a CSV."""
    for magic, kind, advice in _NOT_CSV:
        if head.startswith(magic):
            return f"is {kind}, not CSV" + (f": {advice}" if advice else "")
    if b"\x00" in head.split(b"\n", 1)[0]:
        return "has NUL bytes in its header line: it is a binary file or UTF-16 text, not CSV"
    if b"\r" in head and b"\n" not in head:
        return "has old Mac line endings (CR only): convert them to LF or CRLF first"
    return None


DELIMITERS = {",": "comma", ";": "semicolon", "\t": "tab", "|": "pipe"}
"""The field delimiters a catalogue may use, in the order that breaks a tie."""


def detect_delimiter(header: str) -> str:
    """The delimiter a catalogue whose header line is ``header`` uses: the one of
    :data:`DELIMITERS` found most often outside quotes; a comma where none is found.

    Counted rather than left to :class:`csv.Sniffer`, which on a single line takes the comma
    of ``sku;title;Name, long`` over its two semicolons.
    """
    counts = dict.fromkeys(DELIMITERS, 0)
    quoted = False
    for char in header:
        if char == '"':
            quoted = not quoted
        elif not quoted and char in counts:
            counts[char] += 1
    best = max(counts, key=counts.__getitem__)  # the first of the most frequent
    return best if counts[best] else ","


_SKIP_BYTES = 64 * 1024
"""Chunk in which the rest of an over-long line is read past."""
_STAND_IN = "-\n"
"""What the CSV parser reads in place of an over-long line (whose record is rejected)."""


class RecordTooLong(Exception):
    """A record's lines passed MAX_LINE_BYTES together (raised through the CSV parser)."""


class Lines:
    """Physical lines of a file, decoded one by one, with their count and the byte offset
    after the line that starts the current record (where parsing resumes after a bad one).

    A line over MAX_LINE_BYTES is read past in chunks and given to the parser as a short
    stand-in, with ``too_long`` saying why the record it belongs to is rejected; a record
    whose lines pass MAX_LINE_BYTES together stops the parser with :class:`RecordTooLong`.
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
            raise RecordTooLong(
                f"the record runs over {MAX_LINE_BYTES:,} bytes by line {self.count} "
                "(a quote left open?)"
            )
        if self.count == 1 and data.startswith(codecs.BOM_UTF8) and self.encoding == "utf-8":
            data = data[len(codecs.BOM_UTF8) :]
        return data.decode(self.encoding, "surrogateescape")
