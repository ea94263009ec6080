"""The validation sweep behind crop re-ranking of one-concept queries (issue 18).

A query naming one concept is re-ranked like a several-concept one, with the query vector as
its only part: the `region_candidates` best images get

    base + weight × max_{r ∈ crops ∪ {whole}} <query, r>

so a photo where the concept fills only part of the frame (next to another object) is found
(app.services.recipe, `POLAR_SEARCH__CONCEPT_REGION_WEIGHT`). This sweep runs the service's
recipe (app.bench.service) on the validation split, once per bench seed, for each weight (0 =
not re-ranked), and the composed image+text baseline beside it. Rule, declared before the
test run: the weight with the best mean context mRR; ties go to the higher concept-only mAP.

A concept-only query ("An image of *", "photos of Fido") asks for the concept's look alone: it
is fused with the photo mean at `concept_only_photo_weight` and its candidates re-ranked by the
photo mean's best crop match at `concept_only_region_weight`. Second grid (concept-only queries;
the other queries do not change with it), rule declared before the test run: the highest mean
concept-only mAP among the points whose concept-only mRR is at least the composed baseline's.

    .venv/bin/python -m app.bench concept-regions --seeds 0,1,2,3 \\
        --out bench/results/pervl_synthetic_concept_regions.json
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from app.bench.metrics import retrieval_metrics
from app.bench.multi import share_fit
from app.bench.runner import METHODS, TUNED_TRAINING, BenchSettings, embed_dataset, pool_regions
from app.bench.service import ServiceRecipe
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.config import SearchSettings
from app.ml.model import ClipBundle

WEIGHTS = (0.0, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0)
ONLY_PHOTO_WEIGHTS = (0.5, 1.0, 2.0)
ONLY_REGION_WEIGHTS = (0.0, 2.0, 4.0, 8.0, 16.0, 32.0)
KINDS = ("context", "concept")
METRICS = ("mrr", "r@1", "map")


def sweep_seed(bundle: ClipBundle, bench_seed: int, split: str = "val") -> dict[str, Any]:
    """Metrics of one-concept queries per weight, and of the composed baseline, on one seed."""
    ds = build_synthetic(split, SyntheticConfig(seed=bench_seed))
    emb = embed_dataset(bundle, ds)
    trained = ServiceRecipe(bundle, "trained", search=SearchSettings(), **TUNED_TRAINING)  # type: ignore[arg-type]
    assert trained.layout is not None
    regions = pool_regions(bundle, ds, emb, trained.layout)  # the default's layout and method
    for cid, concept in ds.concepts.items():
        trained.fit(concept, emb.photos[cid])
    composed = METHODS["composed"](bundle, BenchSettings(lam=bundle.default_lam))
    for cid, concept in ds.concepts.items():
        composed.fit(concept, emb.photos[cid])
    rows: dict[str, Any] = {}
    before = {"concept_only_photo_weight": 0.5, "concept_only_region_weight": 0.0}
    for weight in WEIGHTS:  # concept-only queries as any other one-concept query
        m = ServiceRecipe(
            bundle, f"w{weight:g}",
            search=SearchSettings(concept_region_weight=weight, **before),
            **TUNED_TRAINING,  # type: ignore[arg-type]
        )  # fmt: skip
        share_fit(trained, m)
        m.regions = regions
        rows[f"{weight:g}"] = _metrics(m, ds, emb.pool)
    rows["composed"] = _metrics(composed, ds, emb.pool)
    only: dict[str, Any] = {}
    concept_queries = ds.queries_of("concept")
    for pw in ONLY_PHOTO_WEIGHTS:
        for rw in ONLY_REGION_WEIGHTS:
            search = SearchSettings(concept_only_photo_weight=pw, concept_only_region_weight=rw)
            m = ServiceRecipe(bundle, "o", search=search, **TUNED_TRAINING)  # type: ignore[arg-type]
            share_fit(trained, m)
            m.regions = regions
            r = retrieval_metrics(
                m.score(concept_queries, emb.pool), [q.gt for q in concept_queries]
            )
            only[f"p{pw:g}/r{rw:g}"] = {k: round(r[k], 4) for k in METRICS}
    return {"bench_seed": bench_seed, "split": split, "rows": rows, "concept_only": only}


def _metrics(method: Any, ds: Any, pool: np.ndarray) -> dict[str, dict[str, float]]:
    out = {}
    for kind in KINDS:
        queries = ds.queries_of(kind)
        r = retrieval_metrics(method.score(queries, pool), [q.gt for q in queries])
        out[kind] = {k: round(r[k], 4) for k in METRICS}
    return out


def summarize(seeds: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds per row, and the weight the declared rule picks."""
    names = list(seeds[0]["rows"])
    mean = {
        name: {
            kind: {
                k: round(float(np.mean([s["rows"][name][kind][k] for s in seeds])), 4)
                for k in METRICS
            }
            for kind in KINDS
        }
        for name in names
    }
    weights = [n for n in names if n != "composed"]
    best = max(weights, key=lambda n: (mean[n]["context"]["mrr"], mean[n]["concept"]["map"]))
    grid = list(seeds[0]["concept_only"])
    only = {
        key: {
            k: round(float(np.mean([s["concept_only"][key][k] for s in seeds])), 4) for k in METRICS
        }
        for key in grid
    }
    floor = mean["composed"]["concept"]["mrr"]
    allowed = [key for key in grid if only[key]["mrr"] >= floor] or grid
    pick = max(allowed, key=lambda key: (only[key]["map"], only[key]["mrr"]))
    pw, rw = (float(x[1:]) for x in pick.split("/"))
    return {
        "seeds": len(seeds),
        "mean": mean,
        "concept_only_mean": only,
        "choice": {
            "weight": float(best),
            "concept_only_photo_weight": pw,
            "concept_only_region_weight": rw,
        },
    }
