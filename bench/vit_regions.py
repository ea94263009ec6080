"""Region quality on a ViT image tower (issue 32, item 1): crops vs pooled vs both.

The demo model's image tower is a ModifiedResNet whose last feature map is 2x2 cells; regions
pooled from it can say little about where an object stands. polar-demo-vit (app.demo.distill_vit)
is the same model with a ViT image tower on an 8x8 patch grid, distilled from the demo model's.
On the synthetic PerVL benchmark (the service's training and query recipe, app.bench.service),
concepts are trained once per model and bench seed and shared by every region method; only the
stored regions and the re-ranking change:

  none    no region re-ranking (POLAR_SEARCH__REGIONS=none)
  crops   each of the five crops encoded on its own (6 forward passes per image)
  pooled  the five boxes pooled from the image's one pass (app.ml.region_pool)
  both    crops and pooled regions side by side (the cost of crops)

at the service's default weights; and, for two-concept queries, each single kind at weights
4-64 (is the default weight what holds a kind back?). The rule, declared before the run: on
the validation seeds, the ViT default becomes "pooled" unless its mean two-concept or context
mRR is more than 0.02 below the best of crops and both (20 two-concept and 60 context queries
per seed: closer than that is a rank or two in a handful of queries); otherwise the best.
The test split (bench seed 0) is scored once with every method.

Prints a table and writes bench/results/pervl_synthetic_vit_regions.json. Never run by tests.

    .venv/bin/python bench/vit_regions.py                       # ViT and demo, ~25 min, 1 core
    .venv/bin/python bench/vit_regions.py --models vit --seeds 0
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app.bench.harness import loadavg  # noqa: E402
from app.bench.metrics import retrieval_metrics  # noqa: E402
from app.bench.multi import share_fit  # noqa: E402
from app.bench.runner import embed_dataset, pool_regions, service_training  # noqa: E402
from app.bench.service import ServiceRecipe  # noqa: E402
from app.bench.synthetic import SyntheticConfig, build_synthetic  # noqa: E402
from app.config import SearchSettings  # noqa: E402
from app.demo.distill_vit import MODEL_NAME as VIT_NAME  # noqa: E402
from app.demo.distill_vit import assembled_checkpoint  # noqa: E402
from app.ml.model import DEMO_MODEL_NAME, ClipBundle, demo_checkpoint_path, load_clip  # noqa: E402
from app.ml.region_pool import tower_family  # noqa: E402

OUT = ROOT / "bench" / "results" / "pervl_synthetic_vit_regions.json"
METHODS = ("none", "crops", "pooled", "both")
KINDS = ("context", "concept", "multi")
WEIGHTS = (4.0, 8.0, 16.0, 32.0, 64.0)
MARGIN = 0.02


def load(model: str) -> ClipBundle:
    if model == "vit":
        return load_clip(VIT_NAME, str(assembled_checkpoint()), "cpu")
    return load_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), "cpu")


def settings_of(method: str, **weights: float) -> SearchSettings:
    if method == "none":
        return SearchSettings(regions="none")
    return SearchSettings(region_method=method, **weights)  # type: ignore[arg-type]


def run_seed(bundle: ClipBundle, split: str, seed: int) -> dict[str, Any]:
    """Every region method's metrics on one split and bench seed, concepts trained once."""
    started = time.perf_counter()
    ds = build_synthetic(split, SyntheticConfig(seed=seed))
    emb = embed_dataset(bundle, ds)
    regions = {
        m: pool_regions(bundle, ds, emb, key)
        for m, key in (("crops", "five"), ("pooled", "five-pooled"), ("both", "five-both"))
    }
    training = service_training(bundle.recipe, bundle.default_lam)
    trained = ServiceRecipe(bundle, "trained", search=SearchSettings(), **training)  # type: ignore[arg-type]
    for cid, concept in ds.concepts.items():
        trained.fit(concept, emb.photos[cid])

    def metrics(search: SearchSettings, method: str, kinds: tuple[str, ...]) -> dict[str, Any]:
        m = ServiceRecipe(bundle, "point", search=search, **training)  # type: ignore[arg-type]
        share_fit(trained, m)
        m.regions = regions.get(method)
        out = {}
        for kind in kinds:
            queries = ds.queries_of(kind)
            got = retrieval_metrics(m.score(queries, emb.pool), [q.gt for q in queries])
            out[kind] = {k: round(float(got[k]), 4) for k in ("mrr", "r@1", "map")}
        return out

    rows = {method: metrics(settings_of(method), method, KINDS) for method in METHODS}
    sweep = {
        f"{kind} / weight {w:g}": metrics(
            settings_of(
                kind, **{"region_weight" if kind == "crops" else "pooled_region_weight": w}
            ),
            kind,
            ("multi",),
        )["multi"]["mrr"]
        for kind in ("crops", "pooled")
        for w in WEIGHTS
    }
    return {
        "split": split,
        "bench_seed": seed,
        "methods": rows,
        "multi_weight_sweep": sweep,
        "region_embed_seconds": {k: round(v, 2) for k, v in emb.region_seconds.items()},
        "embed_seconds": round(emb.seconds, 2),
        "seconds": round(time.perf_counter() - started, 1),
        "load": loadavg(),
    }


