"""The service's recipe as a benchmark method (app.bench.service) on a tiny model and split."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from app.bench.datasets import PerVLDataset
from app.bench.methods import normalize
from app.bench.multi import PolarMulti, share_fit
from app.bench.runner import (
    DEFAULT_METHOD,
    DEFAULT_METHODS,
    METHODS,
    TUNED_TRAINING,
    BenchSettings,
    embed_dataset,
    evaluate,
    pool_regions,
)
from app.bench.service import ServiceRecipe
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.config import SearchSettings
from app.ml import regions as ml_regions
from app.ml.model import ClipBundle, TrainingRecipe
from app.ml.regions import rerank_scores
from app.ml.train import train_adapter

STEPS = 20
SMALL = SyntheticConfig(concepts=2, context_scenes=1, pair_scenes=1, background=3)


def service(bundle: ClipBundle, **search: Any) -> ServiceRecipe:
    """The service's recipe under `search` overrides, with few training steps. The tiny model
    is a ViT, whose `auto` region method is crops; these tests were written for both kinds of
    regions (the demo model's `auto`), so that is the method unless a test names one."""
    search.setdefault("region_method", "both")
    opts = TUNED_TRAINING | {"steps": STEPS}
    return ServiceRecipe(bundle, "m", search=SearchSettings(**search), **opts)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def small(tiny: ClipBundle) -> tuple[PerVLDataset, ServiceRecipe]:
    ds = build_synthetic("test", SMALL)
    base = service(tiny, regions="none")
    for cid, c in ds.concepts.items():
        base.fit(c, normalize(np.random.default_rng(len(cid)).normal(size=(3, tiny.embed_dim))))
    return ds, base


def with_regions(base: ServiceRecipe, **search: Any) -> ServiceRecipe:
    m = service(base.bundle, **search)
    share_fit(base, m)
    return m


def test_without_regions_it_is_the_research_recipe_it_was_chosen_as(
    small: tuple[PerVLDataset, ServiceRecipe],
) -> None:
    # app.bench.multi's per-concept fusion + context (at the service's weights) is what it runs: the
    # service's code gives the same scores on the same adapters.
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    research = PolarMulti(
        base.bundle, "r", token_mode="distinct", stack="embeddings", weight=0.5,
        fuse="per", multi_weight=SearchSettings().multi_photo_weight,
        context=SearchSettings().multi_context_weight,
    )  # fmt: skip
    share_fit(base, research)
    # Concept-only queries fuse more of the photos (concept_only_photo_weight), as no
    # research variant did: the rest must match exactly, and those only at the same weight.
    queries = [q for q in ds.queries if q.kind != "concept"]
    np.testing.assert_allclose(
        base.score(queries, emb.pool), research.score(queries, emb.pool), atol=1e-5
    )
    only = ds.queries_of("concept")
    same = with_regions(base, regions="none", concept_only_photo_weight=0.5)
    np.testing.assert_allclose(
        same.score(only, emb.pool), research.score(only, emb.pool), atol=1e-5
    )
    assert not np.allclose(base.score(only, emb.pool), research.score(only, emb.pool))


def test_single_concept_queries_are_reranked_by_their_vector_or_the_concepts_look(
    small: tuple[PerVLDataset, ServiceRecipe],
) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    regions = pool_regions(base.bundle, ds, emb, "five-both")  # the default: both kinds
    crops = regions[:, :5]  # one concept is matched against the crops only
    context, only = ds.queries_of("context"), ds.queries_of("concept")  # "An image of *"
    off = with_regions(
        base, region_candidates=10_000, concept_region_weight=0.0, concept_only_region_weight=0.0
    )
    off.regions = regions
    single = context + only
    np.testing.assert_allclose(off.score(single, emb.pool), base.score(single, emb.pool), atol=1e-6)

    on = with_regions(
        base, region_candidates=10_000, concept_region_weight=2.0, concept_only_region_weight=16.0
    )
    on.regions = regions
    vectors, parts, concept_only = on.encodings(single)
    assert concept_only == [False] * len(context) + [True] * len(only)
    ref = base.score(single, emb.pool)
    got = on.score(single, emb.pool)
    for i, (q, p) in enumerate(zip(single, parts, strict=True)):
        assert p is not None and p.shape == (1, base.bundle.embed_dim)
        if concept_only[i]:  # the concept's look: its photo mean
            np.testing.assert_allclose(p[0], on.photo_mean(q.concepts[0]), atol=1e-6)
            weight = 16.0
        else:  # the query is its one part
            np.testing.assert_allclose(p[0], vectors[i], atol=1e-6)
            weight = 2.0
        want = rerank_scores(ref[i], p, emb.pool, crops, weight)
        assert (
            np.argsort(-got[i], kind="stable").tolist() == np.argsort(-want, kind="stable").tolist()
        )
    assert not np.allclose(got, ref)


def test_multi_queries_rerank_the_candidates(small: tuple[PerVLDataset, ServiceRecipe]) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    regions = pool_regions(base.bundle, ds, emb, "five")
    (pair,) = ds.queries_of("multi")
    ref = base.score([pair], emb.pool)[0]
    m = with_regions(base, region_candidates=10_000, region_weight=8.0, region_method="crops")
    m.regions = regions
    got = m.score([pair], emb.pool)[0]
    parts = m.encodings([pair])[1][0]
    assert parts is not None and parts.shape == (2, base.bundle.embed_dim)
    want = rerank_scores(ref, parts, emb.pool, regions, 8.0)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-want, kind="stable").tolist()

    # An image whose crops hold exactly the query's parts wins when it is a candidate...
    loser = int(np.argmin(ref))
    planted = regions.copy()
    planted[loser, :2] = parts
    m.regions = planted
    assert int(np.argmax(m.score([pair], emb.pool)[0])) == loser
    # ... and stays where it was when it is not: the top 3 are re-ordered, the rest untouched.
    m.search = SearchSettings(region_candidates=3, region_method="crops")
    top = m.score([pair], emb.pool)[0]
    assert set(np.argsort(-top)[:3]) == set(np.argsort(-ref)[:3])
    rest = np.argsort(-ref)[3:]
    np.testing.assert_allclose(top[rest], ref[rest], atol=1e-6)

    m.regions = None
    with pytest.raises(ValueError, match="regions"):
        m.score([pair], emb.pool)
    # Regions of another method (here both kinds, 10 rows, for a crops-only recipe) are refused,
    # not silently matched as nothing.
    m.regions = pool_regions(base.bundle, ds, emb, "five-both")
    with pytest.raises(ValueError, match="not those of layout 'five'"):
        m.score([pair], emb.pool)


