"""Post-processing: a chain of plain functions from a rendered image to the stored bytes.

    annotate (labels on a panel beside the image) → thumbnail (max side) → encode
    (PNG, WebP or JPEG, with the generation metadata embedded)

Each step is a function of an image and the item's :class:`~schemas.output.OutputSpec`, so
a test can call any of them alone. Nothing here touches the GPU, Celery or the network.

Labels are drawn in any script: each character with the first of the label fonts that has
it, ``SKUFLEET_LABEL_FONT`` where set, then the two that ship in ``examples/fonts/``
(Latin, Greek and Cyrillic; Chinese, Japanese and Korean: see ``build_font.py`` there). A
character none of them has is drawn as the first font's box, and named in one warning.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import struct
import textwrap
import unicodedata
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from skufleet.schemas.output import OutputSpec

log = logging.getLogger(__name__)

PANEL_RATIO = 0.75
"""Width of the annotation panel relative to the image's width."""
EXIF_IMAGE_DESCRIPTION = 0x010E
EXIF_USER_COMMENT = 0x9286
EXIF_DESCRIPTION_BYTES = 12_000
EXIF_COMMENT_BYTES = 48_000
"""Bytes of EXIF text: the ImageDescription (the prompt) and the UserComment (every field as
JSON). JPEG holds EXIF in one APP1 segment of at most 65,533 bytes, so the two stay below
60,000 with room for the TIFF structure; WebP is held to the same. PNG text is unbounded."""
TRUNCATED = "…[truncated]"
"""Ends an EXIF text cut to fit; the full text is in the ledger and its SHA-256 in the
object's ``prompt-sha256`` metadata."""


@dataclass(frozen=True)
class Encoded:
    body: bytes
    content_type: str
    extension: str
    width: int
    """Pixels of the encoded image: the drawn size, plus any label panel, after any
    thumbnail."""
    height: int
    format: str
    """``png``, ``webp`` or ``jpeg`` (the spec's)."""


SHIPPED_FONTS = ("SkufleetLabelSans-Latin.ttf", "SkufleetLabelSans-CJK.otf")
"""The label fonts in the package's ``examples/fonts/``, in the order they are tried."""
_PROBE_SIZE = 24
"""Pixels per em at which a font is asked whether it has a character."""
_NOT_A_CHARACTER = "\uffff"
"""A noncharacter no font maps: what it draws is the font's .notdef glyph (its box)."""
_warned: set[str] = set()
"""Characters that no label font has, already named in a warning by this process."""


def shipped_fonts() -> tuple[Path, ...]:
    """The paths of the label fonts that ship with skufleet."""
    folder = resources.files("skufleet").joinpath("examples", "fonts")
    return tuple(Path(str(folder.joinpath(name))) for name in SHIPPED_FONTS)


@functools.lru_cache(maxsize=64)
def _face(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


@functools.lru_cache(maxsize=16)
def _probe(path: str) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, _PROBE_SIZE, layout_engine=ImageFont.Layout.BASIC)


@functools.lru_cache(maxsize=1 << 16)
def has_glyph(path: str, char: str) -> bool:
    """Whether the font at ``path`` maps ``char`` to a glyph of its own rather than to its
    .notdef box (Pillow shows no character map: a missing character draws what a
    noncharacter draws). Asked without text shaping, which would draw a missing ``Č`` as
    ``C`` and a loose caron."""
    font = _probe(path)
    drawn, box = font.getmask(char), font.getmask(_NOT_A_CHARACTER)
    return drawn.size != box.size or bytes(drawn) != bytes(box)


