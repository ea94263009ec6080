"""The query recipe: how a query that names concepts becomes a vector and, maybe, a re-ranking.

Pure math on a model bundle, adapters and photo embeddings: no database, no web. The service
(`app.services.search`) and the benchmark's default method (`app.bench.service`) both call it,
so the benchmark's headline row is what the service does
(tests/unit/bench/test_recipe_parity.py). The steps, each chosen on the synthetic PerVL
validation split (bench/results/pervl_synthetic*.json):

1. one concept: the query encoded under the concept's update, fused with its photo mean (with
   more weight when the query asks for the concept alone: "photos of Fido");
2. several concepts (`stack="embeddings"`): one *part* per concept — the query under that
   concept's update alone, fused with that concept's photos — summed, plus the plain query for
   the context; `stack="parameters"` is the paper's exact sum of the updates instead;
3. the best candidates of the one-vector search are re-ranked by where each part best matches a
   crop of the image (`app.ml.regions`): each concept's part for several concepts, the query
   vector itself for one (weight `concept_region_weight`), and for a concept-only query the
   concept's photo mean (weight `concept_only_region_weight`): its look, found anywhere in the
   frame.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from app.config import SearchSettings
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle
from app.ml.regions import method_kinds, rerank_scores_by_kind
from app.ml.train import placeholder_phrase


def unit(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return out


def photo_mean(embeddings: np.ndarray) -> np.ndarray | None:
    """Normalised mean of a concept's normalised photo embeddings (n, D) -> (D,); None if n = 0."""
    if not len(embeddings):
        return None
    return unit(unit(np.asarray(embeddings, dtype=np.float32)).mean(axis=0))


@dataclass(frozen=True)
class QueryEncoding:
    """A query's one search vector and, for several concepts, its per-concept parts."""

    vector: np.ndarray  # (1, D) unit
    # (K, D) unit: concept k's text under its update + photos; for one concept (K = 1) the
    # vector itself, or the concept's photo mean for a concept-only query; None when the
    # query is not re-ranked by crops
    parts: np.ndarray | None = None
    concept_only: bool = False  # it names one concept and asks for nothing else


# Words that ask for no content of their own: "photos of Fido", "show me my Fido".
_FILLER = (
    "a an the of my our your his her their this that these those all any some show me find "
    "photo photos picture pictures pic pics image images shot shots snapshot snapshots"
)
FILLER_WORDS = frozenset(_FILLER.split())
_WORD = re.compile(r"[^\W_]+")


def is_concept_only(text: str, adapters: Sequence[ConceptAdapter]) -> bool:
    """Whether `text` (rewritten: concept names already placeholders) names exactly one concept
    and nothing to look for besides it, so the concept's look is all that matters."""
    if len(adapters) != 1:
        return False
    rest = f" {text.lower()} "
    phrase = f" {placeholder_phrase(adapters[0].token, adapters[0].category).lower()} "
    if phrase not in rest:
        return False
    rest = rest.replace(phrase, " ")
    return all(word in FILLER_WORDS for word in _WORD.findall(rest))


def splits_by_concept(adapters: Sequence[ConceptAdapter], settings: SearchSettings) -> bool:
    """Whether the query is encoded once per concept (and may then be re-ranked by regions)."""
    return len(adapters) >= 2 and settings.stack == "embeddings"


