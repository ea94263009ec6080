"""The synthetic PerVL dataset: sizes, ground truth, determinism, disjoint splits."""

from __future__ import annotations

import numpy as np
import pytest

from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.demo.world import SCENE_PHRASES

SMALL = SyntheticConfig(concepts=4, context_scenes=2, pair_scenes=1, background=6)


@pytest.fixture(scope="module")
def small() -> object:
    return build_synthetic("test", SMALL)


def test_sizes_follow_the_config(small) -> None:  # type: ignore[no-untyped-def]
    # per concept 2 scenes x (concept + 3 look-alikes); 2 pairs x 1 scene x 4; background 6
    assert len(small.pool) == 4 * 2 * 4 + 2 * 1 * 4 + 6
    assert len(small.captions) == len(small.pool)
    assert {k: len(small.queries_of(k)) for k in ("context", "concept", "multi")} == {
        "context": 8,
        "concept": 4,
        "multi": 2,
    }
    assert all(len(c.train) == SMALL.shots for c in small.concepts.values())
    assert [c.category for c in small.concepts.values()] == ["ball", "box", "cup", "star"]


def test_ground_truth_is_consistent(small) -> None:  # type: ignore[no-untyped-def]
    concept_gt = {q.concepts[0]: set(q.gt) for q in small.queries_of("concept")}
    for q in small.queries_of("context"):
        assert set(q.gt) <= concept_gt[q.concepts[0]]  # in-scene images of the concept
        scene = next(s for s, ph in SCENE_PHRASES.items() if q.text.endswith(ph[0]))
        for i in q.gt:  # every ground-truth image shows that scene (its caption says so)
            assert any(ph in small.captions[i] for ph in SCENE_PHRASES[scene])
    for q in small.queries_of("multi"):
        a, b = q.concepts
        assert set(q.gt) <= concept_gt[a] & concept_gt[b]  # both concepts visible
        assert q.text.startswith("a * and a * ")
    # each concept: 2 single images + 2 pair images (with its partner, with a decoy partner)
    assert all(len(gt) == 4 for gt in concept_gt.values())


def test_deterministic_and_splits_disjoint() -> None:
    a, b = build_synthetic("test", SMALL), build_synthetic("test", SMALL)
    assert all(np.array_equal(x, y) for x, y in zip(a.pool, b.pool, strict=True))
    assert a.captions == b.captions
    val = build_synthetic("val", SMALL)
    assert not set(val.info["instances"].values()) & set(a.info["instances"].values())


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="split"):
        build_synthetic("train", SMALL)