@dataclass(frozen=True)
class LabelFont:
    """The label fonts at one size, tried in order for each character."""

    paths: tuple[str, ...]
    size: int

    @classmethod
    def at(cls, size: int, label_font: Path | None = None) -> LabelFont:
        """``label_font`` (``SKUFLEET_LABEL_FONT``) where given, then the shipped fonts."""
        chain = ([label_font] if label_font is not None else []) + list(shipped_fonts())
        return cls(tuple(str(path) for path in chain), size)

    @property
    def ascent(self) -> int:
        return max(_face(path, self.size).getmetrics()[0] for path in self.paths)

    @property
    def line_height(self) -> int:
        metrics = [_face(path, self.size).getmetrics() for path in self.paths]
        return int(max(up + down for up, down in metrics) * 1.15) + 1

    def runs(self, text: str) -> list[tuple[str, ImageFont.FreeTypeFont]]:
        """``text`` cut where the font that draws it changes; a character none has goes to
        the first font (its box) and is named in a warning, once per process."""
        runs: list[tuple[str, str]] = []
        missing = set()
        for char in text:
            path = next((p for p in self.paths if has_glyph(p, char)), None)
            if path is None:
                path = self.paths[0]
                if not char.isspace() and unicodedata.category(char) not in ("Cc", "Cf"):
                    missing.add(char)
            if runs and runs[-1][1] == path:
                runs[-1] = (runs[-1][0] + char, path)
            else:
                runs.append((char, path))
        if missing - _warned:
            _warn_missing(missing - _warned)
        return [(chunk, _face(path, self.size)) for chunk, path in runs]

    def length(self, text: str) -> float:
        return sum(font.getlength(chunk) for chunk, font in self.runs(text))

    def draw(self, ink: ImageDraw.ImageDraw, xy: tuple[int, int], text: str) -> None:
        """``text`` with its top-left corner at ``xy``, every run on one baseline."""
        x, baseline = float(xy[0]), xy[1] + self.ascent
        for chunk, font in self.runs(text):
            ink.text((x, baseline), chunk, fill=(20, 20, 20), font=font, anchor="ls")
            x += font.getlength(chunk)


def _warn_missing(chars: set[str]) -> None:
    _warned.update(chars)
    named = ", ".join(f"{char} (U+{ord(char):04X})" for char in sorted(chars))
    log.warning(
        "labels hold characters no label font has, drawn as boxes: %s; set "
        "SKUFLEET_LABEL_FONT to a font that has them",
        named,
    )


