"""Post-processing: a chain of plain functions from a rendered image to the stored bytes.

    annotate (labels on a panel beside the image) → thumbnail (max side) → encode
    (PNG, WebP or JPEG, with the generation metadata embedded)

Each step is a function of an image and the item's :class:`~schemas.output.OutputSpec`, so
a test can call any of them alone. Nothing here touches the GPU, Celery or the network.
"""

from __future__ import annotations

import io
import json
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont, PngImagePlugin

from skufleet.schemas.output import OutputSpec

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


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def annotate(image: Image.Image, labels: tuple[str, ...]) -> Image.Image:
    """The image on the left of a wider canvas, the labels as a numbered list on the right.

    Text is wrapped to the panel's width and the canvas grows taller if the list needs it,
    so no label is ever drawn off the canvas.
    """
    if not labels:
        return image
    width, height = image.size
    panel = max(96, int(width * PANEL_RATIO))
    margin = max(6, width // 40)
    font = _font(max(10, width // 28))
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_height = int(draw.textbbox((0, 0), "Ag", font=font)[3] * 1.3) + 1
    average = max(1.0, draw.textlength("abcdefghijklmnopqrstuvwxyz", font=font) / 26)
    columns = max(8, int((panel - 2 * margin) / average))

    lines: list[str] = []
    for number, label in enumerate(labels, 1):
        wrapped = _wrap(f"{number}. {label}", columns, panel - 2 * margin, font, draw)
        lines += [*wrapped, ""]
    canvas_height = max(height, 2 * margin + line_height * len(lines))
    canvas = Image.new("RGB", (width + panel, canvas_height), "white")
    canvas.paste(image.convert("RGB"), (0, 0))
    ink = ImageDraw.Draw(canvas)
    ink.line([(width, 0), (width, canvas_height)], fill=(200, 200, 200), width=1)
    y = margin
    for line in lines:
        ink.text((width + margin, y), line, fill=(20, 20, 20), font=font)
        y += line_height
    return canvas


def _wrap(
    text: str,
    columns: int,
    max_width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    draw: ImageDraw.ImageDraw,
) -> list[str]:
    """Wrap to ``columns`` characters, then narrower until every line fits ``max_width``."""
    while True:
        lines = textwrap.wrap(text, columns, break_long_words=True) or [""]
        if columns <= 4 or all(draw.textlength(line, font=font) <= max_width for line in lines):
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
    return Encoded(buffer.getvalue(), spec.content_type, spec.extension)


def process(image: Image.Image, spec: OutputSpec, metadata: Mapping[str, str]) -> Encoded:
    """The whole chain for one image."""
    return encode(thumbnail(annotate(image, spec.labels), spec.max_side), spec, metadata)


def read_metadata(body: bytes) -> dict[str, str]:
    """The metadata :func:`encode` embedded, read back from any of the three formats."""
    image = Image.open(io.BytesIO(body))
    if image.format == "PNG":
        return {key: str(value) for key, value in image.text.items()}  # type: ignore[attr-defined]
    comment = image.getexif().get(EXIF_USER_COMMENT)
    return dict(json.loads(comment)) if comment else {}
