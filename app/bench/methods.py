"""The compared methods: each learns concepts from photo embeddings and embeds `*` queries.

text-only      the category word instead of the concept ("a ball on the beach")
composed       normalised mean of the concept photos' embeddings + the text-only query embedding
inversion      textual inversion: a learned input embedding for the placeholder token
polar          POLAR (app.ml): rank-1 V update per concept, several concepts summed
polar+img      POLAR query embedding fused with the photos' mean embedding (query-time only)
(research variants of POLAR's training live in app.bench.variants)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from app.bench.datasets import Concept, Query, render
from app.bench.inversion import encode_with_vectors, token_id, train_inversion
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_texts
from app.ml.model import ClipBundle
from app.ml.train import pick_concept_token, placeholder_phrase, train_adapter

Trainer = Callable[..., ConceptAdapter]  # train_adapter's signature


def normalize(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm."""
    unit: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    return unit


def category_word(concept: Concept) -> str:
    """What a query says instead of the concept when the method knows nothing about it."""
    return concept.category or "object"


@dataclass
class Method(ABC):
    """A retrieval method: fit concepts one at a time, then embed queries that name them."""

    bundle: ClipBundle
    name: str
    concepts: dict[str, Concept] = field(default_factory=dict)
    photos: dict[str, np.ndarray] = field(default_factory=dict)  # id -> (n, D) unit rows

    def fit(self, concept: Concept, photos: np.ndarray) -> None:
        """Learn one concept from its photos' embeddings, (n, D)."""
        self.concepts[concept.id] = concept
        self.photos[concept.id] = photos
        self._fit(concept, photos)

    def _fit(self, concept: Concept, photos: np.ndarray) -> None:  # noqa: B027 (optional hook)
        """Per-method learning (nothing for training-free methods)."""

    @abstractmethod
    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        """Unit query embeddings, (Q, D)."""

    def score(self, queries: Sequence[Query], pool: np.ndarray) -> np.ndarray:
        """Scores of every pool image (N, D) for each query, (Q, N): one vector per query here."""
        scores: np.ndarray = self.encode(queries) @ pool.T
        return scores

    def retention_texts(
        self,
        concept_id: str,  # noqa: ARG002 (the no-op default; overrides use it)
        texts: Sequence[str],  # noqa: ARG002 (likewise)
    ) -> np.ndarray | None:
        """Embeddings of concept-free texts with this concept learned; None = model unchanged."""
        return None

    def concept_photo_mean(self, ids: Sequence[str]) -> np.ndarray:
        """Normalised mean over the named concepts of each one's normalised photo mean, (D,)."""
        means = normalize(np.stack([self.photos[c].mean(axis=0) for c in ids]))  # (K, D)
        return normalize(means.mean(axis=0))


@dataclass
class TextOnly(Method):
    """The base model with the category word in place of the concept."""

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        texts = [
            render(q.text, [category_word(self.concepts[c]) for c in q.concepts]) for q in queries
        ]
        return encode_texts(self.bundle, texts)


@dataclass
class Composed(TextOnly):
    """Normalised photo mean plus the text-only query embedding (a strong baseline)."""

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        text = super().encode(queries)  # (Q, D)
        image = np.stack([self.concept_photo_mean(q.concepts) for q in queries])  # (Q, D)
        return normalize(image + text)


@dataclass
class Inversion(Method):
    """Textual inversion with the frozen text tower; a distinct token per concept."""

    steps: int = 500
    lr: float = 1e-3
    seed: int = 0
    tokens: dict[str, str] = field(default_factory=dict)
    vectors: dict[int, torch.Tensor] = field(default_factory=dict)

    def _fit(self, concept: Concept, photos: np.ndarray) -> None:
        token = pick_concept_token(self.bundle, set(self.tokens.values()), "distinct")
        self.tokens[concept.id] = token
        vec = train_inversion(
            self.bundle, torch.from_numpy(photos), token, concept.category,
            steps=self.steps, lr=self.lr, seed=self.seed,
        )  # fmt: skip
        self.vectors[token_id(self.bundle, token)] = vec

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        texts = [
            render(
                q.text,
                [placeholder_phrase(self.tokens[c], self.concepts[c].category) for c in q.concepts],
            )
            for q in queries
        ]
        return encode_with_vectors(self.bundle, texts, self.vectors)


@dataclass
class Polar(Method):
    """POLAR through app.ml: train_adapter per concept, encode_texts with the stacked adapters."""

    lam: float = 0.1
    token_mode: str = "shared"  # "shared" (sks) or "distinct" (a rare token per concept)
    steps: int = 500
    lr: float = 1e-3
    seed: int = 0
    trainer: Trainer = train_adapter  # research variants plug in their own trainer here
    # Several concepts: "params" = V + Σ_k B_k Â_k (the paper, app.ml); "embeddings" = the query
    # encoded under each concept's update alone, embeddings summed (a research alternative).
    stack: str = "params"
    adapters: dict[str, ConceptAdapter] = field(default_factory=dict)

    def _fit(self, concept: Concept, photos: np.ndarray) -> None:
        taken = {a.token for a in self.adapters.values()}
        token = pick_concept_token(self.bundle, taken, self.token_mode)
        self.adapters[concept.id] = self.trainer(
            self.bundle, torch.from_numpy(photos), token, concept.category,
            lam=self.lam, steps=self.steps, lr=self.lr, seed=self.seed,
        )  # fmt: skip

    def phrase(self, concept_id: str) -> str:
        """How queries name this concept ("sks ball")."""
        ad = self.adapters[concept_id]
        return placeholder_phrase(ad.token, ad.category)

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        # Queries that name the same concepts share one adapter stack: encode them together.
        groups: dict[tuple[str, ...], list[int]] = defaultdict(list)
        for i, q in enumerate(queries):
            groups[q.concepts].append(i)
        out = np.zeros((len(queries), self.bundle.embed_dim), dtype=np.float32)
        for ids, rows in groups.items():
            texts = [render(queries[i].text, [self.phrase(c) for c in ids]) for i in rows]
            adapters = [self.adapters[c] for c in dict.fromkeys(ids)]
            if self.stack == "params" or len(adapters) == 1:
                out[rows] = encode_texts(self.bundle, texts, adapters)
            else:
                parts = [encode_texts(self.bundle, texts, [ad]) for ad in adapters]
                out[rows] = normalize(np.sum(parts, axis=0))
        return out

    def retention_texts(self, concept_id: str, texts: Sequence[str]) -> np.ndarray | None:
        return encode_texts(self.bundle, texts, [self.adapters[concept_id]])


@dataclass
class PolarPlusImage(Polar):
    """POLAR's query embedding plus `weight` × the photos' normalised mean, renormalised."""

    weight: float = 1.0

    def encode(self, queries: Sequence[Query]) -> np.ndarray:
        text = super().encode(queries)
        image = np.stack([self.concept_photo_mean(q.concepts) for q in queries])
        return normalize(text + self.weight * image)
