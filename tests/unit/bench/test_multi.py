"""Multi-concept query recipes (app.bench.multi) on a tiny random model."""

from __future__ import annotations

import numpy as np
import pytest

from app.bench.datasets import Concept, Query
from app.bench.methods import PolarPlusImage, normalize
from app.bench.multi import MULTI_VARIANTS, PolarMulti, share_fit, soft_and
from app.bench.runner import METHODS, BenchSettings
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle

STEPS = 20
CONCEPTS = [Concept("a", "ball", ()), Concept("b", "box", ())]
SINGLE = Query("a * on the beach", ("a",), (0,), "context")
PAIR = Query("a * and a * at night", ("a", "b"), (0,), "multi")


def photos(bundle: ClipBundle, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    return normalize(g.normal(size=(3, bundle.embed_dim))).astype(np.float32)


def make(bundle: ClipBundle, **opts: object) -> PolarMulti:
    m = PolarMulti(bundle, "m", lam=0.0, steps=STEPS, token_mode="distinct", weight=0.5, **opts)  # type: ignore[arg-type]
    for i, c in enumerate(CONCEPTS):
        m.fit(c, photos(bundle, i))
    return m


@pytest.fixture(scope="module")
def fitted(tiny: ClipBundle) -> PolarMulti:
    return make(tiny)


def variant(base: PolarMulti, **opts: object) -> PolarMulti:
    """Another recipe on the same adapters."""
    m = PolarMulti(base.bundle, "v", weight=0.5, stack="embeddings", **opts)  # type: ignore[arg-type]
    share_fit(base, m)
    return m


def test_single_concept_queries_are_polar_tuned(fitted: PolarMulti) -> None:
    other = variant(fitted, fuse="per", multi_weight=1.0, context=2.0, score_mode="min")
    ref = PolarPlusImage(fitted.bundle, "ref", weight=0.5, stack="embeddings")
    share_fit(fitted, ref)
    pool = photos(fitted.bundle, 9)
    np.testing.assert_allclose(other.score([SINGLE], pool), ref.score([SINGLE], pool), atol=1e-6)


def test_catother_swaps_only_the_other_placeholder(fitted: PolarMulti) -> None:
    m = variant(fitted, partial="catother")
    ta, tb = fitted.adapters["a"].token, fitted.adapters["b"].token
    want = [
        encode_texts(m.bundle, [f"a {ta} ball and a box at night"], [m.adapters["a"]])[0],
        encode_texts(m.bundle, [f"a ball and a {tb} box at night"], [m.adapters["b"]])[0],
    ]
    np.testing.assert_allclose(m.partials(PAIR), np.stack(want), atol=1e-6)
    assert np.abs(m.partials(PAIR) - fitted.partials(PAIR)).max() > 1e-4


def test_per_concept_fusion_adds_each_concepts_own_photos(fitted: PolarMulti) -> None:
    m = variant(fitted, fuse="per", multi_weight=0.7)
    parts = fitted.partials(PAIR)
    means = normalize(np.stack([photos(m.bundle, 0).mean(0), photos(m.bundle, 1).mean(0)]))
    want = normalize(normalize(parts + 0.7 * means).sum(axis=0))
    np.testing.assert_allclose(m.encode([PAIR])[0], want, atol=1e-6)


def test_global_fusion_weight_and_context(fitted: PolarMulti) -> None:
    m = variant(fitted, multi_weight=0.25, context=1.0)
    ta, tb = fitted.adapters["a"].token, fitted.adapters["b"].token
    plain = encode_texts(m.bundle, [f"a {ta} ball and a {tb} box at night"])[0]
    q = normalize(normalize(fitted.partials(PAIR).sum(axis=0)) + plain)
    want = normalize(q + 0.25 * m.concept_photo_mean(("a", "b")))
    np.testing.assert_allclose(m.encode([PAIR])[0], want, atol=1e-6)


def test_soft_and_needs_every_concept() -> None:
    sims = np.array([[0.9, 0.55, 0.98], [0.2, 0.55, 0.25]])  # (K=2, N=3): image 1 matches both
    assert int(np.argmax(soft_and(sims, "min", 0.05))) == 1
    assert int(np.argmax(soft_and(sims, "softmin", 0.05))) == 1
    assert int(np.argmax(sims.sum(axis=0))) == 2  # a plain sum prefers the one-sided image
    np.testing.assert_allclose(soft_and(sims, "softmin", 1e-4), sims.min(axis=0), atol=1e-3)
    with pytest.raises(ValueError, match="soft-AND"):
        soft_and(sims, "max", 0.05)


def test_min_scoring_scores_each_partial(fitted: PolarMulti) -> None:
    m = variant(fitted, fuse="per", multi_weight=0.25, score_mode="min")
    pool = photos(m.bundle, 7)
    want = (m.fused_partials(PAIR) @ pool.T).min(axis=0)
    np.testing.assert_allclose(m.score([PAIR], pool)[0], want, atol=1e-6)


def test_variants_are_registered_with_the_tuned_training(tiny: ClipBundle) -> None:
    for name in MULTI_VARIANTS:
        m = METHODS[name](tiny, BenchSettings(lam=0.1))
        assert isinstance(m, PolarMulti) and m.name == name
        assert m.token_mode == "distinct" and m.stack == "embeddings" and m.lam == 0.0
