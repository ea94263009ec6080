"""Search a user's library: rewrite concept names, stack their adapters, encode, rank."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from app.config import LimitSettings, SearchSettings
from app.errors import NotFound, QueryTooLong, ValidationFailed
from app.ml.adapter import ConceptAdapter
from app.ml.encode import count_tokens, encode_texts
from app.ml.model import AdapterMismatchError
from app.ml.regions import rerank_scores, unpack_regions
from app.ml.train import placeholder_phrase
from app.models import Adapter, Concept, ConceptExample, Image
from app.services.index import IndexCache
from app.services.model import ServingModel
from app.services.query import NamedConcept, rewrite_query


@dataclass(frozen=True)
class SearchFilters:
    """Restrict hits to images matching all given conditions."""

    created_after: datetime | None = None
    created_before: datetime | None = None
    mime: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(self.created_after or self.created_before or self.mime)


@dataclass(frozen=True)
class AppliedConcept:
    """A concept the search recognised, and whether its adapter was applied."""

    id: str
    name: str
    version: int | None  # adapter version applied; None when none could be
    mentioned: bool
    applied: bool


@dataclass(frozen=True)
class SearchHit:
    image: Image
    score: float
    rank: int  # 1-based over the whole ranking


@dataclass
class SearchOutcome:
    query: str
    text: str  # what was encoded
    personalized: bool
    model_id: str
    hits: list[SearchHit]
    concepts: list[AppliedConcept]
    indexed: int  # images in the user's index
    warnings: list[str] = field(default_factory=list)
    reranked: bool = False  # scores are base + region match (app.ml.regions), not cosines


class AdapterCache:
    """Deserialised adapters by row id (rows are immutable once written)."""

    def __init__(self, max_items: int = 4096) -> None:
        self._items: OrderedDict[str, ConceptAdapter] = OrderedDict()
        self._means: dict[str, np.ndarray | None] = {}
        self._lock = threading.Lock()
        self.max_items = max_items

    def photo_mean(self, db_session: Session, row: Adapter, model_id: str) -> np.ndarray | None:
        """Normalised mean of the normalised photo embeddings this adapter was trained on."""
        key = f"{row.id}:{model_id}"
        with self._lock:
            if key in self._means:
                return self._means[key]
        blobs = db_session.scalars(
            select(ConceptExample.embedding).where(
                ConceptExample.concept_id == row.concept_id,
                ConceptExample.version_added <= row.version,
                ConceptExample.embedding_model == model_id,
                ConceptExample.embedding.is_not(None),
            )
        ).all()
        mean = None
        if blobs:
            vecs = np.stack([np.frombuffer(b, np.float32) for b in blobs if b is not None])
            mean = _unit(_unit(vecs).mean(axis=0))
        with self._lock:
            self._means[key] = mean
            while len(self._means) > self.max_items:
                self._means.pop(next(iter(self._means)))
        return mean

    def get(self, row: Adapter) -> ConceptAdapter:
        with self._lock:
            found = self._items.get(row.id)
            if found is not None:
                self._items.move_to_end(row.id)
                return found
        adapter = ConceptAdapter.from_bytes(row.weights)
        with self._lock:
            self._items[row.id] = adapter
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return adapter


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@dataclass(frozen=True)
class QueryEncoding:
    """A query's one search vector and, for several concepts, its per-concept parts."""

    vector: np.ndarray  # (1, D) unit
    parts: np.ndarray | None = None  # (K, D) unit: concept k's text under its update + photos