def encode_batch(
    bundle: ClipBundle,
    texts: Sequence[str],
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Texts that name the same concepts, encoded: vectors (Q, D), parts (Q, K, D) or None,
    and which texts are concept-only (Q,) bool.

    `photo_means[k]` is the photo mean (`photo_mean`) of the concept of `adapters[k]`, None when
    it has no photos for this model (one per adapter when the query is split by concept).
    """
    only = np.array([is_concept_only(t, adapters) for t in texts], dtype=bool)
    if splits_by_concept(adapters, settings):
        # Each update fires on its own token, so the query is encoded once per concept, each
        # part fused with its own concept's photos, and the plain query added for the context
        # (synthetic PerVL: two-concept mRR 0.355 -> 0.421 on test, better on 4/4 validation
        # seeds than one global photo mean; bench/results/pervl_synthetic_multi.json).
        parts = []
        for adapter, mean in zip(adapters, photo_means, strict=True):
            part = unit(encode_texts(bundle, texts, [adapter]))  # (Q, D)
            if mean is not None and settings.multi_photo_weight > 0:
                part = unit(part + settings.multi_photo_weight * unit(mean)[None])
            parts.append(part)
        q = unit(np.sum(parts, axis=0))
        if settings.multi_context_weight > 0:
            q = unit(q + settings.multi_context_weight * encode_texts(bundle, texts))
        return q.astype(np.float32), np.stack(parts, axis=1).astype(np.float32), only
    q = encode_texts(bundle, texts, adapters)  # (Q, D); several adapters: the exact sum
    means = [m for m in photo_means if m is not None]
    photos = unit(unit(np.stack(means)).mean(axis=0)) if means else None  # (D,)
    if photos is not None:
        # A concept-only query asks for the concept's look alone: its photos weigh more.
        weight = np.where(only, settings.concept_only_photo_weight, settings.photo_weight)
        q = unit(q + weight[:, None] * photos[None])
    q = q.astype(np.float32)
    if len(adapters) == 1 and (
        settings.concept_region_weight > 0 or settings.concept_only_region_weight > 0
    ):
        # One concept: the query itself is its one part, matched against crops too, so a photo
        # where the concept fills only part of the frame is found (step 3); a concept-only
        # query matches the crops with the concept's photos instead, its look and nothing else.
        single = q[:, None, :].copy()  # (Q, 1, D)
        if photos is not None:
            single[only, 0] = photos
        return q, single, only
    return q, None, only


def encode_query(
    bundle: ClipBundle,
    text: str,
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> QueryEncoding:
    """One query's vector and, when it names several concepts, the part of each."""
    vectors, parts, only = encode_batch(bundle, [text], adapters, photo_means, settings)
    return QueryEncoding(vectors, None if parts is None else parts[0], bool(only[0]))


def region_weights(
    encoding: QueryEncoding, settings: SearchSettings, method: str
) -> dict[str, float]:
    """The weight of each kind of region match ("crops", "pooled", "late") in the query's
    re-ranking score, for the region method that runs (`app.ml.regions.region_method`); {} =
    not re-ranked.

    Several concepts: every kind the method stores, crops at `region_weight`, pooled regions at
    `pooled_region_weight`, late regions at `late_region_weight`. One concept: the crops (the
    pooled regions when they are all there is) at `concept_region_weight`, or
    `concept_only_region_weight` for a concept-only query; late regions re-rank no query naming
    one concept (on polar-demo-vit's validation seeds every weight above 0 lowered its mRR:
    concept-only 0.571 at 0, 0.540 at 1, 0.510 at 4; in context 0.581 at 0, 0.576 at 1;
    bench/vit_late.py).
    """
    if encoding.parts is None or settings.regions == "none":
        return {}
    kinds = method_kinds(method)
    if len(encoding.parts) >= 2:
        per_kind = {
            "crops": settings.region_weight,
            "pooled": settings.pooled_region_weight,
            "late": settings.late_region_weight,
        }
        weights = {kind: per_kind[kind] for kind in kinds}
    else:
        one = (
            settings.concept_only_region_weight
            if encoding.concept_only
            else settings.concept_region_weight
        )
        weights = {} if kinds[0] == "late" else {kinds[0]: one}
    return {kind: w for kind, w in weights.items() if w > 0}


def reranks_by_regions(encoding: QueryEncoding, settings: SearchSettings, method: str) -> bool:
    """Whether the query's best candidates are re-ranked by region matches."""
    return bool(region_weights(encoding, settings, method))


def candidates_to_fetch(want: int, rerank: bool, settings: SearchSettings) -> int:
    """How many hits of the one-vector search the ranking needs."""
    return max(want, settings.region_candidates) if rerank else want


def rerank(
    base: np.ndarray,
    parts: np.ndarray,
    whole: np.ndarray,
    regions: Mapping[str, np.ndarray | Sequence[np.ndarray]],
    weights: Mapping[str, float],
) -> tuple[np.ndarray, np.ndarray]:
    """Candidates re-scored with each part's best region match: (order, scores), best first.

    base (N,) one-vector scores; parts (K, D); whole (N, D); regions[kind][n] (R_n, D) for each
    kind of `weights` (`region_weights`), R_n may be 0 and a kind may be absent (an image
    embedded without those regions is matched on its whole embedding). Ties keep the
    candidates' order.
    """
    scores = rerank_scores_by_kind(base, parts, whole, regions, weights)  # (N,)
    order = np.argsort(-scores, kind="stable")
    return order, scores[order]
