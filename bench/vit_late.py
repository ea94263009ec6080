"""Late-block regions on a ViT image tower (issue 32, item 2): how many of the last blocks each
box must re-run on its own tokens (app.ml.region_late) to match crops' quality.

On polar-demo-vit (4 blocks, 8x8 patches) and the synthetic PerVL benchmark, in the protocol of
bench/vit_regions.py (the service's training and query recipe, concepts trained once per bench
seed and shared by every region method, only the stored regions and the re-ranking change):

  none      no region re-ranking
  crops     each of the five crops encoded on its own (6 forward passes per image)
  late kN   the tower run once; each box re-runs the last N blocks on [CLS + its patch tokens]
            (N = 1 is exactly "pooled", N = 4 a crop of the token grid)
  late kNc  the same, each box with its own CLS token attending only to the box's cells in
            the shared blocks too (N = 0: the shared pass only, no block re-run)

Every late variant at the late weight 8 (the crops' weight) for all query kinds, and for
two-concept queries at weights 4 and 16 too. The rule, declared before the run: the variant
with the best mean validation two-concept mRR; among those within 0.02 of it, the one that
re-runs the fewest blocks (the cost); it is reported on the test split (bench seed 0, as in
bench/vit_regions.py, and seeds 0-3: 80 two-concept queries) with the others. Its weights
(two-concept, one concept in context, concept-only) are then read off the validation sweeps.
The ViT default (FAMILY_METHODS) becomes "late" if, on validation, its two-concept mRR at its
chosen weight is within 0.02 of crops' (at the crops' weight 8) and its context mRR within
0.02 of crops'; else it stays crops. What it costs on ViT-B-32: bench/late_cost.py (the tower)
and bench/index_speed.py (`--methods off,off-onnx,late`, the indexing job).

Prints a table and writes bench/results/pervl_synthetic_vit_late.json. Never run by tests.

    .venv/bin/python bench/vit_late.py                   # ~15 min, 1 core
    .venv/bin/python bench/vit_late.py --seeds 0 --test-seeds ""
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

from app.bench.datasets import chunks  # noqa: E402
from app.bench.harness import loadavg  # noqa: E402
from app.bench.metrics import retrieval_metrics  # noqa: E402
from app.bench.multi import share_fit  # noqa: E402
from app.bench.runner import (  # noqa: E402
    IMAGE_CHUNK,
    embed_dataset,
    pool_regions,
    service_training,
)
from app.bench.service import ServiceRecipe  # noqa: E402
from app.bench.synthetic import SyntheticConfig, build_synthetic  # noqa: E402
from app.config import SearchSettings  # noqa: E402
from app.demo.distill_vit import MODEL_NAME as VIT_NAME  # noqa: E402
from app.demo.distill_vit import assembled_checkpoint  # noqa: E402
from app.ml.model import load_clip  # noqa: E402
from app.ml.region_late import depth, encode_late_regions  # noqa: E402
from app.ml.regions import LAYOUTS  # noqa: E402

OUT = ROOT / "bench" / "results" / "pervl_synthetic_vit_late.json"
KINDS = ("context", "concept", "multi")
WEIGHTS = (4.0, 8.0, 16.0)
MARGIN = 0.02
# (blocks re-run, own CLS); (0, own CLS) is (1, own CLS) (only the CLS row of the last block
# matters; tests/unit/ml/test_region_late.py), (4, own CLS) is (4, none): all blocks re-run
VARIANTS = [(1, False), (1, True), (2, False), (2, True), (3, False), (3, True), (4, False)]
CONCEPT_WEIGHTS = (0.0, 0.5, 1.0, 2.0)  # one concept, context queries (service: 1)
CONCEPT_ONLY_WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0)  # concept-only queries (service: 4)


def name_of(blocks: int, own_cls: bool) -> str:
    return f"late k{blocks}{'c' if own_cls else ''}"


def run_seed(bundle: Any, split: str, seed: int) -> dict[str, Any]:
    started = time.perf_counter()
    ds = build_synthetic(split, SyntheticConfig(seed=seed))
    emb = embed_dataset(bundle, ds)
    crops = pool_regions(bundle, ds, emb, "five")
    pictures = [im for batch in chunks(ds.pool, IMAGE_CHUNK) for im in batch]
    late: dict[str, np.ndarray] = {}
    seconds: dict[str, float] = {"crops": round(emb.region_seconds["five"], 2)}
    for blocks, own in VARIANTS:
        t0 = time.perf_counter()
        late[name_of(blocks, own)] = encode_late_regions(
            bundle, pictures, LAYOUTS["five"], blocks, own
        )[1]
        seconds[name_of(blocks, own)] = round(time.perf_counter() - t0, 2)
    training = service_training(bundle.recipe, bundle.default_lam)
    trained = ServiceRecipe(bundle, "trained", search=SearchSettings(), **training)  # type: ignore[arg-type]
    for cid, concept in ds.concepts.items():
        trained.fit(concept, emb.photos[cid])

    def metrics(search: SearchSettings, regions: np.ndarray | None, kinds: tuple[str, ...]) -> Any:
        m = ServiceRecipe(bundle, "point", search=search, **training)  # type: ignore[arg-type]
        share_fit(trained, m)
        m.regions = regions
        out = {}
        for kind in kinds:
            queries = ds.queries_of(kind)
            got = retrieval_metrics(m.score(queries, emb.pool), [q.gt for q in queries])
            out[kind] = {k: round(float(got[k]), 4) for k in ("mrr", "r@1", "map")}
        return out

    rows = {
        "none": metrics(SearchSettings(regions="none"), None, KINDS),
        "crops": metrics(SearchSettings(region_method="crops"), crops, KINDS),
    }
    sweep = {}
    for name, regions in late.items():
        rows[name] = metrics(SearchSettings(region_method="late"), regions, KINDS)
        for w in WEIGHTS:
            search = SearchSettings(region_method="late", late_region_weight=w)
            sweep[f"{name} / weight {w:g}"] = metrics(search, regions, ("multi",))["multi"]["mrr"]
    one = {}  # one concept, each variant: the weights that re-rank those queries
    for name, regions in late.items():
        for w in CONCEPT_WEIGHTS:
            search = SearchSettings(region_method="late", concept_region_weight=w)
            one[f"{name} / context / weight {w:g}"] = metrics(search, regions, ("context",))[
                "context"
            ]["mrr"]
        for w in CONCEPT_ONLY_WEIGHTS:
            search = SearchSettings(region_method="late", concept_only_region_weight=w)
            got = metrics(search, regions, ("concept",))["concept"]
            one[f"{name} / concept / weight {w:g}"] = [got["mrr"], got["map"]]
    return {
        "split": split,
        "bench_seed": seed,
        "methods": rows,
        "multi_weight_sweep": sweep,
        "one_concept_sweep": one,
        "region_embed_seconds": seconds,
        "seconds": round(time.perf_counter() - started, 1),
        "load": loadavg(),
    }


def mean_rows(runs: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        method: {
            kind: {
                k: round(float(np.mean([r["methods"][method][kind][k] for r in runs])), 4)
                for k in ("mrr", "r@1", "map")
            }
            for kind in KINDS
        }
        for method in runs[0]["methods"]
    }


def _mean_sweep(runs: list[dict[str, Any]], key: str) -> dict[str, Any]:
    """The mean over seeds of a sweep's values (numbers, or lists of numbers)."""
    return {
        k: np.round(np.mean([r[key][k] for r in runs], axis=0), 4).tolist() for k in runs[0][key]
    }


