"""Run methods on a PerVL dataset: embed the pool once, fit every concept, score every query."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from app.bench.datasets import QUERY_KINDS, PerVLDataset, chunks
from app.bench.methods import (
    Composed,
    Inversion,
    Method,
    Polar,
    PolarPlusImage,
    TextOnly,
)
from app.bench.metrics import caption_recall, retrieval_metrics
from app.bench.multi import MULTI_VARIANTS, PolarMulti
from app.bench.service import ServiceRecipe
from app.bench.variants import selective_trainer
from app.config import SearchSettings, TrainingSettings
from app.ml.encode import encode_images, encode_texts
from app.ml.model import ClipBundle, TrainingRecipe, demo_checkpoint_path, training_recipe
from app.ml.regions import (
    BOTH_KINDS,
    encode_regions_by,
    layout_boxes,
    parse_stored_layout,
    stored_layout,
)
from app.services.training import KEEP_OTHER_TOKENS

IMAGE_CHUNK = 256  # images decoded and embedded at a time


@dataclass(frozen=True)
class BenchSettings:
    """Knobs shared by the methods; recorded in the results JSON."""

    lam: float  # POLAR λ of the default method (the model's calibrated default_lam)
    steps: int = 500  # Adam steps, POLAR and textual inversion alike
    lr: float = 1e-3  # POLAR Adam learning rate (the paper's)
    inversion_lr: float = 1e-3  # textual-inversion Adam learning rate
    fuse_weight: float = 1.0  # photo-mean weight of polar+img
    keep: float = 1.0  # keep-term weight μ of the polar_keep variants (app.bench.variants)
    seed: int = 0  # training seed (template order, A init)


MethodFactory = Callable[[ClipBundle, BenchSettings], Method]


def service_training(recipe: TrainingRecipe, default_lam: float) -> dict[str, object]:
    """Polar's options for the training the service runs on a model with `recipe` under the
    default settings (app.services.training._fit): the keep term with λ 0 when the recipe has
    one, else the paper's objective with the model's λ."""
    service = TrainingSettings()
    opts: dict[str, object] = {
        "lr": recipe.lr,
        "steps": service.steps,
        "token_mode": service.token_mode,
        "lam": default_lam,
    }
    if recipe.keep_weight > 0:
        opts["lam"] = 0.0  # the keep term regularises instead
        opts["trainer"] = selective_trainer(keep=recipe.keep_weight, others=KEEP_OTHER_TOKENS)
    return opts


# The demo model's recipe (its polar.json), chosen on the synthetic *validation* split: POLAR
# with the keep term (app.ml.selective), lr 3e-3 (B needs room to grow once λ no longer pulls it
# back) and a distinct token per concept. The research rows build on it.
DEMO_RECIPE = training_recipe(str(demo_checkpoint_path()))
TUNED_TRAINING: dict[str, object] = service_training(DEMO_RECIPE, 0.0)
# polar_tuned: that training, several concepts by embedding addition, and the query fused with
# the concept photos' mean once (the service's recipe before per-concept parts).
TUNED: dict[str, object] = TUNED_TRAINING | {
    "stack": "embeddings",
    "weight": 0.5,  # photo-mean weight in the query
}
TUNED_SETTINGS = {k: v for k, v in TUNED.items() if k != "trainer"} | {
    "keep": DEMO_RECIPE.keep_weight,
    "others": KEEP_OTHER_TOKENS,
}


def _polar(name: str, cls: type[Polar] = Polar, keep: bool = False, **kw: object) -> MethodFactory:
    def make(b: ClipBundle, s: BenchSettings) -> Method:
        opts = {"lam": s.lam, "steps": s.steps, "lr": s.lr, "seed": s.seed} | kw
        if keep:
            opts["trainer"] = selective_trainer(keep=s.keep)
        if cls is PolarPlusImage:
            opts["weight"] = s.fuse_weight
        return cls(b, name, **opts)  # type: ignore[arg-type]

    return make


METHODS: dict[str, MethodFactory] = {
    "text": lambda b, _s: TextOnly(b, "text"),
    "composed": lambda b, _s: Composed(b, "composed"),
    "inversion": lambda b, s: Inversion(
        b, "inversion", steps=s.steps, lr=s.inversion_lr, seed=s.seed
    ),
    "polar": _polar("polar"),
    "polar_distinct": _polar("polar_distinct", token_mode="distinct"),
    "polar_lam0": _polar("polar_lam0", lam=0.0),
    "polar+img": _polar("polar+img", PolarPlusImage),
    "polar_esum": _polar("polar_esum", stack="embeddings"),
    "polar_keep": _polar("polar_keep", keep=True),
    "polar_keep_distinct": _polar("polar_keep_distinct", keep=True, token_mode="distinct"),
    "polar_tuned": lambda b, s: PolarPlusImage(b, "polar_tuned", seed=s.seed, **TUNED),  # type: ignore[arg-type]
}


def _multi(name: str, opts: dict[str, object]) -> MethodFactory:
    """polar_tuned with one of app.bench.multi's recipes for multi-concept queries."""
    return lambda b, s: PolarMulti(b, name, seed=s.seed, **TUNED, **opts)  # type: ignore[arg-type]


