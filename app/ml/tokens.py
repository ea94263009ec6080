"""Placeholder tokens: the shared `sks` or a distinct rare single-BPE word per concept."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache
from typing import Any

from open_clip.tokenizer import SimpleTokenizer

SHARED_TOKEN = "sks"  # the paper's placeholder
_NO_VOWELS = set("bcdfghjklmnpqrstvwxz")  # vowel-free words read as meaningless codes
_OFFENSIVE = ("fck", "sht", "fkn", "ffs", "stfu", "wtf", "kkk")  # users see the rewritten query


def count_tokens(tokenizer: Callable[..., Any], text: str) -> int:
    """Tokens of `text` including start and end, before any truncation."""
    if isinstance(tokenizer, SimpleTokenizer):
        return len(tokenizer.encode(text)) + 2
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip HFTokenizer
    if inner is not None:
        return len(inner(text)["input_ids"])
    raise NotImplementedError(f"cannot count tokens with {type(tokenizer).__name__}")


@cache
def rare_tokens(tokenizer: SimpleTokenizer, vocab_size: int) -> tuple[str, ...]:
    """Vowel-free 3-4 letter words that are one BPE token, rarest (latest merge) first."""
    out: list[tuple[int, str]] = []
    for piece, idx in tokenizer.encoder.items():
        word = piece[:-4]
        if (
            piece.endswith("</w>")
            and idx < vocab_size
            and 3 <= len(word) <= 4
            and set(word) <= _NO_VOWELS
            and word != SHARED_TOKEN
            and not any(bad in word for bad in _OFFENSIVE)
            and tokenizer.encode(word) == [idx]
        ):
            out.append((idx, word))
    return tuple(word for _, word in sorted(out, reverse=True))


def pick_token(tokenizer: Callable[..., Any], vocab_size: int, taken: set[str], mode: str) -> str:
    """`shared` -> "sks"; `distinct` -> the rarest suitable token not in `taken`."""
    if mode == "shared":
        return SHARED_TOKEN
    if mode != "distinct":
        raise ValueError(f"token mode must be 'shared' or 'distinct', not {mode!r}")
    if not isinstance(tokenizer, SimpleTokenizer):
        raise NotImplementedError("distinct tokens need open_clip's SimpleTokenizer")
    used = {t.casefold() for t in taken}
    for word in rare_tokens(tokenizer, vocab_size):
        if word not in used:
            return word
    raise RuntimeError("no unused rare token left for a new concept")
