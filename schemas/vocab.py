"""CLIP's text vocabulary, the one Stable Diffusion v1.x reads prompts with.

Shipped with skufleet (``clip_bpe_simple_vocab_16e6.txt.gz``, MIT, see CLIP_VOCAB_LICENSE) so
that the producer can count a prompt's tokens exactly as SD 1.5 will, and the ``tiny``
model can use the same tokenizer, without downloading anything.
"""

from __future__ import annotations

import functools
import gzip
from pathlib import Path

VOCAB_FILE = Path(__file__).resolve().parent / "clip_bpe_simple_vocab_16e6.txt.gz"
MAX_TOKENS = 77
"""CLIP's context, start and end tokens included; SD 1.5 cuts every prompt there."""
BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
_MERGES = 49152 - 256 - 2
"""CLIP keeps the first 48,894 merges: 256 bytes × 2 + merges + 2 specials = 49,408 tokens."""


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from the 256 byte values to printable characters."""
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


@functools.cache
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of CLIP ViT-L/14's tokenizer, token ids as in SD 1.5."""
    lines = gzip.decompress(VOCAB_FILE.read_bytes()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _MERGES + 1]]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [f"{symbol}</w>" for symbol in symbols]
    tokens += ["".join(merge) for merge in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}, [(a, b) for a, b in merges]