def annotate(
    image: Image.Image, labels: tuple[str, ...], label_font: Path | None = None
) -> Image.Image:
    """The image on the left of a wider canvas, the labels as a numbered list on the right.

    Text is wrapped to the panel's width and the canvas grows taller if the list needs it,
    so no label is ever drawn off the canvas. ``label_font`` is tried before the shipped
    fonts.
    """
    if not labels:
        return image
    width, height = image.size
    panel = max(96, int(width * PANEL_RATIO))
    margin = max(6, width // 40)
    font = LabelFont.at(max(10, width // 28), label_font)
    line_height = font.line_height
    average = max(1.0, font.length("abcdefghijklmnopqrstuvwxyz") / 26)
    columns = max(8, int((panel - 2 * margin) / average))

    lines: list[str] = []
    for number, label in enumerate(labels, 1):
        lines += [*_wrap(f"{number}. {label}", columns, panel - 2 * margin, font), ""]
    canvas_height = max(height, 2 * margin + line_height * len(lines))
    canvas = Image.new("RGB", (width + panel, canvas_height), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    ink = ImageDraw.Draw(canvas)
    ink.line([(width, 0), (width, canvas_height)], fill=(200, 200, 200), width=1)
    y = margin
    for line in lines:
        font.draw(ink, (width + margin, y), line)
        y += line_height
    return canvas


def _wrap(text: str, columns: int, max_width: int, font: LabelFont) -> list[str]:
    """Wrap to ``columns`` characters, then narrower until every line fits ``max_width``."""
    while True:
        lines = textwrap.wrap(text, columns, break_long_words=True) or [""]
        if columns <= 4 or all(font.length(line) <= max_width for line in lines):
            return lines
        columns -= 2


def thumbnail(image: Image.Image, max_side: int | None) -> Image.Image:
    """Shrink (never enlarge) so that the longer side is at most ``max_side``."""
    if max_side is None or max(image.size) <= max_side:
        return image
    shrunk = image.copy()
    shrunk.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return shrunk


def _ascii(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode()


def _json_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=True)) - 2


def clip(text: str, limit: int, size: Callable[[str], int] = len) -> str:
    """``text`` if ``size(text) <= limit``, else its longest prefix that fits with
    :data:`TRUNCATED` after it (``size`` counts bytes as stored: escapes make a character
    1 to 12 bytes)."""
    if size(text) <= limit:
        return text
    low, high = 0, len(text)  # the prefix of `low` characters fits; `high` does not
    while high - low > 1:
        middle = (low + high) // 2
        if size(text[:middle] + TRUNCATED) <= limit:
            low = middle
        else:
            high = middle
    return text[:low] + TRUNCATED


def fit_fields(fields: Mapping[str, str], limit: int) -> dict[str, str]:
    """``fields`` as JSON of at most ``limit`` bytes: short values stay whole, and the long
    ones (prompts) share what is left equally, each cut with :func:`clip`."""
    sizes = {key: _json_size(value) for key, value in fields.items()}
    left = limit - len(json.dumps(dict.fromkeys(fields, ""), ensure_ascii=True))
    fitted = dict(fields)
    for done, key in enumerate(sorted(sizes, key=sizes.__getitem__)):
        share = left // (len(sizes) - done)
        fitted[key] = clip(fields[key], share, _json_size)
        left -= _json_size(fitted[key])
    return fitted


def encode(image: Image.Image, spec: OutputSpec, metadata: Mapping[str, str]) -> Encoded:
    """Bytes in the spec's format with ``metadata`` embedded: PNG text chunks (UTF-8 iTXt,
    whole), or EXIF for WebP and JPEG (ImageDescription = the prompt, UserComment = every
    field as JSON), each bounded so that a long prompt never makes the file unwritable: the
    longest texts are cut to fit, ending in :data:`TRUNCATED`."""
    buffer = io.BytesIO()
    if spec.format == "png" and spec.compression == "fast":
        body = fast_png(image, metadata)
        return Encoded(body, spec.content_type, spec.extension, *image.size, spec.format)
    if spec.format == "png":
        info = PngImagePlugin.PngInfo()
        for key, value in metadata.items():
            info.add_itxt(key, value)
        image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    else:
        exif = Image.Exif()
        # EXIF text is ASCII: the JSON escapes everything else and reads back exactly
        prompt = clip(metadata.get("prompt", ""), EXIF_DESCRIPTION_BYTES, lambda t: len(_ascii(t)))
        exif[EXIF_IMAGE_DESCRIPTION] = _ascii(prompt)
        fields = fit_fields(metadata, EXIF_COMMENT_BYTES)
        exif[EXIF_USER_COMMENT] = json.dumps(fields, ensure_ascii=True)
        pil_format = "WEBP" if spec.format == "webp" else "JPEG"
        image.convert("RGB").save(buffer, format=pil_format, quality=spec.quality, exif=exif)
    return Encoded(buffer.getvalue(), spec.content_type, spec.extension, *image.size, spec.format)


FAST_PNG_LEVEL = 2
"""ISA-L's deflate level for ``compression = "fast"`` (0-3; 1-3 give nearly the same size
on photographs, 0 is much larger)."""


def _chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def fast_png(image: Image.Image, metadata: Mapping[str, str]) -> bytes:
    """A lossless PNG at a fraction of zlib level 6's cost: every row ``sub``-filtered in
    one numpy pass and the whole image deflated by ISA-L (``isal``), with ``metadata`` in
    uncompressed UTF-8 iTXt chunks, as the standard path writes them. 8-bit RGB or grey."""
    from isal import isal_zlib

    if image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    pixels = np.asarray(image)
    height, width = pixels.shape[:2]
    channels = 1 if image.mode == "L" else 3
    rows = pixels.reshape(height, width * channels)
    filtered = np.empty((height, width * channels + 1), dtype=np.uint8)
    filtered[:, 0] = 1  # filter type: sub, each byte minus the one a pixel to its left
    filtered[:, 1 : 1 + channels] = rows[:, :channels]
    np.subtract(rows[:, channels:], rows[:, :-channels], out=filtered[:, 1 + channels :])
    header = struct.pack(">IIBBBBB", width, height, 8, 0 if channels == 1 else 2, 0, 0, 0)
    text = b"".join(
        _chunk(b"iTXt", key.encode("latin-1") + b"\0\0\0\0\0" + value.encode("utf-8"))
        for key, value in metadata.items()
    )
    body = isal_zlib.compress(filtered.tobytes(), FAST_PNG_LEVEL)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + text
        + _chunk(b"IDAT", body)
        + _chunk(b"IEND", b"")
    )


def process(
    image: Image.Image,
    spec: OutputSpec,
    metadata: Mapping[str, str],
    label_font: Path | None = None,
) -> Encoded:
    """The whole chain for one image; ``label_font`` is ``Settings.label_font``."""
    annotated = annotate(image, spec.labels, label_font)
    return encode(thumbnail(annotated, spec.max_side), spec, metadata)


def read_metadata(body: bytes) -> dict[str, str]:
    """The metadata :func:`encode` embedded, read back from any of the three formats."""
    image = Image.open(io.BytesIO(body))
    if image.format == "PNG":
        return {key: str(value) for key, value in image.text.items()}  # type: ignore[attr-defined]
    comment = image.getexif().get(EXIF_USER_COMMENT)
    return dict(json.loads(comment)) if comment else {}
