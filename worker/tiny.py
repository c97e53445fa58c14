"""The ``tiny`` model: a tiny, randomly initialised Stable Diffusion pipeline.

Same classes as SD 1.5 (CLIP tokenizer and text encoder, UNet2DConditionModel, AutoencoderKL,
PNDM scheduler with SD 1.5's settings), a few hundred thousand parameters, built without any
download. It is written to disk once and then loaded with ``from_pretrained`` like any real
model, so tests and demos exercise the same code path as production. It draws noise, fast.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import tempfile
from pathlib import Path

SEED = 0
"""Weights come from a fixed seed, so every process that builds them gets the same model."""
VERSION = "1"
"""Bumped whenever the architecture below changes, so stale copies are rebuilt."""


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte → printable character map."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars), strict=True))


# Words that become single tokens, so typical prompts fit CLIP's 77 tokens as they do with
# the real vocabulary; any other word falls back to byte-level pieces.
WORDS = """
a an and the of on in with for to by at from front back side top view close up detail
professional studio product photo photograph photography e-commerce catalogue catalog
centered clean white background soft lighting light sharp focus high quality resolution
blurry low distorted deformed watermark text logo cropped ugly bad noisy grainy dark
shoe shoes boot boots bag bags tote backpack bottle lamp rug pillow cushion blanket chair
table desk sofa bed shelf mug cup bowl plate kettle pan skillet pot knife spoon fork glass
jar box toy toys bear blocks wooden wood metal steel iron brass gold silver leather canvas
cotton linen wool silk ceramic stone glass plastic bamboo paper black white red blue green
yellow orange purple pink brown grey gray beige cream tan natural olive sage teal rose
clear multicolour navy charcoal honey small large mini long short tall round square slim
soft hard heavy light new vintage modern classic minimal elegant simple handmade outdoor
indoor home kitchen garden office travel sport sports running trail hiking camping tent
lantern sunglasses wallet scarf perfume hairbrush brush jacket shirt dress hat watch ring
necklace earrings bracelet phone case laptop headphones speaker camera footwear
accessories beauty diagram illustration infographic labelled labeled anatomical medical
reference lesson biology chemistry history geography map cell molecule heart lung brain
bone muscle skeleton organ anatomy cross section style vector flat colour color colours
colors realistic photorealistic render rendering 3d lifestyle scene person model hand
hands wearing holding table shot angle wide macro texture material pattern printed
""".split()


def _train_merges(words: list[str], byte_char: dict[int, str]) -> list[tuple[str, str]]:
    """Byte-pair merges learnt from ``words`` until each is one token; deterministic.

    Plain BPE training: merge the most frequent adjacent pair (ties broken by the pair
    itself), again and again. Replaying these merges in order, as the tokenizer does,
    rebuilds every training word as one end-of-word token.
    """
    corpus: dict[tuple[str, ...], int] = {}
    for word in words:
        symbols = [byte_char[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        corpus[tuple(symbols)] = corpus.get(tuple(symbols), 0) + 1
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for pieces, n in corpus.items():
            for pair in itertools.pairwise(pieces):
                counts[pair] = counts.get(pair, 0) + n
        if not counts:
            return merges
        best = min(counts, key=lambda pair: (-counts[pair], pair))
        merges.append(best)
        corpus = {_merge(pieces, best): n for pieces, n in corpus.items()}


def _merge(pieces: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(pieces):
        if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
            merged.append(pieces[i] + pieces[i + 1])
            i += 2
        else:
            merged.append(pieces[i])
            i += 1
    return tuple(merged)


def write_tokenizer(directory: Path) -> int:
    """Write a byte-level CLIP vocabulary with merges for ``WORDS``; returns its size."""
    byte_char = _bytes_to_unicode()
    symbols = list(byte_char.values())
    vocab = {symbol: i for i, symbol in enumerate(symbols)}
    vocab.update({f"{symbol}</w>": len(symbols) + i for i, symbol in enumerate(symbols)})
    words = sorted({word for text in WORDS for word in re.findall(r"[a-z]+", text)})
    merges = _train_merges(words, byte_char)
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        encoding="utf-8",
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"}), encoding="utf-8"
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
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

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
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
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
    )
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


def ensure(cache_dir: Path) -> Path:
    """The tiny pipeline's directory under ``cache_dir``, built on first use.

    Several worker processes may start at once: each builds into a private temporary
    directory and renames it into place; the first rename wins and the rest are discarded.
    """
    target = cache_dir / f"tiny-sd-v{VERSION}"
    if (target / "model_index.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".tiny-", dir=cache_dir))
    try:
        build(staging)
        try:
            os.rename(staging, target)
        except OSError:
            if not (target / "model_index.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
