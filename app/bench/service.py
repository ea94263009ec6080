"""The service's query recipe as a benchmark method: the default row of docs/BENCHMARKS.md.

`ServiceRecipe` trains concepts like any POLAR method (the factory in app.bench.runner passes
the service's training settings) and turns queries into scores with the very functions
`app.services.search` calls (`app.services.recipe`): encode under the concepts' updates, fuse
the photo means, split a multi-concept query into per-concept parts, and re-rank the best
candidates of such a query by crop matches. What the service does with a FAISS top-k the
benchmark does with a ranking of the whole pool: the re-ranked candidates are placed above the
rest in their new order. tests/unit/bench/test_recipe_parity.py checks that both rank alike.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from app.bench.datasets import Query, render
from app.bench.methods import Polar
from app.config import SearchSettings
from app.ml.regions import region_method, split_regions, stored_layout
from app.services import recipe


def is_multi(query: Query) -> bool:
    """Whether a query names two or more distinct concepts."""
    return len(set(query.concepts)) >= 2


def top_candidates(scores: np.ndarray, candidates: int) -> np.ndarray:
    """Indices of the `candidates` best scores, best first; every index when `candidates` is 0
    or at least the pool size."""
    order = np.argsort(-scores, kind="stable")
    return order if candidates <= 0 else order[:candidates]


def place_on_top(scores: np.ndarray, idx: np.ndarray, new: np.ndarray) -> np.ndarray:
    """`scores` with images `idx` re-scored by `new` (their order) and above every other image."""
    out = np.array(scores, dtype=np.float32, copy=True)
    rest = np.ones(len(out), dtype=bool)
    rest[idx] = False
    shift = 0.0
    if rest.any() and len(idx):
        shift = max(0.0, float(out[rest].max()) - float(new.min()) + 1.0)
    out[idx] = new + shift
    return out


@dataclass
class ServiceRecipe(Polar):
    """POLAR adapters queried through app.services.recipe under `search` settings.

    `regions` must hold the (N, R, D) crop embeddings of the pool being scored, for `layout`,
    when the settings re-rank by regions; app.bench.runner.evaluate sets it. Polar's `stack`
    field is not used: `search.stack` decides.
    """

    search: SearchSettings = field(default_factory=SearchSettings)
    regions: np.ndarray | None = field(default=None, repr=False)
    # concept id -> pool indices a person marked "not it": never hits of a query naming the
    # concept (app.services.search.search_images leaves them out); bench/albums.py sets it
    rejected: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> str | None:
        """The stored layout key (app.ml.regions.stored_layout: "five", "five-pooled",
        "five-both") of the regions the re-ranking needs; None when it is off."""
        if self.search.regions == "none":
            return None
        method = region_method(self.bundle, self.search.region_method)
        return stored_layout(self.search.regions, method)

    def photo_mean(self, concept_id: str) -> np.ndarray | None:
        """The concept's photo mean, as the service computes it from the stored photos, (D,)."""
        return recipe.photo_mean(self.photos[concept_id])

    def encodings(
        self, queries: Sequence[Query]
    ) -> tuple[np.ndarray, list[np.ndarray | None], list[bool]]:
        """Each query's vector (Q, D), its parts (K, D) when it is re-ranked by crops, and
        whether it is concept-only."""
        # Queries that name the same concepts share one adapter stack: encode them together.
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[q.concepts].append(i)
        vectors = np.zeros((len(queries), self.bundle.embed_dim), dtype=np.float32)
        parts: list[np.ndarray | None] = [None] * len(queries)
        concept_only = [False] * len(queries)
        for ids, rows in groups.items():
            texts = [render(queries[i].text, [self.phrase(c) for c in ids]) for i in rows]
            named = list(dict.fromkeys(ids))
            vecs, group_parts, only = recipe.encode_batch(
                self.bundle,
                texts,
                [self.adapters[c] for c in named],
                [self.photo_mean(c) for c in named],
                self.search,
            )
            vectors[rows] = vecs
            for n, i in enumerate(rows):
                concept_only[i] = bool(only[n])
                if group_parts is not None:
                    parts[i] = group_parts[n]
        return vectors, parts, concept_only

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        return self.encodings(queries)[0]

    def score(self, queries: Sequence[Query], pool: np.ndarray) -> np.ndarray:
        """Scores over the pool, (Q, N): one vector per query, then the service's re-ranking."""
        vectors, parts, concept_only = self.encodings(queries)
        scores: np.ndarray = vectors @ pool.T  # (Q, N)
        method = region_method(self.bundle, self.search.region_method)
        for i, p in enumerate(parts):
            encoding = recipe.QueryEncoding(vectors[i : i + 1], p, concept_only[i])
            weights = recipe.region_weights(encoding, self.search, method)
            if not weights:
                continue
            assert p is not None
            if self.regions is None or len(self.regions) != len(pool):
                raise ValueError(
                    f"{self.name}: regions of the scored pool ({self.layout!r}) not set"
                )
            by_kind = split_regions(self.regions, self.layout)
            if not by_kind:  # rows of another layout or method would silently match nothing
                raise ValueError(
                    f"{self.name}: the pool's regions ({self.regions.shape[1]} rows per image) "
                    f"are not those of layout {self.layout!r}"
                )
            idx = top_candidates(scores[i], self.search.region_candidates)
            order, new = recipe.rerank(
                scores[i, idx],
                p,
                pool[idx],
                {kind: rows[idx] for kind, rows in by_kind.items()},
                weights,
            )
            scores[i] = place_on_top(scores[i], idx[order], new)
        for i, q in enumerate(queries):
            for concept_id in q.concepts:
                marked = self.rejected.get(concept_id)
                if marked is not None and len(marked):
                    scores[i, marked] = -np.inf  # left out: below every photo
        return scores
