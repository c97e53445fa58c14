"""How a rendered image becomes the stored object: format, quality, size, labels.

A plain dataclass (no pydantic) so the worker's post-processing, and the GPU benchmark that
drives it, need nothing beyond the standard library to read it. Stored on each item as
canonical JSON, so an enqueue can tell when it changed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

FORMATS = {
    "png": ("image/png", "png"),
    "webp": ("image/webp", "webp"),
    "jpeg": ("image/jpeg", "jpg"),
}
"""Output format → (content type, object key extension)."""
COMPRESSIONS = ("standard", "fast")
"""How hard PNG is compressed: ``standard`` is zlib level 6 with adaptive row filters
(Pillow's, about 47 ms for a 512×512 image on one core); ``fast`` filters every row with
``sub`` and deflates with ISA-L at level 2 (about a tenth of the time, files ~12% larger).
Both are lossless: the pixels read back are the same. WebP and JPEG ignore it."""
MAX_LABELS = 12
MAX_LABEL_CHARS = 200


@dataclass(frozen=True)
class OutputSpec:
    format: str = "png"
    quality: int = 90
    """For WebP and JPEG, 1-100; PNG is lossless."""
    compression: str = "standard"
    """For PNG: ``standard`` or ``fast`` (see :data:`COMPRESSIONS`)."""
    max_side: int | None = None
    """Shrink so that the longer side is at most this many pixels (a thumbnail)."""
    labels: tuple[str, ...] = field(default_factory=tuple)
    """Drawn as a numbered list on a panel beside the image (e.g. explanation points)."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.compression not in COMPRESSIONS:
            raise ValueError(
                f"compression must be one of {', '.join(COMPRESSIONS)}, got {self.compression!r}"
            )
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality must be 1-100, got {self.quality}")
        if self.max_side is not None and not 16 <= self.max_side <= 4096:
            raise ValueError(f"max_side must be 16-4096, got {self.max_side}")
        if len(self.labels) > MAX_LABELS or any(len(x) > MAX_LABEL_CHARS for x in self.labels):
            raise ValueError(
                f"at most {MAX_LABELS} labels of at most {MAX_LABEL_CHARS} characters each"
            )
        object.__setattr__(self, "labels", tuple(self.labels))

    @property
    def content_type(self) -> str:
        return FORMATS[self.format][0]

    @property
    def extension(self) -> str:
        return FORMATS[self.format][1]

    def to_json(self) -> str:
        """Canonical JSON: only what differs from the defaults, keys sorted."""
        values = {k: v for k, v in asdict(self).items() if v != getattr(DEFAULT, k)}
        if "labels" in values:
            values["labels"] = list(values["labels"])
        return json.dumps(values, sort_keys=True, ensure_ascii=False)

    @classmethod
    def from_json(cls, text: str | None) -> OutputSpec:
        data: dict[str, Any] = json.loads(text or "{}")
        data["labels"] = tuple(data.get("labels", ()))
        return cls(**data)


DEFAULT = OutputSpec()
