"""Prompt alignment for the quality gate: a CLIP score of each image against its prompt.

Off unless ``SKUFLEET_QUALITY_CLIP`` names a CLIP model (a hub id such as
``openai/clip-vit-base-patch32`` or a local directory); ``tiny-clip`` is a tiny randomly
initialised CLIP built locally, as ``tiny`` is for Stable Diffusion, for tests and demos. Its
scores mean nothing about the image; they exercise the same code path.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from skufleet.schemas.errors import ConfigError
from skufleet.worker.tiny import build_once, text_config, write_tokenizer

TINY = "tiny-clip"
VERSION = "1"


def _image_processor() -> Any:
    """CLIP's image processor; the Pillow one where torchvision is not installed."""
    import transformers

    try:
        import torchvision  # noqa: F401
    except ImportError:
        return getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    return transformers.CLIPImageProcessor


def build_tiny(directory: Path) -> None:
    """A two-layer CLIP (text and vision) with SD 1.5's tokenizer, saved to ``directory``."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig

    vocab_size = write_tokenizer(directory)
    torch.manual_seed(0)
    text = text_config(vocab_size)
    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=32,
        patch_size=8,
    )
    config = CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)
    CLIPModel(config).save_pretrained(directory)
    processor = _image_processor()(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    processor.save_pretrained(directory)


def ensure_tiny(cache_dir: Path) -> Path:
    """The tiny CLIP's directory under ``cache_dir``, built once."""
    return build_once(cache_dir / f"tiny-clip-v{VERSION}", "config.json", build_tiny)


def _tensor(features: Any) -> torch.Tensor:
    """The projected embeddings: transformers 4 returns them, 5 wraps them in an output."""
    if isinstance(features, torch.Tensor):
        return features
    return torch.as_tensor(features.pooler_output)


class ClipScorer:
    """CLIP on one device, loaded once; :meth:`score` rates images against prompts."""

    def __init__(self, model: str, device: torch.device, cache_dir: Path) -> None:
        from transformers import CLIPModel, CLIPTokenizer

        source: str | Path = ensure_tiny(cache_dir) if model == TINY else model
        try:
            loaded: Any = CLIPModel.from_pretrained(source)
            self.model: Any = loaded.to(device).eval()
            self.tokenizer: Any = CLIPTokenizer.from_pretrained(source)
            self.processor: Any = _image_processor().from_pretrained(source)
        except (OSError, ValueError) as exc:
            raise ConfigError(
                f"SKUFLEET_QUALITY_CLIP={model!r} cannot be loaded as a CLIP model: {exc}"
            ) from exc
        self.device = device

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], prompts: Sequence[str]) -> list[float]:
        """100 × the cosine of each image's embedding with its own prompt's."""
        pixels = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt"
        )
        image_embeds = self.model.get_image_features(pixel_values=pixels.to(self.device))
        text_embeds = self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device),
        )
        image_embeds = torch.nn.functional.normalize(_tensor(image_embeds).float(), dim=-1)
        text_embeds = torch.nn.functional.normalize(_tensor(text_embeds).float(), dim=-1)
        return [float(v) * 100.0 for v in (image_embeds * text_embeds).sum(-1).cpu()]
