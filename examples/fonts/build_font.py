"""Rebuild the two label fonts that ship with skufleet (``examples/fonts/``).

The annotation panel draws each character with the first font that has it: the font named
by ``SKUFLEET_LABEL_FONT`` where set, then these two, both subsets of Google's Noto fonts
(SIL Open Font License 1.1, ``OFL.txt`` beside them) as Debian installs them:

- ``SkufleetLabelSans-Latin.ttf``, from Noto Sans Regular (``fonts-noto-core``): Latin-1,
  Latin Extended-A and -B (ü, ö, č, ł, ő, ş, ș…), Greek, Cyrillic, General Punctuation
  (— – “ ” … •), currency signs, letterlike symbols, arrows;
- ``SkufleetLabelSans-CJK.otf``, from Noto Sans CJK SC Regular (``fonts-noto-cjk``'s
  ``NotoSansCJK-Regular.ttc``), which has Latin-1 but not Latin Extended-A: Chinese GB 2312
  (6,763 simplified hanzi) and Big5 level 1 (5,401 common traditional ones), Japanese
  JIS X 0208 levels 1 and 2 (6,355 kanji), hiragana and katakana, Korean KS X 1001's 2,350
  hangul syllables and the compatibility jamo, CJK punctuation, full- and half-width forms,
  and the symbols of those standards.

Every OpenType feature but ``kern`` is left out (labels are drawn left to right), and so are
the CJK font's hints: its regional-form features alone would double the file.
Each family is renamed, as the OFL asks of a modified version. Needs fontTools::

    apt-get install fonts-noto-core fonts-noto-cjk && pip install fonttools
    python examples/fonts/build_font.py
"""

from __future__ import annotations

import argparse
import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from fontTools import subset
from fontTools.ttLib import TTCollection, TTFont

HERE = Path(__file__).resolve().parent
FAMILY = "Skufleet Label Sans"


@dataclass(frozen=True)
class Build:
    """One shipped font: where its source is, what it keeps, where it goes."""

    source: Path
    face: int | None
    """The face in a collection (.ttc); None for a single font."""
    target: Path
    style: str
    """What follows the family name: the file's part of the coverage."""
    ranges: tuple[tuple[int, int], ...]
    standards: bool = False
    """Also the characters of the CJK national standards (see :func:`cjk_standards`)."""
    hinting: bool = False
    """Keep the source's hints: Latin at 10-20 px needs them, CJK (CFF) does well without."""


LATIN = Build(
    source=Path("/usr/share/fonts/truetype/noto/NotoSans-Regular.ttf"),
    face=None,
    target=HERE / "SkufleetLabelSans-Latin.ttf",
    style="Latin",
    hinting=True,
    ranges=(
        (0x0020, 0x007E),  # ASCII
        (0x00A0, 0x024F),  # Latin-1 Supplement, Latin Extended-A and -B
        (0x0300, 0x036F),  # combining diacritical marks
        (0x0370, 0x03FF),  # Greek
        (0x0400, 0x04FF),  # Cyrillic
        (0x1E00, 0x1EFF),  # Latin Extended Additional (Vietnamese)
        (0x2000, 0x206F),  # General Punctuation
        (0x20A0, 0x20CF),  # Currency Symbols
        (0x2100, 0x214F),  # Letterlike Symbols (№, ™, ℃)
        (0x2150, 0x218F),  # Number Forms (⅓, Ⅻ)
        (0x2190, 0x21FF),  # Arrows
    ),
)
CJK = Build(
    source=Path("/usr/share/fonts/opentype/noto/NotoSansCJK-Regular.ttc"),
    face=2,  # Noto Sans CJK SC in the collection (0 JP, 1 KR, 2 SC, 3 TC, 4 HK)
    target=HERE / "SkufleetLabelSans-CJK.otf",
    style="CJK",
    ranges=(
        (0x0020, 0x007E),  # ASCII, so that the font alone still writes numbers and names
        (0x3000, 0x30FF),  # CJK Symbols and Punctuation, Hiragana, Katakana
        (0x3131, 0x318E),  # Hangul Compatibility Jamo
        (0xFF00, 0xFFEF),  # Halfwidth and Fullwidth Forms
    ),
    standards=True,
)


