"""Find a user's concept names in a search query and rewrite them to placeholder phrases."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from app.text import fold, fold_with_spans

# Straight and typographic apostrophes; "Fido's" and "Fido’s" both name Fido.
_APOSTROPHES = "'\u2019"


@dataclass(frozen=True)
class NamedConcept:
    """The part of a concept the query rewriter needs."""

    id: str
    name: str


@dataclass(frozen=True)
class ConceptMention:
    """One occurrence of a concept name in the query."""

    concept_id: str
    name: str
    start: int
    end: int  # exclusive; excludes a possessive suffix


@dataclass(frozen=True)
class RewrittenQuery:
    text: str
    mentions: tuple[ConceptMention, ...]

    @property
    def concept_ids(self) -> tuple[str, ...]:
        """Distinct concept ids in order of first mention."""
        return tuple(dict.fromkeys(m.concept_id for m in self.mentions))


def normalize_name(name: str) -> str:
    """The key two concept names collide on (`app.text.fold`): the same rule finds them."""
    return fold(name)


def _name_pattern(key: str) -> str:
    # Whitespace inside a multi-word name matches any run of whitespace in the query.
    return r"\s+".join(re.escape(p) for p in key.split())


def find_mentions(query: str, concepts: Sequence[NamedConcept]) -> list[ConceptMention]:
    """Whole-word, caseless mentions; longer names win where names overlap.

    The query is folded with the same rule as the names' keys and searched case-sensitively,
    so every match is a key (no `re.IGNORECASE`, whose notion of case differs from `fold`).
    """
    by_key: dict[str, NamedConcept] = {}
    for c in concepts:
        key = normalize_name(c.name)
        if key:
            by_key.setdefault(key, c)
    if not by_key:
        return []
    # Longest first so "Big Fido" is preferred to "Fido" at the same position.
    keys = sorted(by_key, key=lambda k: (-len(k), k))
    alternation = "|".join(f"(?:{_name_pattern(k)})" for k in keys)
    # A name is a whole word: not preceded or followed by a word character. A possessive
    # suffix ('s) is allowed after it and stays in the query.
    pattern = re.compile(rf"(?<!\w)({alternation})(?!\w)")
    folded, starts, ends = fold_with_spans(query)
    mentions = []
    for m in pattern.finditer(folded):
        start, end = m.span(1)
        # Only whole characters of the query: a match inside one character's folding
        # ("ß" -> "ss") is no mention.
        if start > 0 and starts[start - 1] == starts[start]:
            continue
        if end < len(folded) and starts[end] == starts[end - 1]:
            continue
        concept = by_key.get(" ".join(m.group(1).split()))
        if concept is None:  # cannot happen: every alternative is a key
            continue
        mentions.append(ConceptMention(concept.id, concept.name, starts[start], ends[end - 1]))
    return mentions


def rewrite_query(
    query: str, concepts: Sequence[NamedConcept], phrases: Mapping[str, str]
) -> RewrittenQuery:
    """Replace every mention with its concept's placeholder phrase (`phrases[concept_id]`)."""
    mentions = find_mentions(query, concepts)
    out: list[str] = []
    pos = 0
    for m in mentions:
        out.append(query[pos : m.start])
        out.append(phrases[m.concept_id])
        pos = m.end
    out.append(query[pos:])
    text = "".join(out)
    # Normalise typographic possessives so the tokenizer sees the common form.
    for apostrophe in _APOSTROPHES[1:]:
        text = text.replace(apostrophe + "s", "'s")
    return RewrittenQuery(text=" ".join(text.split()), mentions=tuple(mentions))
