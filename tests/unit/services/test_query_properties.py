"""Properties of the query rewriter and the concept-name validator over arbitrary Unicode.

The audit found queries that 500'd because names were matched with `re.IGNORECASE` but looked
up with `casefold()` ("Fıdo", "FİDO", "kirmizi" vs "Kırmızı"). These properties say what must
hold for any text at all: the rewriter never raises, every mention it reports is the concept's
name under the one folding rule (app.text.fold), and a valid name is always found again.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from app.errors import InvalidConceptName
from app.services.concepts import MAX_NAME_CHARS, clean_name
from app.services.query import NamedConcept, find_mentions, normalize_name, rewrite_query
from app.text import UnsafeText, check_text, clean_text, fold

PROPS = settings(max_examples=300, deadline=None, derandomize=True, database=None)

# Any code point, surrogates included: what a JSON "\\ud800" escape decodes to.
ANY_TEXT = st.text(st.characters(codec=None), max_size=40)
# Letters whose case mapping is special: Turkish i's, sharp s, final sigma, ligatures.
TRICKY = "abcçdefgğhıijklmnoöprsştuüvyzABCÇDEFGĞHIİJKLMNOÖPRSŞTUÜVYZßẞσςΣﬁĲĳǅǈ0123456789"
TRICKY_NAMES = st.text(st.sampled_from(TRICKY), min_size=1, max_size=12)


def _names(draw_names: list[str]) -> list[NamedConcept]:
    return [NamedConcept(f"c{i}", n) for i, n in enumerate(draw_names)]


@PROPS
@given(query=ANY_TEXT, names=st.lists(ANY_TEXT, max_size=4))
@example(query="Fıdo on the beach", names=["Fido"])
@example(query="FİDO on the beach", names=["Fido"])
@example(query="kirmizi", names=["Kırmızı"])
@example(query="STRASSE", names=["straße"])
def test_every_mention_is_the_name_under_the_one_folding_rule(query, names):
    concepts = _names(names)
    mentions = find_mentions(query, concepts)  # never raises
    by_id = {c.id: c for c in concepts}
    last_end = 0
    for m in mentions:
        assert last_end <= m.start < m.end <= len(query)
        last_end = m.end
        # What was matched is what the lookup knows: the same key.
        assert fold(query[m.start : m.end]) == normalize_name(by_id[m.concept_id].name)


@PROPS
@given(query=ANY_TEXT, names=st.lists(ANY_TEXT, max_size=4))
def test_rewriting_never_raises_and_keeps_only_known_ids(query, names):
    concepts = _names(names)
    phrases = {c.id: f"sks{i} thing" for i, c in enumerate(concepts)}
    out = rewrite_query(query, concepts, phrases)
    assert set(out.concept_ids) <= set(phrases)
    assert out.text == " ".join(out.text.split())


@PROPS
@given(name=TRICKY_NAMES, before=st.sampled_from(["", "a photo of "]), upper=st.booleans())
@example(name="Fido", before="", upper=True)
@example(name="Kırmızı", before="find ", upper=True)
@example(name="İstanbul", before="", upper=False)
def test_a_name_is_found_in_any_case(name, before, upper):
    variant = name.upper() if upper else name.lower()
    query = f"{before}{variant} at the beach"
    out = rewrite_query(query, [NamedConcept("c", name)], {"c": "sks dog"})
    assert out.concept_ids == ("c",), (query, name)
    assert "sks dog" in out.text


@PROPS
@given(raw=ANY_TEXT)
@example(raw="\ud800")
@example(raw="Fi\x00do")
@example(raw="  Fido  ")
def test_the_name_validator_accepts_only_findable_names(raw):
    try:
        name = clean_name(clean_text(raw))
    except (UnsafeText, InvalidConceptName):
        return  # refused with a clear error (422 through the API); never anything else
    assert name == name.strip() and name.isprintable()
    assert 1 <= len(name) <= MAX_NAME_CHARS
    assert check_text(name) == name
    key = normalize_name(name)
    assert key
    # A valid name is found again in a query, as a whole word, exactly where it stands.
    query = f"look: {name} here"
    out = find_mentions(query, [NamedConcept("c", name)])
    assert [(m.start, m.end) for m in out][:1] == [(6, 6 + len(name))], (query, out)


@PROPS
@given(raw=ANY_TEXT)
def test_clean_text_is_utf8_and_stable(raw):
    try:
        text = clean_text(raw)
    except UnsafeText:
        assert any(0xD800 <= ord(c) <= 0xDFFF or c == "\x00" for c in raw)
        return
    text.encode("utf-8")  # never raises
    assert clean_text(text) == text


@pytest.mark.parametrize(
    ("a", "b"),
    [("Fido", "FİDO"), ("Fido", "fıdo"), ("Kırmızı", "KIRMIZI"), ("Straße", "STRASSE")],
)
def test_fold_equates_case_variants(a, b):
    assert fold(a) == fold(b)


@settings(suppress_health_check=[HealthCheck.too_slow], deadline=None, database=None)
@given(name=TRICKY_NAMES)
def test_fold_is_idempotent_on_names(name):
    assert fold(fold(name)) == fold(name)