def _double_byte(codec: str, leads: Iterable[int], trails: Iterable[int]) -> set[str]:
    """Every character ``codec`` decodes from a lead byte in ``leads`` and a trail byte in
    ``trails``: how the national standards' rows are read without tables of our own."""
    found = set()
    trail_bytes = list(trails)
    for lead in leads:
        for trail in trail_bytes:
            with contextlib.suppress(UnicodeDecodeError):  # a hole in the table
                found.add(bytes((lead, trail)).decode(codec))
    return found


def cjk_standards() -> set[str]:
    """GB 2312, JIS X 0208, KS X 1001 without its hanja, and Big5 level 1 (A440-C67E)."""
    euc = range(0xA1, 0xFF)
    chars = _double_byte("gb2312", range(0xA1, 0xF8), euc)  # symbols, then the hanzi
    chars |= _double_byte("euc_jp", range(0xA1, 0xF5), euc)  # symbols, kana, both levels
    chars |= _double_byte("euc_kr", range(0xA1, 0xC9), euc)  # symbols, then the hangul
    chars |= _double_byte("big5", range(0xA4, 0xC6), [*range(0x40, 0x7F), *range(0xA1, 0xFF)])
    chars |= _double_byte("big5", [0xC6], range(0x40, 0x7F))
    return chars


def characters(build: Build) -> set[str]:
    """What ``build`` asks of its source (which may lack some of it)."""
    chars = {chr(code) for low, high in build.ranges for code in range(low, high + 1)}
    return chars | cjk_standards() if build.standards else chars


def run(build: Build, source: Path | None = None) -> tuple[int, int]:
    """Write the subset ``build`` describes: (characters asked, characters kept)."""
    path = str(source or build.source)
    # the source's timestamp is kept, so that the same sources give the same bytes
    font = (
        TTCollection(path, recalcTimestamp=False).fonts[build.face]
        if build.face is not None
        else TTFont(path, recalcTimestamp=False)
    )
    options = subset.Options()
    options.hinting = build.hinting
    options.layout_features = ["kern"]
    options.name_IDs = ["*"]
    options.name_languages = ["*"]
    options.notdef_outline = True  # the .notdef box: what a character no font has shows
    options.drop_tables += ["VORG", "vhea", "vmtx", "BASE", "DSIG"]
    wanted = characters(build)
    cmap = font.getBestCmap()
    kept = sorted(ord(char) for char in wanted if ord(char) in cmap)
    subsetter = subset.Subsetter(options)
    subsetter.populate(unicodes=kept)
    subsetter.subset(font)
    _rename(font, build.style)
    font.save(str(build.target))
    return len(wanted), len(kept)


def _rename(font: TTFont, style: str) -> None:
    """Family and PostScript names of the modified version; copyright and license stay."""
    names = font["name"]
    family = f"{FAMILY} {style}"
    postscript = family.replace(" ", "") + "-Regular"
    original = names.getDebugName(4)
    for name_id in (1, 3, 4, 6, 16, 17, 21, 22):
        names.removeNames(nameID=name_id)
    for name_id, value in (
        (1, family),
        (3, f"{postscript};subset of {original}"),
        (4, f"{family} Regular"),
        (6, postscript),
    ):
        names.setName(value, name_id, 3, 1, 0x409)
        names.setName(value, name_id, 1, 0, 0)
    if "CFF " in font:
        font["CFF "].cff.fontNames = [postscript]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n", 1)[0])
    parser.add_argument("--latin", type=Path, help=f"NotoSans-Regular.ttf [{LATIN.source}]")
    parser.add_argument("--cjk", type=Path, help=f"NotoSansCJK-Regular.ttc [{CJK.source}]")
    args = parser.parse_args()
    for build, source in ((LATIN, args.latin), (CJK, args.cjk)):
        wanted, kept = run(build, source)
        size = build.target.stat().st_size
        print(f"{build.target.name}: {kept:,} of {wanted:,} characters, {size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