def _service(name: str, search: SearchSettings) -> MethodFactory:
    """The service's training for the model (its recipe) and its query recipe
    (app.services.recipe) under `search`."""
    return lambda b, s: ServiceRecipe(
        b,
        name,
        seed=s.seed,
        search=search,
        **service_training(b.recipe, b.default_lam),  # type: ignore[arg-type]
    )


METHODS |= {name: _multi(name, opts) for name, opts in MULTI_VARIANTS.items()}
# The service without crops (POLAR_SEARCH__REGIONS=none): per-concept parts fused with their
# own photos, plus the plain query for the context.
METHODS["polar_multi_ctx"] = _service("polar_multi_ctx", SearchSettings(regions="none"))
# The service's defaults: the same, then region re-ranking of multi-concept queries.
METHODS["polar_multi_regions"] = _service("polar_multi_regions", SearchSettings())
# The same with one kind of regions only (POLAR_SEARCH__REGION_METHOD): each crop encoded
# on its own, or pooled from the image's one pass.
METHODS["polar_multi_crops"] = _service("polar_multi_crops", SearchSettings(region_method="crops"))
METHODS["polar_multi_pooled"] = _service(
    "polar_multi_pooled", SearchSettings(region_method="pooled")
)
DEFAULT_METHODS = (
    "text",
    "composed",
    "inversion",
    "polar",
    "polar_distinct",
    "polar_lam0",
    "polar_esum",
    "polar_tuned",
    "polar_multi_ctx",
    "polar_multi_crops",
    "polar_multi_pooled",
    "polar_multi_regions",
)
# The service's default (app.services.recipe, the code app/services/search.py runs, and
# app.ml.selective training); "polar" is the paper's recipe through app.ml.
DEFAULT_METHOD = "polar_multi_regions"


def embed_images(bundle: ClipBundle, sources: Sequence[object]) -> np.ndarray:
    """Unit image embeddings, (N, D), decoding at most IMAGE_CHUNK images at a time."""
    parts = [np.zeros((0, bundle.embed_dim), dtype=np.float32)]
    parts += [encode_images(bundle, batch) for batch in chunks(sources, IMAGE_CHUNK)]  # type: ignore[arg-type]
    return np.concatenate(parts)


@dataclass
class Embedded:
    """A dataset's frozen embeddings: computed once, shared by every method."""

    pool: np.ndarray  # (N, D)
    photos: dict[str, np.ndarray]  # concept id -> (n, D)
    captions: np.ndarray | None  # (N, D) base-model caption embeddings
    seconds: float
    # layout -> (N, R, D) crop embeddings of the pool, filled by pool_regions when a method
    # that re-ranks by regions runs (other methods never pay for them)
    regions: dict[str, np.ndarray] = field(default_factory=dict)
    region_seconds: dict[str, float] = field(default_factory=dict)


