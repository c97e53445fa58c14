"""The ``tiny`` model: a tiny, randomly initialised Stable Diffusion pipeline.

Same classes as SD 1.5 (CLIP tokenizer with SD 1.5's own vocabulary, CLIP text encoder,
UNet2DConditionModel, AutoencoderKL, PNDM scheduler with SD 1.5's settings), about three
million parameters, built without any download. It is written to disk once and then loaded
with ``from_pretrained`` like any real model, so tests and demos exercise the same code path as
production. It draws noise, fast.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from skufleet.schemas.vocab import MAX_TOKENS, clip_vocabulary

SEED = 0
"""Weights come from a fixed seed, so every process that builds them gets the same model."""
VERSION = "2"
"""Bumped whenever the architecture below changes, so stale copies are rebuilt."""


def write_tokenizer(directory: Path) -> int:
    """Write SD 1.5's CLIP tokenizer (vocab.json, merges.txt) to ``directory``; returns its size.

    The vocabulary ships with skufleet, so ``tiny`` reads prompts exactly as SD 1.5 does.
    """
    vocab, merges = clip_vocabulary()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        encoding="utf-8",
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": MAX_TOKENS, "tokenizer_class": "CLIPTokenizer"}),
        encoding="utf-8",
    )
    return len(vocab)


def build(directory: Path) -> None:
    """Build the tiny pipeline and save it to ``directory`` in diffusers' layout."""
    import torch
    from diffusers import (
        AutoencoderKL,
        PNDMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    vocab_size = write_tokenizer(directory / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(directory / "tokenizer")
    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    vae = AutoencoderKL(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        norm_num_groups=32,
    )
    text_encoder = CLIPTextModel(text_config(vocab_size))
    scheduler = PNDMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        set_alpha_to_one=False,
        skip_prk_steps=True,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)  # type: ignore[attr-defined]


def text_config(vocab_size: int) -> Any:
    """The tiny two-layer CLIP text encoder's configuration (shared with ``tiny-clip``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )


def build_once(target: Path, marker: str, build: Callable[[Path], None]) -> Path:
    """``target``, built by ``build`` unless it already holds ``marker``.

    Several worker processes may start at once: each builds into a private temporary
    directory and renames it into place; the first rename wins and the rest are discarded.
    """
    if (target / marker).exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / marker).exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure(cache_dir: Path) -> Path:
    """The tiny pipeline's directory under ``cache_dir``, built on first use."""
    return build_once(cache_dir / f"tiny-sd-v{VERSION}", "model_index.json", build)
