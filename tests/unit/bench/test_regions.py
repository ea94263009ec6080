"""Region re-ranking in the benchmark (app.bench.regions) on a tiny model and a tiny split."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from app.bench.datasets import PerVLDataset
from app.bench.methods import normalize
from app.bench.multi import MULTI_VARIANTS, PolarMulti, share_fit
from app.bench.regions import (
    REGION_DEFAULTS,
    PolarRegions,
    place_on_top,
    summarize,
    sweep_scores,
    top_candidates,
)
from app.bench.runner import (
    DEFAULT_METHOD,
    DEFAULT_METHODS,
    METHODS,
    BenchSettings,
    embed_dataset,
    evaluate,
    pool_regions,
)
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.ml import regions as ml_regions
from app.ml.model import ClipBundle
from app.ml.regions import rerank_scores

STEPS = 20
SMALL = SyntheticConfig(concepts=2, context_scenes=1, pair_scenes=1, background=3)
CTX = MULTI_VARIANTS["polar_multi_ctx"]


def tuned(bundle: ClipBundle, cls: type[PolarMulti], **opts: object) -> PolarMulti:
    """polar_multi_ctx's recipe with few training steps."""
    return cls(
        bundle, "m", lam=0.0, steps=STEPS, token_mode="distinct", stack="embeddings",
        weight=0.5, **CTX, **opts,  # type: ignore[arg-type]
    )  # fmt: skip


@pytest.fixture(scope="module")
def small(tiny: ClipBundle) -> tuple[PerVLDataset, PolarMulti]:
    ds = build_synthetic("test", SMALL)
    base = tuned(tiny, PolarMulti)
    for cid, c in ds.concepts.items():
        base.fit(c, normalize(np.random.default_rng(len(cid)).normal(size=(3, tiny.embed_dim))))
    return ds, base


def regions_method(base: PolarMulti, **opts: object) -> PolarRegions:
    m = tuned(base.bundle, PolarRegions, **opts)
    assert isinstance(m, PolarRegions)
    share_fit(base, m)
    return m


def test_top_candidates_and_place_on_top() -> None:
    scores = np.array([0.5, 0.9, 0.1, 0.7, 0.3], dtype=np.float32)
    assert top_candidates(scores, 2).tolist() == [1, 3]
    assert top_candidates(scores, 0).tolist() == [1, 3, 0, 4, 2]
    assert top_candidates(scores, 99).tolist() == [1, 3, 0, 4, 2]
    out = place_on_top(scores, np.array([1, 3]), np.array([-5.0, -4.0], dtype=np.float32))
    assert np.argsort(-out).tolist() == [3, 1, 0, 4, 2]  # re-ordered, still above the rest
    assert out[[0, 4, 2]].tolist() == scores[[0, 4, 2]].tolist()  # the rest keep their scores
    every = place_on_top(scores, np.arange(5), scores[::-1].copy())
    np.testing.assert_allclose(every, scores[::-1])  # nothing left to stay above: no shift


def test_sweep_scores_aggregates_parts() -> None:
    base = np.zeros((1, 3), dtype=np.float32)
    matches = [np.array([[1.0, 0.6, 0.0], [0.0, 0.6, 1.0]], dtype=np.float32)]  # (K=2, N=3)
    mean = sweep_scores(base, matches, "mean", 1.0, 0)
    low = sweep_scores(base, matches, "min", 1.0, 0)
    np.testing.assert_allclose(mean[0], [0.5, 0.6, 0.5])
    np.testing.assert_allclose(low[0], [0.0, 0.6, 0.0])
    base = np.array([[0.3, 0.0, 0.2]], dtype=np.float32)
    top2 = sweep_scores(base, matches, "mean", 10.0, 2)  # image 1 is not a candidate
    assert np.argsort(-top2[0]).tolist() == [0, 2, 1]


def test_single_concept_queries_keep_polar_multi_ctx(
    small: tuple[PerVLDataset, PolarMulti],
) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    m = regions_method(base, candidates=0)
    m.regions = pool_regions(m.bundle, ds, emb, "five")
    single = ds.queries_of("context") + ds.queries_of("concept")
    np.testing.assert_allclose(m.score(single, emb.pool), base.score(single, emb.pool), atol=1e-6)


