import pytest

from app.services.query import NamedConcept, find_mentions, normalize_name, rewrite_query

FIDO = NamedConcept("c1", "Fido")
BIG_FIDO = NamedConcept("c2", "Big Fido")
LUNA = NamedConcept("c3", "Luna")
PHRASES = {"c1": "sks dog", "c2": "xyz dog", "c3": "sks cat"}


def rw(q, concepts=(FIDO, LUNA)):
    return rewrite_query(q, list(concepts), PHRASES)


def test_plain_query_is_unchanged_and_names_no_concept():
    r = rw("a dog at the beach")
    assert r.text == "a dog at the beach"
    assert r.concept_ids == ()


@pytest.mark.parametrize("q", ["Fido at the beach", "fido at the beach", "FIDO at the beach"])
def test_case_insensitive(q):
    r = rw(q)
    assert r.text == "sks dog at the beach"
    assert r.concept_ids == ("c1",)


@pytest.mark.parametrize("q", ["Fido's ball", "fido’s ball"])
def test_possessive_keeps_suffix(q):
    assert rw(q).text == "sks dog's ball"


@pytest.mark.parametrize("q", ["Fidorama at the beach", "SuperFido", "fido2 on snow"])
def test_whole_words_only(q):
    assert rw(q).concept_ids == ()


def test_longest_name_first():
    r = rw("Big Fido and Fido", (FIDO, BIG_FIDO))
    assert r.text == "xyz dog and sks dog"
    assert r.concept_ids == ("c2", "c1")


def test_multiword_name_matches_any_whitespace():
    r = rw("big   fido on grass", (FIDO, BIG_FIDO))
    assert r.text == "xyz dog on grass"


def test_two_concepts_in_order_of_mention():
    r = rw("Luna and Fido on the sofa")
    assert r.text == "sks cat and sks dog on the sofa"
    assert r.concept_ids == ("c3", "c1")


def test_repeated_mention_counts_once_in_ids_but_rewrites_both():
    r = rw("Fido chasing fido")
    assert r.text == "sks dog chasing sks dog"
    assert r.concept_ids == ("c1",)
    assert len(r.mentions) == 2


def test_names_with_regex_characters_are_literal():
    odd = NamedConcept("c9", "R2.D2 (toy)")
    assert find_mentions("R2xD2 (toy) here", [odd]) == []
    assert rewrite_query("my R2.D2 (toy) here", [odd], {"c9": "sks toy"}).text == "my sks toy here"


def test_normalize_name_collapses_case_and_space():
    assert normalize_name("  Big   FIDO ") == "big fido"
