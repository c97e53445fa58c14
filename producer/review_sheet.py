"""What the review page shows, and its static export: the run's reviewable items with their
"low score" mark, the page itself (``review_page.html`` beside this module, its data
embedded as JSON that cannot end its ``<script>`` element), thumbnails of the stored
images, and :func:`export`, the page as one read-only file with the thumbnails inside.

"Low score" (the filter) means: a check failed, or passed by less than :data:`LOW_MARGIN`
(10%) of its threshold, ``(score - threshold) / |threshold| < 0.1``; higher scores are better
for every check.
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import functools
import html
import io
import json
import logging
import os
import secrets
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError
from PIL import Image, UnidentifiedImageError
from sqlalchemy.engine import Connection, Engine

from skufleet.producer.bucket import Bucket
from skufleet.producer.paths import check_output
from skufleet.schemas import ledger
from skufleet.schemas.errors import ConfigError, StorageUnavailable
from skufleet.schemas.redact import redact_text

log = logging.getLogger(__name__)

PAGE = Path(__file__).with_name("review_page.html")
"""The contact sheet's HTML, CSS and script, one self-contained page."""
THUMBNAIL_SIDE = 256
"""Pixels of a thumbnail's longer side (smaller images are kept as they are)."""
THUMBNAIL_QUALITY = 82
"""JPEG quality of thumbnails (images with transparency become PNG)."""
LOW_MARGIN = 0.10
"""The "low score" filter: a check failed, or passed within this fraction of its threshold."""
EXPORT_THREADS = 8
"""Objects the export reads from the bucket at once."""


# --- what the page shows -------------------------------------------------------------------


def _margin(verdict: Any) -> float | None:
    """How far a check's score is above its threshold, as a fraction of the threshold."""
    if not isinstance(verdict, dict):
        return None
    try:
        score, threshold = float(verdict["score"]), float(verdict["threshold"])
    except (KeyError, TypeError, ValueError):
        return None
    return (score - threshold) / max(abs(threshold), 1e-9)


def is_low(item: dict[str, Any]) -> bool:
    """The "low score" filter: a check failed, or one passed within :data:`LOW_MARGIN`."""
    if item.get("failed"):
        return True
    margins = [_margin(v) for v in (item.get("scores") or {}).values()]
    return any(m is not None and m < LOW_MARGIN for m in margins)


def page_items(conn: Connection, run_id: int) -> list[dict[str, Any]]:
    """The run's reviewable items as the page reads them (``Reviewed.as_dict`` and ``low``)."""
    found = []
    for reviewed in ledger.reviewable(conn, run_id):
        item = reviewed.as_dict()
        item["low"] = is_low(item)
        found.append(item)
    return found


@functools.cache
def _template() -> str:
    return PAGE.read_text(encoding="utf-8")


def embed_json(value: Any) -> str:
    """``value`` as JSON safe inside an HTML ``<script>`` element: no ``</``, ``<!--``, ``&``
    or line separators that could end the element or change how it is read."""
    return (
        json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        .replace("<", "\\u003c")
        .replace(">", "\\u003e")
        .replace("&", "\\u0026")
        .replace("\u2028", "\\u2028")
        .replace("\u2029", "\\u2029")
    )


def render_page(data: dict[str, Any], nonce: str, *, static: bool) -> str:
    """The contact sheet: one self-contained HTML page (``data``: its config and, when
    ``static``, its items with their thumbnails)."""
    csp = (
        "default-src 'none'; img-src data:; "
        f"style-src 'nonce-{nonce}'; script-src 'nonce-{nonce}'; base-uri 'none'; "
        "form-action 'none'"
    )
    meta = (
        f'<meta http-equiv="Content-Security-Policy" content="{html.escape(csp)}">'
        if static
        else ""
    )
    title = f"Review · {data['run']}" + (" (export)" if static else "")
    return (
        _template()
        .replace("{{META}}", meta)
        .replace("{{TITLE}}", html.escape(title))
        .replace("{{NONCE}}", nonce)
        .replace("{{DATA}}", embed_json(data))
    )


