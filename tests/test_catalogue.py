"""The catalogue reader accounts for every record and names what is wrong with bad ones."""

from __future__ import annotations

import csv
import gzip
import io
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from skufleet.producer.catalogue import (
    MAX_FIELD_CHARS,
    Catalogue,
    Record,
    Reject,
    Tally,
)
from skufleet.producer.lines import MAX_LINE_BYTES
from skufleet.schemas.errors import CatalogueError


def read(path: Path, **kwargs: object) -> tuple[list[Record | Reject], Tally]:
    tally = Tally()
    with Catalogue(path, **kwargs) as catalogue:  # type: ignore[arg-type]
        outcomes = list(catalogue)
    for outcome in outcomes:
        tally.count(outcome)
    return outcomes, tally


def rejects(outcomes: list[Record | Reject]) -> list[tuple[int, int, str]]:
    return [(o.record, o.line, o.reason) for o in outcomes if isinstance(o, Reject)]


def test_good_rows_are_accepted_with_their_record_and_line_numbers(tmp_path: Path) -> None:
    """Quoted commas and newlines are data; a BOM is not; line numbers are physical lines."""
    path = tmp_path / "c.csv"
    path.write_bytes(b'\xef\xbb\xbfsku,title\r\nA,"one, two"\r\nB,"multi\r\nline"\r\n\r\nC,x\r\n')
    outcomes, tally = read(path)
    assert [(o.number, o.line, o.sku) for o in outcomes if isinstance(o, Record)] == [
        (1, 2, "A"),
        (2, 3, "B"),
        (3, 6, "C"),
    ]
    assert outcomes[0].fields == {"sku": "A", "title": "one, two"}  # type: ignore[union-attr]
    assert outcomes[1].fields["title"] == "multi\r\nline"  # type: ignore[union-attr]
    assert (tally.read, tally.accepted) == (3, 3)


def test_every_reject_reason_names_its_record_and_line(tmp_path: Path) -> None:
    """Each kind of bad record is rejected on its own; the rest of the file still goes in."""
    long_field = "x" * (MAX_FIELD_CHARS + 1)
    lines = [
        b"sku,title",  # line 1: header
        b"A,ok",  # 2  record 1  accepted
        b"B,too,many",  # 3  record 2  ragged (too many fields)
        b"C",  # 4  record 3  ragged (too few)
        b" ,empty sku",  # 5  record 4  invalid_sku (empty)
        b"D\x01,control",  # 6  record 5  invalid_sku (control character)
        b"E,bad \xff byte",  # 7  record 6  encoding
        b"F,nul \x00 byte",  # 8  record 7  nul_byte
        b"G," + long_field.encode(),  # 9  record 8  too_long
        b'H,"x"y',  # 10 record 9  malformed_quotes
        b"A,again",  # 11 record 10 duplicate
        b"I,fine",  # 12 record 11 accepted
        b'J,"never closed',  # 13 record 12 unterminated_quote ...
        b"K,after the stray quote",  # 14 record 13 accepted: parsing resumed
    ]
    path = tmp_path / "c.csv"
    path.write_bytes(b"\n".join(lines) + b"\n")
    outcomes, tally = read(path)
    assert rejects(outcomes) == [
        (2, 3, "ragged"),
        (3, 4, "ragged"),
        (4, 5, "invalid_sku"),
        (5, 6, "invalid_sku"),
        (6, 7, "encoding"),
        (7, 8, "nul_byte"),
        (8, 9, "too_long"),
        (9, 10, "malformed_quotes"),
        (10, 11, "duplicate"),
        (12, 13, "unterminated_quote"),
    ]
    assert [o.sku for o in outcomes if isinstance(o, Record)] == ["A", "I", "K"]
    assert (tally.read, tally.accepted, tally.rejected, tally.duplicates) == (13, 3, 9, 1)
    encoding = next(o for o in outcomes if isinstance(o, Reject) and o.reason == "encoding")
    assert "column 'title' has byte 0xff" in encoding.detail


