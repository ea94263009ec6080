"""`make demo`'s library: Fido's part unchanged by Rex, the pair scenes and their kinds."""

from __future__ import annotations

import io
from collections import Counter

import pytest
from PIL import Image

from app.demo.run_demo import (
    FIDO_CATEGORY,
    FIDO_INDEX,
    PAIR_SCENES,
    REX_CATEGORY,
    REX_INDEX,
    LibraryImage,
    beats_plain,
    build_library,
    concept_photos,
    first_hit_shows,
    ranks_of,
    shows_all,
)
from app.demo.world import SCENES, World

LOOKALIKES = ("colors", "pattern", "shape")


@pytest.fixture(scope="module")
def world() -> World:
    return World(seed=0)


@pytest.fixture(scope="module")
def library(world: World) -> list[LibraryImage]:
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    rex = world.instance(REX_INDEX, REX_CATEGORY)
    return build_library(world, fido, per_scene=2, others=3, rex=rex)


def test_rex_adds_pairs_after_an_unchanged_single_object_library(
    world: World, library: list[LibraryImage]
) -> None:
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    alone = build_library(world, fido, per_scene=2, others=3)
    assert library[: len(alone)] == alone
    pairs = library[len(alone) :]
    assert pairs and all(Image.open(io.BytesIO(i.png)).size == (64, 64) for i in pairs)
    assert len({i.filename for i in library}) == len(library)


def test_pair_scenes_hold_fido_and_rex_and_every_decoy(library: list[LibraryImage]) -> None:
    assert "beach" in PAIR_SCENES and set(PAIR_SCENES) <= set(SCENES)
    pairs = [i for i in library if "+" in i.kind]  # "+" marks the two-object scenes
    assert {i.scene for i in pairs} == set(PAIR_SCENES)
    assert len(pairs) == len(PAIR_SCENES) * (2 + 3 * len(LOOKALIKES))
    for scene in PAIR_SCENES:
        kinds = Counter(i.kind for i in pairs if i.scene == scene)
        expected = {"fido+rex": 2}
        for what in LOOKALIKES:
            expected[f"fido+rex look-alike: other {what}"] = 1
            expected[f"fido look-alike: other {what}+rex"] = 1
            expected[f"fido look-alike+rex look-alike: other {what}"] = 1
        assert kinds == expected
    shows = {i.kind: i.shows for i in pairs}
    assert shows["fido+rex"] == ("Fido", "Rex")
    assert shows["fido+rex look-alike: other shape"] == ("Fido",)
    assert shows["fido look-alike: other colors+rex"] == ("Rex",)
    assert shows["fido look-alike+rex look-alike: other pattern"] == ()
    assert {i.shows for i in library if i.kind == "fido"} == {("Fido",)}


def test_the_fido_rule_counts_only_single_fido_photos(library: list[LibraryImage]) -> None:
    """Pair photos show Fido on the beach too, but the exit-code rule names fido-beach-N only."""
    beach = sorted(i.filename for i in library if i.filename.startswith("fido-beach"))
    assert beach == ["fido-beach-0.png", "fido-beach-1.png"]
    pair_beach = sorted(i.filename for i in library if i.filename.startswith("fido-rex-beach"))
    assert pair_beach == ["fido-rex-beach-0.png", "fido-rex-beach-1.png"]


def test_ranks_and_marks() -> None:
    rows = [("a", "fido-rex-beach-1.png", 0.9), ("b", "fido-beach-0.png", 0.8)]
    rows.append(("c", "fido-rex-beach-0.png", 0.7))
    assert ranks_of(rows, "fido-rex-beach") == [1, 3]
    assert ranks_of(rows, "fido-beach") == [2]
    pair = LibraryImage("x.png", "fido+rex", "beach", b"", ("Fido", "Rex"))
    assert shows_all(pair, ("Fido",)) and shows_all(pair, ("Fido", "Rex"))
    assert not shows_all(LibraryImage("y.png", "fido", "beach", b"", ("Fido",)), ("Fido", "Rex"))
    assert not shows_all(None, ("Fido",))


def test_each_concept_has_its_own_photos(world: World) -> None:
    fido = world.instance(FIDO_INDEX, FIDO_CATEGORY)
    rex = world.instance(REX_INDEX, REX_CATEGORY)
    fido_photos = concept_photos(world, fido)
    assert fido_photos == concept_photos(world, fido)  # deterministic
    assert len(fido_photos) == 5
    assert not set(fido_photos) & set(concept_photos(world, rex, stream_index=20_001))


def test_beats_plain_needs_every_target_in_the_top_k_and_a_lower_rank_sum() -> None:
    assert beats_plain([2, 3], [5, 7], n=2, k=10)
    assert beats_plain([2, 4], [8], n=2, k=10)  # plain misses one: personalized wins
    assert not beats_plain([2], [5, 7], n=2, k=10)  # personalized misses one
    assert not beats_plain([2, 12], [5, 7], n=2, k=10)  # found, but past the top k
    assert not beats_plain([5, 7], [2, 3], n=2, k=10)
    assert not beats_plain([2, 8], [3, 7], n=2, k=10)  # a tie is not better


def test_the_gate_wants_the_concepts_first_in_the_queried_scene(
    library: list[LibraryImage],
) -> None:
    by_name = {i.filename: i for i in library}

    def rows(*names: str) -> list[tuple[str, str, float]]:
        return [(str(n), name, 1.0 - n / 10) for n, name in enumerate(names)]

    fido = ("Fido",)
    assert first_hit_shows(rows("fido-beach-0.png", "hat-beach-0.png"), by_name, fido, "beach")
    assert first_hit_shows(rows("fido-rex-beach-0.png"), by_name, fido, "beach")
    assert not first_hit_shows(
        rows("lookalike-shape-beach-0.png", "fido-beach-0.png"), by_name, fido, "beach"
    )
    assert not first_hit_shows(rows("fido-snow-0.png"), by_name, fido, "beach")
    assert not first_hit_shows(rows(), by_name, fido, "beach")
    both = ("Fido", "Rex")
    assert first_hit_shows(rows("fido-rex-beach-1.png"), by_name, both, "beach")
    assert not first_hit_shows(rows("fido-beach-0.png"), by_name, both, "beach")