def encode_query(
    serving: ServingModel,
    text: str,
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> np.ndarray:
    """The query embedding, (1, D): text under the concepts' updates, fused with their photos."""
    return encode_query_parts(serving, text, adapters, photo_means, settings).vector


def encode_query_parts(
    serving: ServingModel,
    text: str,
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> QueryEncoding:
    """The query embedding and, when it names several concepts, the part of each.

    `photo_means[i]` is the photo-embedding mean of the concept of `adapters[i]` (None: none).
    """
    bundle = serving.bundle
    means = [m for m in photo_means if m is not None]
    if len(adapters) >= 2 and settings.stack == "embeddings":
        # Each update fires on its own token, so the query is encoded once per concept, each
        # part fused with its own concept's photos, and the plain query added for the context
        # (synthetic PerVL: two-concept mRR 0.355 -> 0.421 on test, better on 4/4 validation
        # seeds than one global photo mean; bench/results/pervl_synthetic_multi.json).
        parts = []
        for adapter, mean in zip(adapters, photo_means, strict=True):
            part = _unit(encode_texts(bundle, [text], [adapter]))  # (1, D)
            if mean is not None and settings.multi_photo_weight > 0:
                part = _unit(part + settings.multi_photo_weight * _unit(mean)[None])
            parts.append(part)
        q = _unit(np.sum(parts, axis=0))
        if settings.multi_context_weight > 0:
            q = _unit(q + settings.multi_context_weight * encode_texts(bundle, [text]))
        return QueryEncoding(q.astype(np.float32), np.concatenate(parts).astype(np.float32))
    q = encode_texts(bundle, [text], adapters)
    if means and settings.photo_weight > 0:
        photos = _unit(_unit(np.stack(means)).mean(axis=0))  # (D,)
        q = _unit(q + settings.photo_weight * photos[None])
    return QueryEncoding(q.astype(np.float32))


def rerank_by_regions(
    db_session: Session,
    user_id: str,
    ranked: list[tuple[int, float]],
    parts: np.ndarray,
    weight: float,
) -> tuple[list[tuple[int, float]], int]:
    """Candidates (vec id, score) re-scored with each concept's best crop match, best first,
    and how many of them had no crops.

    Images embedded without regions are matched on their whole embedding; rows deleted since
    the index was read are dropped.
    """
    if not ranked:
        return ranked, 0
    dim = parts.shape[1]
    rows: dict[int, tuple[bytes | None, bytes | None]] = {}
    ids = [i for i, _ in ranked]
    for start in range(0, len(ids), 900):  # stay under SQLite's bound-parameter limit
        query = select(Image.vec_id, Image.embedding, Image.region_embeddings).where(
            Image.user_id == user_id, Image.vec_id.in_(ids[start : start + 900])
        )
        rows.update((v, (e, r)) for v, e, r in db_session.execute(query))
    kept = [(i, s) for i, s in ranked if i in rows and rows[i][0] is not None]
    if not kept:
        return [], 0
    whole = np.stack([np.frombuffer(rows[i][0], np.float32) for i, _ in kept])  # type: ignore[arg-type]
    regions = [unpack_regions(rows[i][1], dim) for i, _ in kept]
    base = np.array([s for _, s in kept], dtype=np.float32)
    scores = rerank_scores(base, parts, whole, regions, weight)
    order = np.argsort(-scores, kind="stable")
    return [(kept[n][0], float(scores[n])) for n in order], sum(not len(r) for r in regions)


def _latest_adapters(db_session: Session, concept_ids: Sequence[str]) -> dict[str, Adapter]:
    """The newest stored adapter per concept: a concept keeps searching while it retrains."""
    if not concept_ids:
        return {}
    newest = (
        select(Adapter.concept_id, func.max(Adapter.version).label("v"))
        .where(Adapter.concept_id.in_(list(concept_ids)))
        .group_by(Adapter.concept_id)
        .subquery()
    )
    rows = db_session.scalars(
        select(Adapter).join(
            newest, (Adapter.concept_id == newest.c.concept_id) & (Adapter.version == newest.c.v)
        )
    )
    return {row.concept_id: row for row in rows}


def validate_query(query: str, limits: LimitSettings) -> str:
    text = " ".join(query.split())
    if not text:
        raise ValidationFailed("the query is empty; say what to look for", code="empty_query")
    if len(text) > limits.max_query_chars:
        raise QueryTooLong(
            f"the query has {len(text)} characters; at most {limits.max_query_chars} are accepted"
        )
    return text


def search_images(
    user_id: str,
    query: str,
    *,
    k: int,
    offset: int = 0,
    personalize: bool = True,
    concept_ids: Sequence[str] = (),
    filters: SearchFilters | None = None,
    db_session: Session,
    serving: ServingModel,
    index_cache: IndexCache,
    adapter_cache: AdapterCache,
    limits: LimitSettings,
    search_settings: SearchSettings | None = None,
) -> SearchOutcome:
    """Rank the user's images for `query`; concept names in it personalise the text encoder."""
    text = validate_query(query, limits)
    if not 1 <= k <= limits.max_k:
        raise ValidationFailed(f"k must be between 1 and {limits.max_k}", code="invalid_k")
    if not 0 <= offset <= limits.max_offset:
        raise ValidationFailed(
            f"offset must be between 0 and {limits.max_offset}", code="invalid_offset"
        )
    bundle = serving.bundle
    warnings: list[str] = []
    applied: list[AppliedConcept] = []
    adapters: list[ConceptAdapter] = []
    photo_means: list[np.ndarray | None] = []
    encoded = text
    if personalize:
        concepts = list(db_session.scalars(select(Concept).where(Concept.user_id == user_id)))
        by_id = {c.id: c for c in concepts}
        for cid in concept_ids:
            if cid not in by_id:
                raise NotFound.of("concept")
        stored = _latest_adapters(db_session, [c.id for c in concepts])
        loaded: dict[str, ConceptAdapter] = {}
        for cid, row in stored.items():
            try:
                adapter = adapter_cache.get(row)
                adapter.check_compatible(bundle.fingerprint)
            except AdapterMismatchError:
                warnings.append(
                    f"'{by_id[cid].name}' was trained on another model; add a photo or "
                    "re-register it to retrain it for the serving model"
                )
                continue
            loaded[cid] = adapter
        named = [NamedConcept(c.id, c.name) for c in concepts]
        phrases = {
            c.id: (
                placeholder_phrase(loaded[c.id].token, loaded[c.id].category)
                if c.id in loaded
                else c.name  # untrained: search for the name as plain text
            )
            for c in concepts
        }
        rewritten = rewrite_query(text, named, phrases)
        encoded = rewritten.text
        wanted = list(dict.fromkeys([*rewritten.concept_ids, *concept_ids]))
        for cid in wanted:
            concept = by_id[cid]
            adapter_row = stored.get(cid)
            ok = cid in loaded
            if ok:
                adapters.append(loaded[cid])
                assert adapter_row is not None
                photo_means.append(
                    adapter_cache.photo_mean(db_session, adapter_row, serving.model_id)
                )
            elif adapter_row is None:
                warnings.append(
                    f"'{concept.name}' is {concept.state} and has no trained version yet; "
                    "its name was searched as plain text"
                )
            applied.append(
                AppliedConcept(
                    id=cid,
                    name=concept.name,
                    version=adapter_row.version if ok and adapter_row else None,
                    mentioned=cid in rewritten.concept_ids,
                    applied=ok,
                )
            )
    n_tokens = count_tokens(bundle, encoded)
    if n_tokens > bundle.context_length:
        raise QueryTooLong(
            f"the query is {n_tokens} tokens long but the model reads at most "
            f"{bundle.context_length} (CLIP's context, start and end tokens included); shorten it",
            detail={"tokens": n_tokens, "context_length": bundle.context_length},
        )
    cfg = search_settings or SearchSettings()
    encoding = encode_query_parts(serving, encoded, adapters, photo_means, cfg)
    cached = index_cache.get(
        db_session=db_session, user_id=user_id, model_id=serving.model_id, dim=bundle.embed_dim
    )
    index = cached.index
    want = offset + k
    regions = encoding.parts is not None and cfg.regions != "none" and cfg.region_weight > 0
    # Several concepts: the top candidates of the one-vector search are re-ranked by where each
    # concept best matches a crop of the image (app.ml.regions).
    # Never more than the library: the result arrays are sized by it, not by the request.
    fetch = min(max(want, cfg.region_candidates) if regions else want, len(index))
    # Filters select ids in SQL (no vectors read); FAISS then ranks only those.
    among = _filtered_vec_ids(db_session, user_id, filters) if filters and filters.active else None
    scores, ids = index.search(encoding.vector, fetch, among=among)
    ranked = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
    if regions:
        assert encoding.parts is not None
        ranked, missing = rerank_by_regions(
            db_session, user_id, ranked, encoding.parts, cfg.region_weight
        )
        candidates, ranked = len(ranked), ranked[:want]
        if missing:
            warnings.append(
                f"{missing} of the {candidates} re-ranked "
                "images have no crop embeddings yet (still being embedded, or added before "
                "crops were on: POST /index/rebuild adds them); they were matched on the whole "
                "image only"
            )
    images = _images_by_vec_id(db_session, user_id, [i for i, _ in ranked])
    # Rows deleted after the index was read are simply absent.
    ranked = [(i, s) for i, s in ranked if i in images]
    hits = [SearchHit(images[i], s, offset + n + 1) for n, (i, s) in enumerate(ranked[offset:want])]
    return SearchOutcome(
        query=query,
        text=encoded,
        personalized=bool(adapters),
        model_id=serving.model_id,
        hits=hits,
        concepts=applied,
        indexed=len(index),
        warnings=warnings,
        reranked=regions,
    )


def _filtered_vec_ids(db_session: Session, user_id: str, filters: SearchFilters) -> np.ndarray:
    """FAISS ids of the user's images that pass every filter, (M,) int64."""
    query = select(Image.vec_id).where(Image.user_id == user_id)
    if filters.created_after:
        query = query.where(Image.created_at >= filters.created_after)
    if filters.created_before:
        query = query.where(Image.created_at < filters.created_before)
    if filters.mime:
        query = query.where(Image.mime.in_(filters.mime))
    return np.fromiter(db_session.scalars(query), dtype=np.int64)


def _images_by_vec_id(db_session: Session, user_id: str, vec_ids: list[int]) -> dict[int, Image]:
    if not vec_ids:
        return {}
    found: dict[int, Image] = {}
    for start in range(0, len(vec_ids), 900):  # stay under SQLite's bound-parameter limit
        query = (
            select(Image)
            .options(defer(Image.embedding))  # hits need metadata, not their vectors
            .where(Image.user_id == user_id, Image.vec_id.in_(vec_ids[start : start + 900]))
        )
        found.update((img.vec_id, img) for img in db_session.scalars(query))
    return found


def unembedded_count(db_session: Session, user_id: str, model_id: str) -> int:
    """Images of the user not (yet) embedded by the serving model."""
    return int(
        db_session.scalar(
            select(func.count())
            .select_from(Image)
            .where(
                Image.user_id == user_id,
                (Image.embedding_model.is_(None)) | (Image.embedding_model != model_id),
            )
        )
        or 0
    )
