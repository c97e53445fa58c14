"""Turning a rendered image into the bytes that are stored."""

from __future__ import annotations

import io
from collections.abc import Mapping

from PIL import Image, PngImagePlugin


def encode_png(image: Image.Image, text: Mapping[str, str]) -> bytes:
    """PNG bytes with ``text`` embedded as UTF-8 iTXt chunks (prompt, seed, model, …)."""
    info = PngImagePlugin.PngInfo()
    for key, value in text.items():
        info.add_itxt(key, value)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=6)
    return buffer.getvalue()
