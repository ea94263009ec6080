"""The validation sweep of app.bench.multi's variants (`python -m app.bench multi`)."""

from __future__ import annotations

from collections.abc import Sequence

from app.bench.methods import Polar
from app.bench.metrics import retrieval_metrics
from app.bench.multi import share_fit
from app.bench.runner import METHODS, BenchSettings, embed_dataset, evaluate
from app.bench.synthetic import SyntheticConfig, build_synthetic
from app.ml.model import DEMO_MODEL_NAME, demo_checkpoint_path, load_clip


def sweep(split: str, names: Sequence[str], bench_seed: int = 0) -> dict[str, object]:
    """polar_tuned and the named variants on one synthetic split, trained once; JSON-ready."""
    bundle = load_clip(DEMO_MODEL_NAME, str(demo_checkpoint_path()), "cpu")
    ds = build_synthetic(split, SyntheticConfig(seed=bench_seed))
    emb = embed_dataset(bundle, ds)
    settings = BenchSettings(lam=0.0)
    tuned = METHODS["polar_tuned"](bundle, settings)
    base = evaluate(tuned, ds, emb)
    assert isinstance(tuned, Polar)
    rows: dict[str, object] = {"polar_tuned": base}
    for name in names:
        method = share_fit(tuned, METHODS[name](bundle, settings))  # type: ignore[arg-type]
        row = {k: retrieval_metrics(method.score(q, emb.pool), [x.gt for x in q])
               for k in ("context", "multi") if (q := ds.queries_of(k))}  # fmt: skip
        rows[name] = row | {"retention": base["retention"]}  # query-time only: same model
    return {"split": split, "bench_seed": bench_seed, "methods": rows}