def test_with_both_kinds_each_is_matched_at_its_own_weight(
    small: tuple[PerVLDataset, ServiceRecipe],
) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    both = pool_regions(base.bundle, ds, emb, "five-both")
    crops, pooled = both[:, :5], both[:, 5:]
    (pair,) = ds.queries_of("multi")
    ref = base.score([pair], emb.pool)[0]
    m = with_regions(base, region_candidates=10_000, region_weight=3.0, pooled_region_weight=5.0)
    m.regions = both
    got = m.score([pair], emb.pool)[0]
    parts = m.encodings([pair])[1][0]
    assert parts is not None
    want = rerank_scores(ref, parts, emb.pool, crops, 3.0)
    want = rerank_scores(want, parts, emb.pool, pooled, 5.0)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-want, kind="stable").tolist()
    # Which kind is which matters: the same rows under swapped weights rank otherwise.
    swapped = rerank_scores(rerank_scores(ref, parts, emb.pool, crops, 5.0), parts, emb.pool,
                            pooled, 3.0)  # fmt: skip
    assert not np.allclose(want, swapped)


def test_evaluate_embeds_regions_once_and_only_when_needed(
    small: tuple[PerVLDataset, ServiceRecipe], monkeypatch: pytest.MonkeyPatch
) -> None:
    ds, base = small
    emb = embed_dataset(base.bundle, ds)
    calls: list[int] = []
    real = ml_regions.encode_boxes

    def counting(
        bundle: ClipBundle, images: list[Any], boxes: Any, batch_size: int = 64, engine: Any = None
    ) -> Any:
        calls.append(len(images))
        return real(bundle, images, boxes, batch_size, engine)

    monkeypatch.setattr(ml_regions, "encode_boxes", counting)
    evaluate(service(base.bundle, regions="none"), ds, emb)
    assert emb.regions == {} and calls == []  # methods without crops pay nothing
    first = evaluate(with_regions(base), ds, emb)  # both: crops and pooled regions
    assert emb.regions["five-both"].shape == (len(ds.pool), 10, base.bundle.embed_dim)
    np.testing.assert_array_equal(emb.regions["five-both"][:, :5], emb.regions["five"])
    np.testing.assert_array_equal(emb.regions["five-both"][:, 5:], emb.regions["five-pooled"])
    assert sum(calls) == len(ds.pool) and "five-both" in emb.region_seconds
    evaluate(with_regions(base, region_method="crops"), ds, emb)
    evaluate(with_regions(base), ds, emb)
    assert sum(calls) == len(ds.pool)  # shared, not recomputed
    assert {"context", "concept", "multi", "retention"} <= set(first)


def test_the_default_method_is_the_services_defaults(tiny: ClipBundle) -> None:
    assert DEFAULT_METHOD == "polar_multi_regions" and DEFAULT_METHOD in DEFAULT_METHODS
    m = METHODS["polar_multi_regions"](tiny, BenchSettings(lam=0.1))
    assert isinstance(m, ServiceRecipe) and m.name == "polar_multi_regions"
    # the service's defaults: region method auto, which for this tiny ViT is late
    assert m.search == SearchSettings() and m.layout == "five-late"
    # The tiny model has no recipe of its own: the paper's objective with its λ, as the
    # service trains it; the demo model's recipe (its polar.json) brings the keep term.
    assert m.token_mode == "distinct" and m.lam == tiny.default_lam and m.lr == 1e-3
    assert m.trainer is train_adapter
    demo = replace(tiny, recipe=TrainingRecipe(keep_weight=3.0, lr=3e-3, source="polar.json"))
    d = METHODS["polar_multi_regions"](demo, BenchSettings(lam=0.1))
    assert isinstance(d, ServiceRecipe) and d.lam == 0.0 and d.lr == 3e-3
    assert d.trainer is not train_adapter
    ctx = METHODS["polar_multi_ctx"](tiny, BenchSettings(lam=0.1))
    assert isinstance(ctx, ServiceRecipe) and ctx.layout is None
    assert ctx.search == SearchSettings(regions="none")
