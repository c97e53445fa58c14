"""The catalogue reader accounts for every record and names what is wrong with bad ones."""

from __future__ import annotations

from pathlib import Path

import pytest

from producer.catalogue import Catalogue, Record, Reject, Tally
from schemas.errors import CatalogueError


def read(path: Path, **kwargs: object) -> tuple[list[Record | Reject], Tally]:
    tally = Tally()
    with Catalogue(path, **kwargs) as catalogue:  # type: ignore[arg-type]
        outcomes = list(catalogue)
    for outcome in outcomes:
        tally.count(outcome)
    return outcomes, tally


def test_good_rows_are_accepted_with_their_record_and_line_numbers(tmp_path: Path) -> None:
    """Quoted commas and newlines are data; line numbers are physical lines."""
    path = tmp_path / "c.csv"
    path.write_bytes(b'\xef\xbb\xbfsku,title\nA,"one, two"\nB,"multi\nline"\nC,three\n')
    outcomes, tally = read(path)
    assert [(o.number, o.line, o.sku) for o in outcomes if isinstance(o, Record)] == [
        (1, 2, "A"),
        (2, 3, "B"),
        (3, 5, "C"),
    ]
    assert outcomes[1].fields["title"] == "multi\nline"  # type: ignore[union-attr]
    assert (tally.read, tally.accepted) == (3, 3)


def test_every_bad_record_is_rejected_on_its_own(tmp_path: Path) -> None:
    """Ragged rows, empty SKUs, bad or NUL bytes and duplicates are reported; the rest pass."""
    path = tmp_path / "c.csv"
    lines = [
        b"sku,title",
        b"A,ok",
        b"B,too,many",
        b" ,empty sku",
        b"C,bad \xff byte",
        b"A,again",
        b"D,fine",
        b"E,nul \x00 byte",
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    outcomes, tally = read(path)
    rejects = [(o.record, o.line, o.reason) for o in outcomes if isinstance(o, Reject)]
    assert rejects == [
        (2, 3, "ragged"),
        (3, 4, "invalid_sku"),
        (4, 5, "encoding"),
        (5, 6, "duplicate"),
        (7, 8, "nul_byte"),
    ]
    assert [o.sku for o in outcomes if isinstance(o, Record)] == ["A", "D"]
    assert (tally.read, tally.accepted, tally.rejected, tally.duplicates) == (7, 2, 4, 1)
    assert tally.accepted + tally.rejected + tally.duplicates == tally.read


def test_a_missing_required_column_stops_before_any_work(tmp_path: Path) -> None:
    """The error names the missing column and the columns found."""
    path = tmp_path / "c.csv"
    path.write_text("SKU,Name\nA,b\n")
    with pytest.raises(
        CatalogueError, match=r"no column 'sku', 'title'; columns found: 'SKU', 'Name'"
    ):
        Catalogue(path)


def test_an_empty_file_is_refused(tmp_path: Path) -> None:
    """A file without even a header is an error, not an empty run."""
    path = tmp_path / "c.csv"
    path.write_text("")
    with pytest.raises(CatalogueError, match="no header"):
        Catalogue(path)