def embed_dataset(bundle: ClipBundle, ds: PerVLDataset) -> Embedded:
    """Embed the pool, every concept's photos and (base model) every pool caption."""
    start = time.perf_counter()
    pool = embed_images(bundle, ds.pool)
    photos = {cid: embed_images(bundle, c.train) for cid, c in ds.concepts.items()}
    captions = None if ds.captions is None else encode_texts(bundle, ds.captions)
    return Embedded(pool, photos, captions, time.perf_counter() - start)


def pool_regions(bundle: ClipBundle, ds: PerVLDataset, emb: Embedded, key: str) -> np.ndarray:
    """The pool's region embeddings for a stored layout key ("five": crops, "five-pooled":
    pooled from the one pass, "five-both": the two side by side), (N, R_total, D): computed on
    first use, then shared ("five-both" is put together from the other two)."""
    if key not in emb.regions:
        layout, method = parse_stored_layout(key)
        if method == "both":
            kinds = [pool_regions(bundle, ds, emb, stored_layout(layout, k)) for k in BOTH_KINDS]
            emb.regions[key] = np.concatenate(kinds, axis=1)
            emb.region_seconds[key] = sum(
                emb.region_seconds[stored_layout(layout, k)] for k in BOTH_KINDS
            )
            return emb.regions[key]
        start = time.perf_counter()
        boxes = len(layout_boxes(layout))
        parts = [np.zeros((0, boxes, bundle.embed_dim), dtype=np.float32)]
        parts += [
            encode_regions_by(bundle, batch, layout, method)
            for batch in chunks(ds.pool, IMAGE_CHUNK)
        ]
        emb.regions[key] = np.concatenate(parts)
        emb.region_seconds[key] = time.perf_counter() - start
    return emb.regions[key]


def evaluate(method: Method, ds: PerVLDataset, emb: Embedded) -> dict[str, object]:
    """Fit every concept (timed), then metrics per query kind and general-knowledge retention."""
    if isinstance(method, ServiceRecipe) and method.layout is not None:
        method.regions = pool_regions(method.bundle, ds, emb, method.layout)
    seconds = []
    for cid, concept in ds.concepts.items():
        start = time.perf_counter()
        method.fit(concept, emb.photos[cid])
        seconds.append(time.perf_counter() - start)
    out: dict[str, object] = {
        "train_seconds": {"mean": float(np.mean(seconds)), "max": float(np.max(seconds))}
    }
    for kind in QUERY_KINDS:
        queries = ds.queries_of(kind)
        if queries:
            scores = method.score(queries, emb.pool)  # (Q, N)
            out[kind] = retrieval_metrics(scores, [q.gt for q in queries])
    if emb.captions is not None and ds.captions is not None:
        base = caption_recall(emb.captions, emb.pool)
        per_concept = []
        for cid in ds.concepts:
            texts = method.retention_texts(cid, ds.captions)
            per_concept.append(base if texts is None else caption_recall(texts, emb.pool))
        mean = float(np.mean(per_concept))
        out["retention"] = {
            "r@10": mean,
            "base_r@10": base,
            "drop": base - mean,
            "worst_r@10": float(np.min(per_concept)),
        }
    return out


def run_methods(
    bundle: ClipBundle,
    ds: PerVLDataset,
    names: Sequence[str],
    settings: BenchSettings,
    emb: Embedded | None = None,
    factories: dict[str, MethodFactory] | None = None,
) -> dict[str, dict[str, object]]:
    """Metrics of each named method on one dataset."""
    table = factories or METHODS
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {sorted(table)}")
    emb = emb or embed_dataset(bundle, ds)
    return {name: evaluate(table[name](bundle, settings), ds, emb) for name in names}


def settings_dict(settings: BenchSettings) -> dict[str, object]:
    """Settings as plain JSON values."""
    return asdict(settings)