def test_records_swallowed_by_a_stray_quote_are_recovered(tmp_path: Path) -> None:
    """A quote opened mid-file and closed lines later costs one record, not all between."""
    path = tmp_path / "c.csv"
    path.write_text('sku,title\nA,"broken\nB,fine\nC,"ok"\nD,last\n')
    outcomes, _ = read(path)
    assert rejects(outcomes) == [(1, 2, "malformed_quotes")]
    assert [(o.sku, o.line) for o in outcomes if isinstance(o, Record)] == [
        ("B", 3),
        ("C", 4),
        ("D", 5),
    ]


def test_encoding_is_strict_and_chosen_by_the_user(tmp_path: Path) -> None:
    """Latin-1 bytes are rejected as UTF-8 and read with --encoding latin-1."""
    path = tmp_path / "c.csv"
    path.write_bytes("sku,title\nA,café\n".encode("latin-1"))
    assert rejects(read(path)[0]) == [(1, 2, "encoding")]
    outcomes, _ = read(path, encoding="latin-1")
    assert outcomes[0].fields["title"] == "café"  # type: ignore[union-attr]
    with pytest.raises(CatalogueError, match="not ASCII-compatible"):
        Catalogue(path, encoding="utf-16")


def test_columns_are_mapped_from_the_catalogues_own_headers(tmp_path: Path) -> None:
    """ItemID and Product Name become sku and title; other columns keep their names."""
    path = tmp_path / "c.csv"
    path.write_text("ItemID,Product Name,colour\nX-1,Blue mug,blue\n")
    outcomes, _ = read(path, columns={"sku": "ItemID", "title": "Product Name"})
    assert outcomes[0].fields == {"sku": "X-1", "title": "Blue mug", "colour": "blue"}  # type: ignore[union-attr]
    with pytest.raises(CatalogueError, match=r"column mapping sku='Item'.*columns found"):
        Catalogue(path, columns={"sku": "Item"})
    with pytest.raises(CatalogueError, match="already has a column 'colour'"):
        Catalogue(path, columns={"sku": "ItemID", "title": "Product Name", "colour": "ItemID"})


def test_a_missing_required_column_stops_before_any_work(tmp_path: Path) -> None:
    """The error names the missing column and the columns found."""
    path = tmp_path / "c.csv"
    path.write_text("SKU,Name\nA,b\n")
    with pytest.raises(
        CatalogueError, match=r"no column 'sku', 'title'; columns found: 'SKU', 'Name'"
    ):
        Catalogue(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"", "no header"), (b"sku,title,sku\n", "appears twice"), (b"sku,t\xffitle\n", "header")],
)
def test_an_unusable_header_is_refused(tmp_path: Path, content: bytes, message: str) -> None:
    """Empty files, repeated columns and undecodable headers stop the run at once."""
    path = tmp_path / "c.csv"
    path.write_bytes(content)
    with pytest.raises(CatalogueError, match=message):
        Catalogue(path)


GOOD = st.builds(
    lambda sku, title: f"{sku},{title}",
    st.from_regex(r"[A-Z]{1,3}-[0-9]{1,3}", fullmatch=True),
    st.from_regex(r"[a-z ]{0,12}", fullmatch=True),
)
BAD = st.sampled_from(
    ["X,too,many", "lonely", ",no sku", 'Q,"open', 'R,"x"y', "S,\x00", "", '"', 'T,"multi\nline"']
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(GOOD, BAD), max_size=40))
def test_every_record_read_is_accounted_for(
    tmp_path_factory: pytest.TempPathFactory, lines: list[str]
) -> None:
    """Property: accepted + rejected + duplicates == read, whatever the file holds, and every
    accepted record is one the csv module would parse from the same line."""
    path = tmp_path_factory.mktemp("prop") / "c.csv"
    path.write_text("sku,title\n" + "\n".join(lines) + "\n")
    outcomes, tally = read(path)
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read == len(outcomes)
    physical = path.read_text().split("\n")
    for record in (o for o in outcomes if isinstance(o, Record)):
        first = next(csv.reader(io.StringIO(physical[record.line - 1])))
        assert first[0].strip() == record.sku


