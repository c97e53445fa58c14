"""The catalogue reader accounts for every record and names what is wrong with bad ones."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from producer.catalogue import MAX_FIELD_CHARS, Catalogue, Record, Reject, Tally
from schemas.errors import CatalogueError


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