def mean_rows(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    return {
        method: {
            kind: {
                k: round(float(np.mean([r["methods"][method][kind][k] for r in runs])), 4)
                for k in ("mrr", "r@1", "map")
            }
            for kind in KINDS
        }
        for method in METHODS
    }


def decide(mean: dict[str, dict[str, dict[str, float]]]) -> dict[str, Any]:
    """The declared rule: pooled unless more than MARGIN below the best of crops and both on
    two-concept or context mRR; else the best of the three on two-concept mRR."""
    gaps = {
        kind: round(
            max(mean[m][kind]["mrr"] for m in ("crops", "both")) - mean["pooled"][kind]["mrr"], 4
        )
        for kind in ("multi", "context")
    }
    if all(g <= MARGIN for g in gaps.values()):
        return {"method": "pooled", "gaps_below_best": gaps}
    best = max(("crops", "pooled", "both"), key=lambda m: mean[m]["multi"]["mrr"])
    return {"method": best, "gaps_below_best": gaps}


def table(name: str, mean: dict[str, dict[str, dict[str, float]]]) -> list[str]:
    lines = [
        f"{name:<28}{'context mRR':>12}{'R@1':>6}{'concept mRR':>12}{'mAP':>7}{'two-concept':>12}"
    ]
    for method in METHODS:
        r = mean[method]
        lines.append(
            f"  {method:<26}{r['context']['mrr']:>12.3f}{r['context']['r@1']:>6.2f}"
            f"{r['concept']['mrr']:>12.3f}{r['concept']['map']:>7.3f}{r['multi']['mrr']:>12.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vit,demo", help="vit and/or demo")
    parser.add_argument("--seeds", default="0,1,2,3", help="validation bench seeds")
    parser.add_argument("--test", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    started = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "pervl synthetic: region methods on a ViT image tower (issue 32, item 1)",
        "command": "python bench/vit_regions.py " + " ".join(argv or sys.argv[1:]),
        "rule": f"ViT default: pooled unless its mean validation two-concept or context mRR is "
        f"more than {MARGIN} below the best of crops and both; else the best on two-concept mRR",
        "models": {},
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": 1, "load_before": loadavg()},
    }  # fmt: skip
    lines: list[str] = []
    for model in args.models.split(","):
        bundle = load(model)
        print(f"{model}: {bundle.fingerprint.model_id}, family {tower_family(bundle)}", flush=True)
        val = []
        for seed in seeds:
            val.append(run_seed(bundle, "val", seed))
            print(f"  val seed {seed}: {val[-1]['seconds']}s", flush=True)
        test = run_seed(bundle, "test", 0) if args.test else None
        entry: dict[str, Any] = {
            "model_id": bundle.fingerprint.model_id,
            "family": tower_family(bundle),
            "grid": list(getattr(bundle.model.visual, "grid_size", ()) or ()),
            "default_lam": bundle.default_lam,
        }
        if val:
            entry["validation_mean"] = mean_rows(val)
            entry["validation_multi_weight_sweep"] = {
                k: round(float(np.mean([r["multi_weight_sweep"][k] for r in val])), 4)
                for k in val[0]["multi_weight_sweep"]
            }
            entry["decision"] = decide(entry["validation_mean"])
            lines += table(f"{model} validation ({len(val)} seeds)", entry["validation_mean"])
            lines.append(f"  rule: {entry['decision']}")
        if test is not None:
            entry["test"] = test
            lines += table(f"{model} test (seed 0)", mean_rows([test]))
        entry["validation"] = val
        result["models"][model] = entry
        print("\n".join(lines), flush=True)
    result["environment"]["load_after"] = loadavg()
    result["seconds"] = round(time.perf_counter() - started, 1)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
