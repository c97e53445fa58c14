"""Post-processing: formats, metadata, thumbnails and the annotation panel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from schemas.output import OutputSpec
from worker.postprocess import annotate, process, read_metadata, thumbnail

META = {
    "prompt": "a café table, ünïcode ✓",
    "negative_prompt": "blurry",
    "seed": "42",
    "steps": "30",
    "guidance_scale": "7.5",
    "model": "tiny",
    "sku": "T-1",
}


def image(width: int = 96, height: int = 64) -> Image.Image:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize(
    ("fmt", "pil_format", "content_type", "extension"),
    [
        ("png", "PNG", "image/png", "png"),
        ("webp", "WEBP", "image/webp", "webp"),
        ("jpeg", "JPEG", "image/jpeg", "jpg"),
    ],
)
def test_each_format_embeds_the_generation_metadata(
    fmt: str, pil_format: str, content_type: str, extension: str
) -> None:
    """PNG, WebP and JPEG files carry prompt, negative prompt, seed, steps, guidance, model."""
    encoded = process(image(), OutputSpec(format=fmt, quality=80), META)
    assert (encoded.content_type, encoded.extension) == (content_type, extension)
    assert Image.open(io.BytesIO(encoded.body)).format == pil_format
    assert read_metadata(encoded.body) == META


def test_png_is_lossless_and_lower_quality_makes_smaller_jpegs() -> None:
    """PNG keeps the pixels exactly; JPEG quality trades bytes for fidelity."""
    source = image()
    png = process(source, OutputSpec(), META)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(png.body))), np.asarray(source))
    small = process(source, OutputSpec(format="jpeg", quality=20), META)
    large = process(source, OutputSpec(format="jpeg", quality=95), META)
    assert len(small.body) < len(large.body)


def test_thumbnails_shrink_the_longer_side_and_never_enlarge() -> None:
    """max_side bounds the longer side and keeps the aspect ratio."""
    assert thumbnail(image(96, 64), 48).size == (48, 32)
    assert thumbnail(image(96, 64), 512).size == (96, 64)
    encoded = process(image(96, 64), OutputSpec(max_side=24), META)
    assert Image.open(io.BytesIO(encoded.body)).size == (24, 16)


def test_labels_are_drawn_beside_the_image_and_never_off_the_canvas() -> None:
    """The image is kept as is on the left; the numbered labels fill a white panel on the
    right, wrapped to it, and the canvas grows taller when the list needs it."""
    source = image(64, 64)
    labels = tuple(f"Point {i}: an explanation long enough to wrap over lines" for i in range(6))
    canvas = annotate(source, labels)
    width, height = canvas.size
    assert width > 64 and height > 64
    pixels = np.asarray(canvas)
    assert np.array_equal(pixels[:64, :64], np.asarray(source))
    panel = pixels[:, 65:]
    ink = np.argwhere(panel.min(axis=2) < 128)
    assert len(ink) > 0  # text was drawn
    margin = 2
    assert ink[:, 0].max() < height - margin and ink[:, 1].max() < panel.shape[1] - margin
    assert annotate(source, ()) is source