def catalogue_file(tmp_path: Path, content: bytes, name: str = "c.csv") -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_an_over_long_line_is_too_long_and_read_in_constant_memory(tmp_path: Path) -> None:
    """A 5 MB line is one too_long reject, read past in chunks: memory stays far below the
    line's size, and the records after it go in."""
    path = catalogue_file(tmp_path, b"sku,title\nA," + b"x" * (5 << 20) + b"\nB,ok\nC,fine\n")
    tracemalloc.start()
    outcomes, tally = read(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rejects(outcomes) == [(1, 2, "too_long")]
    assert outcomes[0].detail == f"line 2 is over {MAX_LINE_BYTES:,} bytes"  # type: ignore[union-attr]
    assert [(o.sku, o.line) for o in outcomes if isinstance(o, Record)] == [("B", 3), ("C", 4)]
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read == 3
    assert peak < 2.5 * MAX_LINE_BYTES  # the line is 5 MiB


def test_a_quoted_field_over_many_short_lines_is_too_long_in_bounded_memory(
    tmp_path: Path,
) -> None:
    """An open quote that swallows 20 MB of short lines stops at MAX_LINE_BYTES: the record
    is too_long, parsing resumes on the next line, and memory stays bounded."""
    swallowed = b"y" * 1000 + b"\n"
    path = catalogue_file(tmp_path, b'sku,title\nA,"' + swallowed * 20_000 + b'"\nB,ok\n')
    tracemalloc.start()
    outcomes, tally = read(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert rejects(outcomes)[0] == (1, 2, "too_long")
    assert f"runs over {MAX_LINE_BYTES:,} bytes" in outcomes[0].detail  # type: ignore[union-attr]
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read == len(outcomes)
    assert peak < 10 * MAX_LINE_BYTES  # the field is 20 MB (80 MB in the csv module's buffer)


def test_a_record_over_the_cap_across_many_fields_is_too_long(tmp_path: Path) -> None:
    """Many quoted fields, each short but together over MAX_LINE_BYTES, make the record
    too_long before it is held whole."""
    field = b'"' + b"z" * 100_000 + b"\n" + b"z" * 100_000 + b'"'
    path = catalogue_file(tmp_path, b"sku,title\nA," + b",".join([field] * 12) + b"\nB,ok\n")
    outcomes, tally = read(path)
    assert rejects(outcomes)[0] == (1, 2, "too_long")
    assert f"the record runs over {MAX_LINE_BYTES:,} bytes" in outcomes[0].detail  # type: ignore[union-attr]
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read


def test_an_over_long_header_is_refused(tmp_path: Path) -> None:
    """A header line over MAX_LINE_BYTES stops the run with one line saying so."""
    path = catalogue_file(tmp_path, b"sku,title," + b"h" * (2 << 20) + b"\nA,b,c\n")
    with pytest.raises(CatalogueError, match=f"the header's line 1 is over {MAX_LINE_BYTES:,}"):
        Catalogue(path)


def test_repeated_columns_are_found_in_linear_time(tmp_path: Path) -> None:
    """A 100,000-column header with one repeat is checked at once (the quadratic check took
    minutes), and the error names only the repeated column."""
    names = ["sku", "title", *(f"c{i}" for i in range(100_000)), "c7"]
    path = catalogue_file(tmp_path, ",".join(names).encode() + b"\n")
    started = time.monotonic()
    with pytest.raises(CatalogueError, match=r"column 'c7' appears twice$"):
        Catalogue(path)
    assert time.monotonic() - started < 20  # generous: about 0.1 s here, minutes before


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("c.csv", "sku,title\nA,b\n")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a PNG image, not CSV"),
        (gzip.compress(b"sku,title\nA,b\n"), "is a gzip file, not CSV: decompress it first"),
        (_zip_bytes(), "is a zip archive (an .xlsx workbook is one), not CSV"),
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n", "is a PDF document, not CSV"),
        ("sku,title\nA,b\n".encode("utf-16"), "is UTF-16 text, not CSV: save it as UTF-8"),
        ("sku,title\nA,b\n".encode("utf-16-le"), "has NUL bytes in its header line"),
        (b"sku,title\rA,b\rB,c\r", "has old Mac line endings (CR only)"),
    ],
    ids=["png", "gzip", "zip", "pdf", "utf16-bom", "utf16-no-bom", "cr-only"],
)
def test_a_file_that_is_not_a_csv_is_refused_naming_what_it_is(
    tmp_path: Path, content: bytes, message: str
) -> None:
    """Images, archives, PDFs, UTF-16 and old Mac line endings are one clear line each."""
    path = catalogue_file(tmp_path, content, "x.csv.gz")
    with pytest.raises(CatalogueError) as caught:
        Catalogue(path)
    assert str(caught.value).startswith(f"catalogue {path} {message}")


