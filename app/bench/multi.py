"""Query-time variants for queries that name several concepts (issue 7's two-concept gap).

All of them start from the tuned POLAR (keep-term adapters, distinct tokens) and change only
how a multi-concept query becomes scores; single-concept queries are encoded exactly as
polar_tuned does, so context mRR and retention stay those of polar_tuned.

partial   the query encoded once per concept under that concept's update alone; "both" keeps
          every placeholder, "catother" swaps the other concepts' phrases for their category word
fuse      "global": + w x the normalised mean of the concepts' photo means, once, after summing;
          "per": each partial gets its own concept's photo mean before summing
context   + c x the query with every placeholder and no update (the base model's reading)
score     "sum": one vector (the partials summed); "min"/"softmin": soft-AND over the partials,
          so an image must match every concept (several FAISS searches in a product)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from app.bench.datasets import Query, render
from app.bench.methods import Polar, PolarPlusImage, category_word, normalize
from app.ml.encode import encode_texts


@dataclass
class PolarMulti(PolarPlusImage):
    """Tuned POLAR with a configurable recipe for queries that name two or more concepts."""

    partial: str = "both"  # "both" | "catother"
    fuse: str = "global"  # "global" | "per"
    multi_weight: float = 0.5  # photo-mean weight w for multi-concept queries
    context: float = 0.0  # weight c of the base-model query with every placeholder
    score_mode: str = "sum"  # "sum" | "min" | "softmin"
    tau: float = 0.05  # softmin temperature

    def partials(self, query: Query) -> np.ndarray:
        """One unit embedding per distinct concept, each under its own update only, (K, D)."""
        ids = list(dict.fromkeys(query.concepts))
        rows = []
        for c in ids:
            phrases = [
                self.phrase(x) if self.partial == "both" or x == c else self.category(x)
                for x in query.concepts
            ]
            rows.append(
                encode_texts(self.bundle, [render(query.text, phrases)], [self.adapters[c]])
            )
        return np.concatenate(rows)

    def category(self, concept_id: str) -> str:
        """The concept's coarse category word (what text-only search would say)."""
        return category_word(self.concepts[concept_id])

    def fused_partials(self, query: Query) -> np.ndarray:
        """Partials with their own concept's photo mean when fusing per concept, (K, D)."""
        parts = self.partials(query)  # (K, D)
        if self.fuse != "per":
            return parts
        means = normalize(
            np.stack([self.photos[c].mean(axis=0) for c in dict.fromkeys(query.concepts)])
        )  # (K, D)
        return normalize(parts + self.multi_weight * means)

    def multi_vector(self, query: Query) -> np.ndarray:
        """The single query vector of the "sum" recipe, (D,)."""
        q = normalize(self.fused_partials(query).sum(axis=0))
        if self.context:
            plain = encode_texts(
                self.bundle, [render(query.text, [self.phrase(c) for c in query.concepts])]
            )[0]
            q = normalize(q + self.context * plain)
        if self.fuse == "global":
            q = normalize(q + self.multi_weight * self.concept_photo_mean(query.concepts))
        return q

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        out = np.zeros((len(queries), self.bundle.embed_dim), dtype=np.float32)
        single = [i for i, q in enumerate(queries) if len(set(q.concepts)) == 1]
        if single:
            out[single] = super().encode([queries[i] for i in single])
        for i, q in enumerate(queries):
            if i not in single:
                out[i] = self.multi_vector(q)
        return out

    def score(self, queries: Sequence[Query], pool: np.ndarray) -> np.ndarray:
        """Scores over the pool, (Q, N); soft-AND modes score multi queries per partial."""
        scores: np.ndarray = self.encode(queries) @ pool.T  # (Q, N)
        if self.score_mode == "sum":
            return scores
        for i, q in enumerate(queries):
            if len(set(q.concepts)) > 1:
                sims = self.fused_partials(q) @ pool.T  # (K, N)
                scores[i] = soft_and(sims, self.score_mode, self.tau)
        return scores


def soft_and(sims: np.ndarray, mode: str, tau: float) -> np.ndarray:
    """Combine per-concept similarities (K, N) into one score per image that needs them all."""
    if mode == "min":
        lowest: np.ndarray = sims.min(axis=0)
        return lowest
    if mode == "softmin":
        # -τ·log Σ exp(-s/τ): tends to min as τ → 0, to mean - τ·log K as τ grows
        low = sims.min(axis=0)
        soft: np.ndarray = low - tau * np.log(np.exp(-(sims - low) / tau).sum(axis=0))
        return soft
    raise ValueError(f"unknown soft-AND mode {mode!r}; use min or softmin")


# Registered in app.bench.runner.METHODS as polar_tuned plus these options. The option chosen
# on val (fuse "per", multi_weight 1, context 1) is the service's recipe: polar_multi_ctx, which
# runs app.services.recipe itself (app.bench.service).
MULTI_VARIANTS: dict[str, dict[str, object]] = {
    "polar_multi_w25": {"multi_weight": 0.25},
    "polar_multi_per25": {"fuse": "per", "multi_weight": 0.25},
    "polar_multi_per50_min": {"fuse": "per", "multi_weight": 0.5, "score_mode": "min"},
    "polar_multi_per25_softmin": {"fuse": "per", "multi_weight": 0.25, "score_mode": "softmin"},
    "polar_multi_catother_min": {
        "partial": "catother",
        "fuse": "per",
        "multi_weight": 0.25,
        "score_mode": "min",
    },
}


def share_fit(source: Polar, target: Polar) -> Polar:
    """Give `target` the concepts fitted by `source` (query-time variants need no retraining)."""
    target.concepts, target.photos, target.adapters = (
        source.concepts,
        source.photos,
        source.adapters,
    )
    return target