def test_multi_queries_rerank_the_candidates(small: tuple[PerVLDataset, PolarMulti]) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    regions = pool_regions(base.bundle, ds, emb, "five")
    (pair,) = ds.queries_of("multi")
    ref = base.score([pair], emb.pool)[0]
    m = regions_method(base, candidates=0, region_weight=8.0)
    m.regions = regions
    got = m.score([pair], emb.pool)[0]
    want = rerank_scores(ref, m.fused_partials(pair), emb.pool, regions, 8.0)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-want, kind="stable").tolist()

    # An image whose crops hold exactly the query's parts wins when it is a candidate...
    loser = int(np.argmin(ref))
    planted = regions.copy()
    planted[loser, :2] = m.fused_partials(pair)
    m.regions = planted
    assert int(np.argmax(m.score([pair], emb.pool)[0])) == loser
    # ... and stays where it was when it is not: the top 3 are re-ordered, the rest untouched.
    m.candidates = 3
    top = m.score([pair], emb.pool)[0]
    assert set(np.argsort(-top)[:3]) == set(np.argsort(-ref)[:3])
    rest = np.argsort(-ref)[3:]
    np.testing.assert_allclose(top[rest], ref[rest], atol=1e-6)

    m.regions = None
    with pytest.raises(ValueError, match="regions"):
        m.score([pair], emb.pool)


def test_evaluate_embeds_regions_once_and_only_when_needed(
    small: tuple[PerVLDataset, PolarMulti], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    calls: list[int] = []
    real = ml_regions.encode_boxes

    def counting(bundle: ClipBundle, images: list[Any], boxes: Any, batch_size: int = 64) -> Any:
        calls.append(len(images))
        return real(bundle, images, boxes, batch_size)

    monkeypatch.setattr(ml_regions, "encode_boxes", counting)
    evaluate(tuned(base.bundle, PolarMulti), ds, emb)
    assert emb.regions == {} and calls == []  # other methods pay nothing
    first = evaluate(regions_method(base), ds, emb)
    assert emb.regions["five"].shape == (len(ds.pool), 5, base.bundle.embed_dim)
    assert sum(calls) == len(ds.pool) and "five" in emb.region_seconds
    evaluate(regions_method(base), ds, emb)
    assert sum(calls) == len(ds.pool)  # shared, not recomputed
    assert {"context", "concept", "multi", "retention"} <= set(first)


def test_registered_as_the_default_method(tiny: ClipBundle) -> None:
    assert DEFAULT_METHOD == "polar_multi_regions" and DEFAULT_METHOD in DEFAULT_METHODS
    m = METHODS["polar_multi_regions"](tiny, BenchSettings(lam=0.1))
    assert isinstance(m, PolarRegions) and m.name == "polar_multi_regions"
    assert (m.layout, m.region_weight, m.candidates) == (
        REGION_DEFAULTS["layout"], REGION_DEFAULTS["region_weight"], REGION_DEFAULTS["candidates"],
    )  # fmt: skip
    assert (m.layout, m.region_weight, m.candidates) == ("five", 8.0, 200)
    assert (m.fuse, m.multi_weight, m.context) == ("per", 1.0, 1.0)  # polar_multi_ctx's recipe
    assert m.token_mode == "distinct" and m.stack == "embeddings" and m.lam == 0.0


def test_summarize_means_over_seeds_and_ranks_the_choice() -> None:
    def seed(s: int, choice: float, other: float) -> dict[str, object]:
        row = {"context": {"mrr": 0.8}, "multi": {"mrr": 0.4}}
        return {
            "bench_seed": s,
            "grid": {
                "multi": {
                    "five60/mean/8/c200": {"mrr": choice, "r@1": 0.5},
                    "grid3_50/min/1/c0": {"mrr": other, "r@1": 0.5},
                },
                "context": {"five60/mean/8/c200": {"mrr": 0.7, "r@1": 0.5}},
            },
            "polar_multi_ctx": row | {"retention_drop": 0.01 * s},
            "polar_multi_regions": row,
        }

    out = summarize([seed(0, 0.6, 0.9), seed(1, 0.8, 0.3)])
    assert out["grid"]["multi"]["five60/mean/8/c200"]["mrr"] == pytest.approx(0.7)
    assert out["choice"]["rank_of"] == [1, 2]  # 0.7 beats 0.6 on the mean
    assert out["choice"]["multi_mrr_per_seed"] == [0.6, 0.8]
    assert out["polar_multi_ctx"]["ratio"] == pytest.approx(0.5)
    assert out["polar_multi_ctx"]["retention_drop"] == pytest.approx(0.005)
