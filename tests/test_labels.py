"""Labels in any script: the annotation panel draws Chinese, Japanese, Korean and accented
Latin with real glyphs, never .notdef boxes, from the fonts that ship with skufleet or from
SKUFLEET_LABEL_FONT first."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from fontTools.ttLib import TTFont
from PIL import Image, ImageFont

from skufleet.schemas.errors import ConfigError
from skufleet.schemas.settings import load_settings
from skufleet.worker import postprocess
from skufleet.worker.postprocess import LabelFont, annotate, has_glyph, shipped_fonts

LABELS = {
    "chinese": "不锈钢保温杯，蓝色（500毫升）",
    "traditional": "陶瓷馬克杯，藍色",
    "japanese": "ステンレス製の水筒、青色・５００ミリリットル",
    "korean": "스테인리스 보온병, 파란색",
    "german": "Grüße aus Köln — Straße, Größe ö/ü/ä",
    "accented": "Čeština, Łódź, Őrség, Şişli, Ærøskøbing, naïve café",
}


def drawn(text: str) -> set[str]:
    return {char for char in text if not char.isspace()}


def test_the_shipped_fonts_map_every_character_of_the_labels() -> None:
    """Between them the two shipped fonts' character maps hold every character of Chinese,
    Japanese, Korean, German and accented labels; the font each character is drawn with
    maps it."""
    fonts = shipped_fonts()
    cmaps = {str(path): set(TTFont(path).getBestCmap()) for path in fonts}
    font = LabelFont.at(24)
    for text in LABELS.values():
        for chunk, face in font.runs(text):
            path = next(p for p in cmaps if face.path == p)
            missing = {char for char in chunk if ord(char) not in cmaps[path]}
            assert not missing, (path, missing)


def test_each_character_is_drawn_as_its_own_glyph_not_the_notdef_box() -> None:
    """The bitmap each character is drawn with differs from its font's .notdef glyph (what
    an uncovered character, here U+FFFF, draws), and has ink."""
    font = LabelFont.at(24)
    for text in LABELS.values():
        for chunk, face in font.runs(text):
            box = face.getmask("\uffff")
            for char in drawn(chunk):
                mask = face.getmask(char)
                assert (mask.size, bytes(mask)) != (box.size, bytes(box)), char
                assert max(bytes(mask)) > 128, char


def test_the_panel_draws_every_label_with_ink_and_no_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Each label of the panel is drawn (dark pixels in its lines) and no character is
    reported missing."""
    source = Image.new("RGB", (256, 256), "gray")
    with caplog.at_level(logging.WARNING, logger=postprocess.__name__):
        canvas = annotate(source, tuple(LABELS.values()))
    assert not caplog.records
    panel = np.asarray(canvas)[:, 257:].min(axis=2)
    inked_rows = np.flatnonzero((panel < 100).any(axis=1))
    # one block of text per label (the blank line between them separates the blocks)
    blocks = 1 + int(np.count_nonzero(np.diff(inked_rows) > LabelFont.at(10).line_height // 2))
    assert blocks >= len(LABELS)


def test_a_character_no_font_has_is_named_in_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A character outside every label font (a rare hanzi outside the shipped subset) is
    drawn as a box and named, with its code point, in a warning given once per process."""
    postprocess._warned.discard("龘")
    with caplog.at_level(logging.WARNING, logger=postprocess.__name__):
        annotate(Image.new("RGB", (64, 64)), ("龘 dragon",))
        annotate(Image.new("RGB", (64, 64)), ("again 龘",))
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "龘 (U+9F98)" in warnings[0]
    assert "SKUFLEET_LABEL_FONT" in warnings[0]


def test_the_configured_font_is_tried_first_and_the_shipped_ones_fill_in() -> None:
    """With SKUFLEET_LABEL_FONT (here the shipped CJK font, which has ASCII but no Č) the
    configured font draws what it has, and the shipped Latin font what it lacks."""
    latin, cjk = (str(path) for path in shipped_fonts())
    font = LabelFont.at(24, Path(cjk))
    assert [(chunk, face.path) for chunk, face in font.runs("Čapek 杯")] == [
        ("Č", latin),
        ("apek 杯", cjk),
    ]
    assert has_glyph(cjk, "杯") and not has_glyph(latin, "杯")


def test_the_shipped_fonts_stay_small() -> None:
    """Subsets, not whole CJK fonts: under 6 MB together."""
    assert sum(path.stat().st_size for path in shipped_fonts()) < 6_000_000


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("/nonexistent/font.ttf", "is not a file"),
        (__file__, "is not a font file FreeType can read"),
    ],
)
def test_a_label_font_that_is_not_a_font_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, value: str, message: str
) -> None:
    """SKUFLEET_LABEL_FONT must name a font file FreeType opens: anything else is a
    ConfigError naming the variable."""
    monkeypatch.setenv("SKUFLEET_LABEL_FONT", value)
    with pytest.raises(ConfigError, match=f"^invalid setting SKUFLEET_LABEL_FONT: .*{message}"):
        load_settings()


def test_a_label_font_is_read_from_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """A readable font file is accepted as it is; unset or empty means the shipped fonts."""
    latin = shipped_fonts()[0]
    monkeypatch.setenv("SKUFLEET_LABEL_FONT", str(latin))
    assert load_settings().label_font == latin
    ImageFont.truetype(str(latin), 12)
    monkeypatch.setenv("SKUFLEET_LABEL_FONT", "")
    assert load_settings().label_font is None