def decide(mean: dict[str, Any]) -> dict[str, Any]:
    """The declared rule: the best late variant on two-concept mRR, or the one re-running the
    fewest blocks among those within MARGIN of it."""
    names = [name_of(b, o) for b, o in VARIANTS]
    best = max(mean[n]["multi"]["mrr"] for n in names)
    near = [(b, o) for b, o in VARIANTS if mean[name_of(b, o)]["multi"]["mrr"] >= best - MARGIN]
    blocks, own = min(near, key=lambda v: (v[0], mean[name_of(*v)]["multi"]["mrr"] * -1))
    return {"variant": name_of(blocks, own), "blocks": blocks, "own_cls": own, "best_mrr": best}


def table(title: str, mean: dict[str, Any]) -> list[str]:
    lines = [
        f"{title:<28}{'context mRR':>12}{'R@1':>6}{'concept mRR':>12}{'mAP':>7}{'two-concept':>12}"
    ]
    for method, r in mean.items():
        lines.append(
            f"  {method:<26}{r['context']['mrr']:>12.3f}{r['context']['r@1']:>6.2f}"
            f"{r['concept']['mrr']:>12.3f}{r['concept']['map']:>7.3f}{r['multi']['mrr']:>12.3f}"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="validation bench seeds")
    parser.add_argument("--test-seeds", default="0,1,2,3", help="test bench seeds ('' = none)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    bundle = load_clip(VIT_NAME, str(assembled_checkpoint()), "cpu")
    print(f"{bundle.fingerprint.model_id}: {depth(bundle)} blocks", flush=True)
    val = []
    for seed in [int(s) for s in args.seeds.split(",") if s]:
        val.append(run_seed(bundle, "val", seed))
        print(f"  val seed {seed}: {val[-1]['seconds']}s", flush=True)
    result: dict[str, Any] = {
        "benchmark": "pervl synthetic: late-block regions on a ViT image tower (issue 32, item 2)",
        "command": "python bench/vit_late.py " + " ".join(argv or sys.argv[1:]),
        "rule": f"the late variant with the best mean validation two-concept mRR; among those "
        f"within {MARGIN} of it, the one re-running the fewest blocks",
        "model_id": bundle.fingerprint.model_id,
        "blocks": depth(bundle),
        "environment": {"python": platform.python_version(), "torch": torch.__version__,
                        "threads": 1},
    }  # fmt: skip
    lines: list[str] = []
    if val:
        mean = mean_rows(val)
        result["validation_mean"] = mean
        result["validation_multi_weight_sweep"] = _mean_sweep(val, "multi_weight_sweep")
        result["validation_one_concept_sweep"] = _mean_sweep(val, "one_concept_sweep")
        result["decision"] = decide(mean)
        lines += table(f"validation ({len(val)} seeds)", mean)
        lines.append(f"  rule: {result['decision']}")
        for key in ("validation_multi_weight_sweep", "validation_one_concept_sweep"):
            lines += [f"  {k}: {v}" for k, v in result[key].items()]
    tests = [run_seed(bundle, "test", int(s)) for s in args.test_seeds.split(",") if s]
    if tests:
        result["test_mean"] = mean_rows(tests)
        result["test_multi_weight_sweep"] = _mean_sweep(tests, "multi_weight_sweep")
        lines += table("test (seed 0)", mean_rows(tests[:1]))
        lines += table(f"test ({len(tests)} seeds)", result["test_mean"])
    result["test"] = tests
    result["validation"] = val
    result["seconds"] = round(time.perf_counter() - started, 1)
    print("\n".join(lines), flush=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