@pytest.mark.parametrize(
    ("where", "kind"), [("directory", "a directory"), ("/dev/null", "a character device")]
)
def test_a_catalogue_that_is_not_a_regular_file_is_refused(
    tmp_path: Path, where: str, kind: str
) -> None:
    """A directory or a device given as the catalogue is one line naming what it is."""
    path = tmp_path if where == "directory" else Path(where)
    with pytest.raises(CatalogueError, match=f"^catalogue {path} is {kind}, not a CSV file$"):
        Catalogue(path)


def test_an_unknown_encoding_is_refused_by_name(tmp_path: Path) -> None:
    """--encoding with a typo names the encoding."""
    path = catalogue_file(tmp_path, b"sku,title\nA,b\n")
    with pytest.raises(CatalogueError, match="unknown encoding 'utf-9'"):
        Catalogue(path, encoding="utf-9")


@pytest.mark.parametrize(
    ("sku", "detail"),
    [
        ("A\u2028B", "a line separator U+2028 (LINE SEPARATOR)"),
        ("A\u2029", "a paragraph separator U+2029 (PARAGRAPH SEPARATOR)"),
        ("\u202eA-1", "a format character U+202E (RIGHT-TO-LEFT OVERRIDE)"),
        ("A\u200bB", "a format character U+200B (ZERO WIDTH SPACE)"),
        ("\ufeffA", "a format character U+FEFF (ZERO WIDTH NO-BREAK SPACE)"),
        ("A\x85", "a control character U+0085"),
        ("A\x1f", "a control character U+001F"),
        ('"A\n"', "a control character U+000A"),
        ("A\ue000", "a private-use character U+E000"),
        ("A\U000e0001", "a format character U+E0001 (LANGUAGE TAG)"),
    ],
)
def test_skus_with_control_format_or_separator_characters_are_invalid(
    tmp_path: Path, sku: str, detail: str
) -> None:
    """Invisible or line-breaking characters anywhere in a SKU reject it, even at its ends
    (where plain strip() used to hide some of them); the detail names the character."""
    path = catalogue_file(tmp_path, f"sku,title\n{sku},x\n \u00a0OK\t,y\n".encode())
    outcomes, _ = read(path)
    assert rejects(outcomes) == [(1, 2, "invalid_sku")]
    assert outcomes[0].detail.endswith(f"has {detail}")  # type: ignore[union-attr]
    assert outcomes[1].sku == "OK"  # type: ignore[union-attr]  # spaces and tabs are trimmed


def test_skus_equal_after_nfc_normalisation_are_duplicates(tmp_path: Path) -> None:
    """'é' written as one character and as 'e' plus a combining accent is one SKU: the
    second is a duplicate, and the accepted one keeps its own spelling."""
    path = catalogue_file(
        tmp_path, "sku,title\ncaf\u00e9,one\ncafe\u0301,two\ncafe,three\n".encode()
    )
    outcomes, tally = read(path)
    assert rejects(outcomes) == [(2, 3, "duplicate")]
    assert "compared in Unicode NFC form" in outcomes[1].detail  # type: ignore[union-attr]
    assert [o.sku for o in outcomes if isinstance(o, Record)] == ["caf\u00e9", "cafe"]
    assert (tally.accepted, tally.duplicates) == (2, 1)
