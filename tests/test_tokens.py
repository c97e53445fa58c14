"""Prompt tokens are counted exactly as SD 1.5's CLIP tokenizer counts them."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import CLIPTokenizer

from skufleet.producer.tokens import count_tokens
from skufleet.schemas.vocab import clip_vocabulary
from skufleet.worker.tiny import write_tokenizer

WORDS = [
    "photo",
    "of",
    "a",
    "cat's",
    "shoe",
    "e-commerce",
    "3d",
    "42cm",
    "don't",
    "!!",
    "...",
    "Ünïcode",
    "naïve",
    "½",
    "²",
    "日本",
    "x" * 30,
    "studio,",
    "(white)",
    "<|endoftext|>",
]


def reference() -> CLIPTokenizer:
    """transformers' own CLIPTokenizer over the shipped vocabulary, as diffusers loads it."""
    directory = Path(tempfile.mkdtemp(prefix="clip-tokenizer-"))
    write_tokenizer(directory)
    return CLIPTokenizer.from_pretrained(directory, model_max_length=10_000)


REFERENCE = reference()


def test_the_shipped_vocabulary_has_sd15_token_ids() -> None:
    """Same ids as openai/clip-vit-large-patch14: start 49406, end 49407, 'photo</w>' 1125."""
    vocab, merges = clip_vocabulary()
    assert (len(vocab), len(merges)) == (49408, 48894)
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"], vocab["photo</w>"]) == (
        49406,
        49407,
        1125,
    )


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.sampled_from(WORDS), st.text(max_size=12)), max_size=60))
def test_counts_match_the_transformers_tokenizer(words: list[str]) -> None:
    """Property: for ASCII and non-ASCII prompts alike, the count equals CLIPTokenizer's."""
    prompt = " ".join(words)
    expected = len(REFERENCE(prompt, truncation=False).input_ids)
    assert count_tokens([prompt])[0].tokens == expected


def test_a_long_prompt_reports_what_would_be_cut() -> None:
    """The part of a prompt past token 77 is returned, so the report can show it."""
    prompt = "red shoe, " * 30 + "END"
    (count,) = count_tokens([prompt])
    assert count.too_long and count.tokens == 93
    assert count.cut.endswith("END") and prompt.endswith(count.cut)
    assert len(REFERENCE(prompt[: len(prompt) - len(count.cut)], truncation=False).input_ids) == 77
