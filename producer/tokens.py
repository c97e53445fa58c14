"""Counting prompt tokens exactly as Stable Diffusion 1.5's CLIP tokenizer does.

SD 1.5 reads at most 77 tokens (start and end included) and silently drops the rest, so the
producer reports every prompt that would be cut, and where.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import BPE

from skufleet.schemas.vocab import BOS, EOS, MAX_TOKENS, clip_vocabulary

CONTENT_TOKENS = MAX_TOKENS - 2
"""Tokens left for the prompt itself once the start and end tokens are counted."""


@functools.cache
def clip_tokenizer() -> Tokenizer:
    """CLIP's fast tokenizer, built like ``transformers.CLIPTokenizer`` from the shipped vocab."""
    vocab, merges = clip_vocabulary()
    tokenizer = Tokenizer(
        BPE(
            vocab=vocab,
            merges=merges,
            continuing_subword_prefix="",
            end_of_word_suffix="</w>",
            fuse_unk=False,
            unk_token=EOS,
        )
    )
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tokenizer.add_special_tokens([BOS, EOS])  # matched before normalisation, as in transformers
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(
                Regex(
                    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|"""
                    r"""[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
                ),
                behavior="removed",
                invert=True,
            ),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    return tokenizer


@dataclass(frozen=True)
class TokenCount:
    tokens: int
    """Tokens including start and end, as the text encoder sees them before cutting."""
    cut: str
    """The end of the prompt that SD 1.5 never reads ('' when it fits)."""

    @property
    def too_long(self) -> bool:
        return self.tokens > MAX_TOKENS


# CLIP's pre-tokenizer regex restricted to ASCII text, where \p{L} is [a-z] after lowercasing
# and \p{N} is [0-9]; alternatives in the same order, so the matches are identical. Text that
# may hold a special token ("<|") takes the full tokenizer, which matches those before anything.
# (\s is spelt out: Python's counts \x1c-\x1f as space, Unicode's White_Space does not.)
_ASCII_WORDS = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\t\n\x0b\x0c\r a-z0-9]+")


_WORD_TOKENS: dict[str, int] = {}
"""Tokens per pre-token, filled as words are met; a catalogue repeats most of its words."""


def _ascii_count(prompt: str) -> int:
    """Content tokens of an ASCII prompt: CLIP encodes each pre-token on its own, so the
    count is a sum over words, looked up in a memo."""
    words = _ASCII_WORDS.findall(prompt.lower())
    try:
        return sum(map(_WORD_TOKENS.__getitem__, words))
    except KeyError:
        tokenizer = clip_tokenizer()
        for word in words:
            if word not in _WORD_TOKENS:
                _WORD_TOKENS[word] = len(tokenizer.encode(word, add_special_tokens=False).ids)
        return sum(map(_WORD_TOKENS.__getitem__, words))


def count_tokens(prompts: Sequence[str]) -> list[TokenCount]:
    """Token counts of many prompts, with the cut-off part of those that are too long.

    ASCII prompts are counted word by word with a memo (fast on large catalogues); others,
    and the too-long ones whose cut point is needed, go through the full tokenizer.
    """
    unique = list(dict.fromkeys(prompts))  # a catalogue repeats its negatives, for one
    if len(unique) < len(prompts):
        found = dict(zip(unique, count_tokens(unique), strict=True))
        return [found[prompt] for prompt in prompts]
    counts: list[TokenCount | None] = []
    for prompt in prompts:
        fast = prompt.isascii() and "<|" not in prompt
        fits = fast and (n := _ascii_count(prompt)) <= CONTENT_TOKENS
        counts.append(TokenCount(n + 2, "") if fits else None)
    slow = [i for i, count in enumerate(counts) if count is None]
    encodings = clip_tokenizer().encode_batch([prompts[i] for i in slow], add_special_tokens=False)
    for i, encoding in zip(slow, encodings, strict=True):
        ids, prompt = encoding.ids, prompts[i]
        cut = prompt[encoding.offsets[CONTENT_TOKENS][0] :] if len(ids) > CONTENT_TOKENS else ""
        counts[i] = TokenCount(len(ids) + 2, cut)
    return [count for count in counts if count is not None]
