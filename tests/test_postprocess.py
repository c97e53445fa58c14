"""Post-processing: formats, metadata, thumbnails and the annotation panel."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from skufleet.schemas.output import OutputSpec
from skufleet.worker.postprocess import TRUNCATED, annotate, process, read_metadata, thumbnail

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


LONG_PROMPTS = {
    "cjk": "青い陶器のマグカップ、白い背景、スタジオ照明" * 273,  # 6,006 characters
    "ascii": "a blue ceramic mug on a white background, " * 715,  # 30,030 characters
}


@pytest.mark.parametrize("fmt", ["png", "webp", "jpeg"])
@pytest.mark.parametrize("kind", sorted(LONG_PROMPTS))
def test_long_prompts_never_fail_an_image_and_exif_keeps_a_marked_prefix(
    fmt: str, kind: str
) -> None:
    """A 6,000-character CJK or 30,000-character ASCII prompt (and negative prompt) encodes
    in every format: PNG keeps the whole text, WebP and JPEG (whose EXIF must fit one
    65,533-byte segment) keep a prefix of each ending in the truncation marker, and the
    short fields whole."""
    text = LONG_PROMPTS[kind]
    metadata = {**META, "prompt": text, "negative_prompt": "blurry, " + text}
    encoded = process(image(), OutputSpec(format=fmt, quality=80), metadata)
    decoded = Image.open(io.BytesIO(encoded.body))
    decoded.load()
    assert decoded.size == (96, 64)
    found = read_metadata(encoded.body)
    if fmt == "png":
        assert found == metadata
        return
    assert {k: found[k] for k in META if "prompt" not in k} == {
        k: v for k, v in META.items() if "prompt" not in k
    }
    for key in ("prompt", "negative_prompt"):
        assert found[key].endswith(TRUNCATED)
        kept = found[key].removesuffix(TRUNCATED)
        assert len(kept) > 1000 and metadata[key].startswith(kept)


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_fast_png_is_lossless_valid_and_keeps_the_metadata(mode: str) -> None:
    """``compression = "fast"``: a valid PNG (every chunk's CRC checked on reading) whose
    pixels and text read back exactly, a fraction larger than the standard one."""
    rng = np.random.default_rng(7)
    smooth = np.cumsum(rng.integers(-3, 4, (96, 128, 3)), axis=1) % 256
    image = Image.fromarray(smooth.astype(np.uint8)).convert(mode)
    metadata = {"prompt": "a lamp — ünïcode ✓ 日本語", "seed": "42", "sku": "SKU/1"}
    fast = process(image, OutputSpec(compression="fast"), metadata)
    standard = process(image, OutputSpec(), metadata)
    Image.open(io.BytesIO(fast.body)).verify()
    back = Image.open(io.BytesIO(fast.body))
    assert back.mode == mode and (np.asarray(back) == np.asarray(image)).all()
    assert read_metadata(fast.body) == metadata
    assert (fast.width, fast.height, fast.format, fast.extension) == (128, 96, "png", "png")
    assert len(standard.body) < len(fast.body) < 2 * len(standard.body)


def test_standard_png_is_pillows_level_6_byte_for_byte() -> None:
    """The default stays what it was: the same bytes as Pillow's PNG at zlib level 6 with
    the metadata as iTXt, so a stored object's SHA-256 does not change with this setting."""
    from PIL import PngImagePlugin

    image = Image.fromarray(
        np.arange(64 * 64 * 3, dtype=np.uint32).reshape(64, 64, 3).astype(np.uint8)
    )
    metadata = {"prompt": "p", "seed": "1"}
    info = PngImagePlugin.PngInfo()
    for key, value in metadata.items():
        info.add_itxt(key, value)
    expected = io.BytesIO()
    image.save(expected, format="PNG", pnginfo=info, compress_level=6)
    assert process(image, OutputSpec(), metadata).body == expected.getvalue()
    assert OutputSpec(compression="standard").to_json() == OutputSpec().to_json() == "{}"
    with pytest.raises(ValueError, match="compression must be one of standard, fast"):
        OutputSpec(compression="max")


def test_compression_is_chosen_by_pack_shot_or_flag_and_a_bad_one_names_its_flag() -> None:
    """``compression`` is an output key like ``format``: the flag wins over the shot and
    the pack, and ``--compression`` with a bad value is one line naming it."""
    from skufleet.producer.console import parse_overrides
    from skufleet.schemas.errors import ConfigError
    from skufleet.schemas.params import layer

    assert layer("tiny", pack={"compression": "fast"}).spec().compression == "fast"
    chosen = layer("tiny", pack={"compression": "fast"}, flags={"compression": "standard"})
    assert chosen.spec() == OutputSpec()
    with pytest.raises(
        ConfigError, match=r"--compression must be one of standard, fast, got .max."
    ):
        parse_overrides("tiny", None, compression="max")
