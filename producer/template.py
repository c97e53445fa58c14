"""Prompt templates, rendered in a sandbox with strict undefined names.

Catalogue text is data, never code: templates are Jinja2 in a ``SandboxedEnvironment``, and
a field the template names but the row lacks is an error that names the field, never an
empty string in a prompt.
"""

from __future__ import annotations

from dataclasses import dataclass

from jinja2 import StrictUndefined, TemplateError
from jinja2.sandbox import SandboxedEnvironment

from schemas.errors import ItemError

_ENVIRONMENT = SandboxedEnvironment(undefined=StrictUndefined, autoescape=False)

DEFAULT_SHOT = "main"
DEFAULT_PROMPT = (
    "{{ title }}{% if category is defined and category %}, {{ category }}{% endif %}, "
    "professional e-commerce product photo, centered on a clean white background, "
    "soft studio lighting, sharp focus, high detail"
)
DEFAULT_NEGATIVE = "blurry, low quality, distorted, deformed, watermark, text, logo, cropped"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt and a negative prompt template, compiled once."""

    prompt: str = DEFAULT_PROMPT
    negative: str = DEFAULT_NEGATIVE

    def __post_init__(self) -> None:
        object.__setattr__(self, "_prompt", _ENVIRONMENT.from_string(self.prompt))
        object.__setattr__(self, "_negative", _ENVIRONMENT.from_string(self.negative))

    def render(self, fields: dict[str, str]) -> tuple[str, str]:
        """``(prompt, negative prompt)`` for one row; ItemError names a missing field."""
        try:
            prompt = self._prompt.render(fields)  # type: ignore[attr-defined]
            negative = self._negative.render(fields)  # type: ignore[attr-defined]
        except TemplateError as exc:
            raise ItemError(f"template: {exc.message}") from exc
        return " ".join(prompt.split()), " ".join(negative.split())