# --- images --------------------------------------------------------------------------------


def read_object(bucket: Bucket, key: str) -> bytes | None:
    """The object at ``key``; None when the bucket has none there."""
    try:
        response = bucket.client.get_object(Bucket=bucket.name, Key=key)
        return bytes(response["Body"].read())
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in {"NoSuchKey", "404", "NotFound"}:
            return None
        raise StorageUnavailable(f"cannot read {key!r}: {redact_text(str(exc))}") from exc
    except BotoCoreError as exc:
        raise StorageUnavailable(f"cannot read {key!r}: {redact_text(str(exc))}") from exc


def thumbnail(data: bytes, side: int = THUMBNAIL_SIDE) -> tuple[bytes, str]:
    """``(bytes, content type)``: the image shrunk to fit ``side`` pixels, as JPEG (PNG when
    it has transparency). ConfigError when ``data`` is not an image Pillow reads."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.draft("RGB", (side, side))
            image.thumbnail((side, side))
            alpha = image.mode in {"RGBA", "LA", "PA"} or "transparency" in image.info
            buffer = io.BytesIO()
            if alpha:
                image.convert("RGBA").save(buffer, "PNG", optimize=True)
                return buffer.getvalue(), "image/png"
            image.convert("RGB").save(buffer, "JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
            return buffer.getvalue(), "image/jpeg"
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise ConfigError(f"the stored object is not an image Pillow reads: {exc}") from exc


def data_uri(data: bytes, content_type: str) -> str:
    return f"data:{content_type};base64,{base64.b64encode(data).decode('ascii')}"


# --- export --------------------------------------------------------------------------------


def export(
    engine: Engine,
    bucket: Bucket,
    run_name: str,
    path: Path,
    *,
    side: int = THUMBNAIL_SIDE,
) -> dict[str, Any]:
    """Write the run's contact sheet as one static, read-only HTML file at ``path`` (a
    directory: ``path/sheet.html``), thumbnails embedded. Returns ``{run, path, items,
    missing}`` (``missing``: items whose object the bucket no longer has)."""
    if path.is_dir():
        path = path / "sheet.html"
    check_output(path, flag="--export")
    with ledger.connect(engine) as conn:
        run_id = ledger.find_run_id(conn, run_name)
        items = page_items(conn, run_id)

    def embedded(item: dict[str, Any]) -> str | None:
        key = item.get("object_key")
        found = read_object(bucket, key) if key else None
        if found is None:
            return None
        try:
            return data_uri(*thumbnail(found, side))
        except ConfigError:
            log.warning("item %s: %s is not an image", item["id"], key)
            return None

    with concurrent.futures.ThreadPoolExecutor(EXPORT_THREADS) as pool:
        thumbs = list(pool.map(embedded, items))
    missing = 0
    for item, thumb in zip(items, thumbs, strict=True):
        item["thumb"] = thumb
        missing += thumb is None
    data = {
        "mode": "export",
        "run": run_name,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "low_margin": LOW_MARGIN,
        "items": items,
    }
    page = render_page(data, secrets.token_urlsafe(18), static=True)
    # written beside its final name, then moved there: never a half-written sheet
    temporary: str | None = None
    try:
        handle, temporary = tempfile.mkstemp(prefix=".sheet-", dir=path.absolute().parent)
        with os.fdopen(handle, "w", encoding="utf-8") as sink:
            sink.write(page)
        os.chmod(temporary, 0o644)  # mkstemp's 0600 would keep the sheet from its readers
        os.replace(temporary, path)
    except OSError as exc:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        raise ConfigError(f"--export {path}: cannot write it: {exc.strerror}") from None
    return {"run": run_name, "path": str(path), "items": len(items), "missing": missing}
