"""Two-concept queries on the synthetic validation split: the service's fusion weights and its
re-ranking weight, checked again for the current demo model.

For each validation bench seed the concepts are trained once with the service's training
(app.bench.runner.TUNED_TRAINING) and shared by every grid point (app.bench.multi.share_fit);
only query-time settings change, so context mRR and retention are those of the default.

  fusion   POLAR_SEARCH__MULTI_PHOTO_WEIGHT x POLAR_SEARCH__MULTI_CONTEXT_WEIGHT, crops at
           the default region weight (8);
  regions  crops against regions pooled from the one pass (POLAR_SEARCH__REGION_METHOD),
           each at region weights 8-64, default fusion;
  mixed    a prototype the service does not offer: both kinds of regions stored, the top 200
           re-ranked by base + wc x crop match + wp x pooled match (app.ml.regions.rerank_scores
           once per kind), default fusion.

Prints the mean two-concept mRR over seeds per point, best first, and writes
bench/results/pervl_synthetic_fusion.json. Never run by the tests.

    .venv/bin/python bench/fusion_sweep.py                 # about 5 minutes on one core
    .venv/bin/python bench/fusion_sweep.py --seeds 0       # one seed
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.bench.metrics import retrieval_metrics  # noqa: E402
from app.bench.multi import share_fit  # noqa: E402
from app.bench.runner import TUNED_TRAINING, embed_dataset, pool_regions  # noqa: E402
from app.bench.service import ServiceRecipe, place_on_top, top_candidates  # noqa: E402
from app.bench.synthetic import SyntheticConfig, build_synthetic  # noqa: E402
from app.config import SearchSettings  # noqa: E402
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path, load_clip  # noqa: E402
from app.ml.regions import rerank_scores  # noqa: E402

PHOTO_WEIGHTS = (0.5, 1.0, 2.0, 4.0)
CONTEXT_WEIGHTS = (0.0, 0.5, 1.0, 2.0)
REGION_WEIGHTS = (8.0, 16.0, 32.0, 64.0)
MIXED_WEIGHTS = ((2.0, 8.0), (4.0, 4.0), (4.0, 8.0), (8.0, 8.0))  # (crops, pooled)
OUT = ROOT / "bench" / "results" / "pervl_synthetic_fusion.json"


def sweep_seed(bundle: Any, seed: int) -> dict[str, dict[str, float]]:
    """Two-concept mRR per grid point (and context mRR per region method) on one seed."""
    ds = build_synthetic("val", SyntheticConfig(seed=seed))
    emb = embed_dataset(bundle, ds)
    layouts = {"crops": pool_regions(bundle, ds, emb, "five")}
    layouts["pooled"] = pool_regions(bundle, ds, emb, "five-pooled")
    trained = ServiceRecipe(bundle, "trained", search=SearchSettings(), **TUNED_TRAINING)  # type: ignore[arg-type]
    for cid, concept in ds.concepts.items():
        trained.fit(concept, emb.photos[cid])

    def mrr(search: SearchSettings, regions: np.ndarray, kind: str) -> float:
        m = ServiceRecipe(bundle, "point", search=search, **TUNED_TRAINING)  # type: ignore[arg-type]
        share_fit(trained, m)
        m.regions = regions
        queries = ds.queries_of(kind)
        scores = m.score(queries, emb.pool)
        return round(float(retrieval_metrics(scores, [q.gt for q in queries])["mrr"]), 4)

    fusion = {
        f"photo {pw:g} / context {cw:g}": mrr(
            SearchSettings(multi_photo_weight=pw, multi_context_weight=cw),
            layouts["crops"],
            "multi",
        )
        for pw in PHOTO_WEIGHTS
        for cw in CONTEXT_WEIGHTS
    }
    regions = {
        f"{name} / weight {w:g}": mrr(SearchSettings(region_weight=w), layouts[name], "multi")
        for name in layouts
        for w in REGION_WEIGHTS
    }
    context = {
        name: mrr(SearchSettings(region_method=name), layouts[name], "context") for name in layouts
    }
    queries = ds.queries_of("multi")
    vectors, parts, _ = trained.encodings(queries)
    base = vectors @ emb.pool.T  # (Q, N)
    mixed = {}
    for wc, wp in MIXED_WEIGHTS:
        scores = base.copy()
        for i, part in enumerate(parts):
            assert part is not None
            idx = top_candidates(base[i], SearchSettings().region_candidates)
            b, whole = base[i, idx], emb.pool[idx]
            new = rerank_scores(b, part, whole, layouts["crops"][idx], wc)
            new += rerank_scores(b, part, whole, layouts["pooled"][idx], wp) - b
            scores[i] = place_on_top(base[i], idx, new)
        r = retrieval_metrics(scores, [q.gt for q in queries])["mrr"]
        mixed[f"crops {wc:g} + pooled {wp:g}"] = round(float(r), 4)
    return {"fusion": fusion, "regions": regions, "mixed": mixed, "context": context}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="validation bench seeds")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    bundle = load_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), "cpu")
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.perf_counter()
    per_seed = {seed: sweep_seed(bundle, seed) for seed in seeds}
    first = per_seed[seeds[0]]
    mean = {
        grid: {k: round(float(np.mean([per_seed[s][grid][k] for s in seeds])), 4) for k in rows}
        for grid, rows in first.items()
    }
    default = SearchSettings()
    default_key = f"photo {default.multi_photo_weight:g} / context {default.multi_context_weight:g}"
    for grid in ("fusion", "regions", "mixed"):
        print(f"\n{grid}: mean two-concept mRR over validation seeds {seeds}")
        for key, value in sorted(mean[grid].items(), key=lambda kv: -kv[1]):
            mark = (
                "  (default)"
                if key in (default_key, f"crops / weight {default.region_weight:g}")
                else ""
            )
            print(f"  {key:28s} {value:.4f}{mark}")
    print(f"\ncontext mRR: {mean['context']}")
    result = {
        "benchmark": "pervl synthetic/val, two-concept queries: fusion and re-ranking weights",
        "model": bundle.fingerprint.model_id,
        "command": "python bench/fusion_sweep.py --seeds " + args.seeds,
        "seeds": seeds,
        "default": {"fusion": default_key, "regions": f"crops / weight {default.region_weight:g}"},
        "mean": mean,
        "per_seed": per_seed,
        "seconds": round(time.perf_counter() - start, 1),
    }
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
