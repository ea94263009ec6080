"""The benchmark's default method ranks a pool as the service does on the same data.

One tiny synthetic split: the bench's default method (`polar_multi_regions`) trains the
concepts and scores every query over the pool; the same adapters, photo embeddings, pool
embeddings and region embeddings (float16, as the service stores them) go into a SQLite library,
and `search_images` answers the same queries written with the concepts' names. Both rankings
of the whole pool must be equal, query by query. A bench that drifts from the service (another
photo weight, no context term, another re-ranking weight) fails this test: the last test shows
the comparison is sharp enough to see such drifts on this data.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy.orm import Session

from app.bench.datasets import PerVLDataset, Query, render
from app.bench.multi import share_fit
from app.bench.runner import (
    METHODS,
    TUNED_TRAINING,
    BenchSettings,
    embed_dataset,
    pool_regions,
)
from app.bench.service import ServiceRecipe
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.config import LimitSettings, SearchSettings
from app.db import make_engine, make_session_factory, migrate
from app.ml.model import ClipBundle
from app.ml.regions import pack_regions, unpack_regions
from app.models import Adapter, Concept, ConceptExample, Image
from app.services.index import IndexCache
from app.services.model import ServingModel
from app.services.search import AdapterCache, SearchEnv, SearchQuery, search_images
from app.services.users import create_user

SMALL = SyntheticConfig(concepts=3, context_scenes=2, pair_scenes=2, background=6)
NAMES = ("fido", "luna", "rex")  # one word each, as a user would name them
BOTH = SearchSettings(region_method="both")


@dataclass
class Setup:
    ds: PerVLDataset
    method: ServiceRecipe  # the bench's default, fitted
    pool: np.ndarray  # (N, D) whole-image embeddings
    regions: np.ndarray  # (N, R, D) regions as the service stores them (float16)
    names: dict[str, str]  # bench concept id -> the user's name for it


@pytest.fixture(scope="module")
def setup(tiny: ClipBundle) -> Setup:
    ds = build_synthetic("test", SMALL)
    method = METHODS["polar_multi_regions"](tiny, BenchSettings(lam=0.0))
    assert isinstance(method, ServiceRecipe) and method.search == SearchSettings()
    assert method.layout == "five-late"  # auto: late regions for a ViT such as this tiny model
    # Parity is checked with both kinds of regions (the demo model's auto), which runs the
    # code of both: the service below gets the same settings.
    method.search = BOTH
    method.steps = 30  # training length only; the query recipe is the registered one
    emb = embed_dataset(tiny, ds)
    for cid, concept in ds.concepts.items():
        method.fit(concept, emb.photos[cid])
    assert method.layout == "five-both"  # crops and pooled regions
    stored = pool_regions(tiny, ds, emb, method.layout)  # (N, 10, D) float32
    regions = np.stack([unpack_regions(pack_regions(r), tiny.embed_dim) for r in stored])
    pool = emb.pool
    method.regions = regions
    names = dict(zip(ds.concepts, NAMES, strict=False))
    assert len(names) == len(ds.concepts) and len(ds.pool) <= method.search.region_candidates
    return Setup(ds, method, pool, regions, names)


@pytest.fixture
def library(setup: Setup, tiny: ClipBundle, tmp_path: Path) -> Iterator[tuple[Session, str]]:
    """The split's pool and concepts as one user's SQLite library; (session, user id)."""
    engine = make_engine(f"sqlite:///{(tmp_path / 'parity.db').as_posix()}")
    migrate(engine)
    model_id = tiny.fingerprint.model_id
    with make_session_factory(engine)() as s:
        user_id = create_user("parity", db_session=s).id
        for n, (vec, crops) in enumerate(zip(setup.pool, setup.regions, strict=True)):
            s.add(
                Image(
                    user_id=user_id, vec_id=n + 1, sha256=f"{n:064x}",
                    original_filename=f"{n}.png", mime="image/png", size_bytes=1, width=32,
                    height=32, storage_path=f"originals/{n}.png",
                    embedding=vec.astype(np.float32).tobytes(), embedding_model=model_id,
                    region_embeddings=pack_regions(crops), region_layout="five-both",
                )
            )  # fmt: skip
        for cid, concept in setup.ds.concepts.items():
            name = setup.names[cid]
            adapter = setup.method.adapters[cid]
            row = Concept(
                user_id=user_id, name=name, name_key=name, category=concept.category,
                token=adapter.token, state="ready", version=1,
            )  # fmt: skip
            s.add(row)
            s.flush()
            s.add(
                Adapter(concept_id=row.id, version=1, weights=adapter.to_bytes(), model_id=model_id)
            )
            for j, photo in enumerate(setup.method.photos[cid]):
                s.add(
                    ConceptExample(
                        concept_id=row.id, sha256=f"{j:064x}", storage_path=f"c/{row.id}/{j}",
                        mime="image/png", width=32, height=32,
                        embedding=photo.astype(np.float32).tobytes(), embedding_model=model_id,
                        version_added=1,
                    )
                )  # fmt: skip
        s.commit()
        yield s, user_id
    engine.dispose()


def service_ranking(
    s: Session, user_id: str, query: Query, setup: Setup, tiny: ClipBundle, index: Path
) -> tuple[list[int], list[float], str]:
    """Pool indices best first, their scores, and the text the service encoded."""
    env = SearchEnv(
        db_session=s,
        serving=ServingModel(tiny, "tiny", None),
        index_cache=IndexCache(index),
        adapter_cache=AdapterCache(),
        limits=LimitSettings(),
        search=BOTH,
    )
    text = render(query.text, [setup.names[c] for c in query.concepts])
    out = search_images(user_id, SearchQuery(text=text, k=len(setup.ds.pool)), env)
    assert out.personalized and out.reranked  # every query naming concepts, by default
    return [h.image.vec_id - 1 for h in out.hits], [h.score for h in out.hits], out.text


def test_bench_default_ranks_like_the_service(
    setup: Setup, library: tuple[Session, str], tiny: ClipBundle, tmp_path: Path
) -> None:
    s, user_id = library
    queries = setup.ds.queries
    assert {q.kind for q in queries} == {"context", "concept", "multi"}
    scores = setup.method.score(queries, setup.pool)  # (Q, N)
    for q, row in zip(queries, scores, strict=True):
        ranked, served, text = service_ranking(s, user_id, q, setup, tiny, tmp_path / "index")
        # The service rewrote the names into the placeholders the bench writes.
        assert text == render(q.text, [setup.method.phrase(c) for c in q.concepts])
        assert ranked == np.argsort(-row, kind="stable").tolist(), q
        # Every image is a candidate here, so the scores are the service's too.
        np.testing.assert_allclose(served, row[ranked], atol=1e-4)


@pytest.mark.parametrize(
    "drift",
    [
        {"photo_weight": 0.0},
        {"multi_photo_weight": 0.0},
        {"multi_context_weight": 0.0},
        {"region_weight": 0.0},
        {"pooled_region_weight": 0.0},
    ],
    ids=lambda d: next(iter(d)),
)
def test_a_drifted_bench_would_rank_differently(setup: Setup, drift: dict[str, float]) -> None:
    # The same adapters under one changed recipe setting: some query's ranking moves, so the
    # parity test above would catch a bench that re-implemented the recipe differently.
    drifted = ServiceRecipe(
        setup.method.bundle, "drifted", search=SearchSettings(region_method="both", **drift),  # type: ignore[arg-type]
        **TUNED_TRAINING,  # type: ignore[arg-type]
    )  # fmt: skip
    share_fit(setup.method, drifted)
    drifted.regions = setup.regions
    queries = setup.ds.queries
    same = np.argsort(-setup.method.score(queries, setup.pool), axis=1, kind="stable")
    moved = np.argsort(-drifted.score(queries, setup.pool), axis=1, kind="stable")
    assert not np.array_equal(same, moved)
