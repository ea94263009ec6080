"""Search a user's library: rewrite concept names, stack their adapters, encode, rank.

The query math is `app.services.recipe` (shared with the benchmark); the SQL is in
`app.repositories`; this module resolves the user's concepts and orchestrates.
"""

from __future__ import annotations

import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TypeVar

import numpy as np
from sqlalchemy.orm import Session

from app import repositories
from app.config import LimitSettings, SearchSettings
from app.errors import NotFound, QueryTooLong, ValidationFailed
from app.ml.adapter import ConceptAdapter
from app.ml.encode import count_tokens
from app.ml.model import AdapterMismatchError
from app.ml.regions import region_method, rows_of_kind, split_regions, unpack_regions
from app.ml.threads import cpu_threads
from app.ml.train import placeholder_phrase
from app.models import Adapter, Concept, Image
from app.services import recipe
from app.services.index import CachedIndex, IndexCache
from app.services.model import ServingModel
from app.services.query import NamedConcept, RewrittenQuery, rewrite_query
from app.services.recipe import QueryEncoding

T = TypeVar("T")

__all__ = [
    "AdapterCache",
    "AppliedConcept",
    "QueryEncoding",
    "SearchFilters",
    "SearchHit",
    "SearchOutcome",
    "TextEmbedding",
    "embed_text",
    "encode_query",
    "encode_query_parts",
    "rerank_by_regions",
    "search_images",
    "unembedded_count",
    "validate_query",
]


@dataclass(frozen=True, kw_only=True)
class QueryEnv:
    """What encoding a query needs from its process and its request: the request's session,
    the serving model, the adapter cache, the limits, the search recipe and the threads of one
    search (POLAR_THREADS__SEARCH; 0 = the process's)."""

    db_session: Session
    serving: ServingModel
    adapter_cache: AdapterCache
    limits: LimitSettings
    search: SearchSettings = field(default_factory=SearchSettings)
    threads: int = 0


@dataclass(frozen=True, kw_only=True)
class SearchEnv(QueryEnv):
    """A search's environment: a query's, and the per-user index cache it ranks with."""

    index_cache: IndexCache


@dataclass(frozen=True, kw_only=True)
class TextQuery:
    """A query as a person or an application wrote it. `personalize`: false = plain CLIP;
    `concept_ids`: concepts applied besides those named; `truncate`: a query past the model's
    context is cut to it as Immich's machine learning cuts instead of refused."""

    text: str
    personalize: bool = True
    concept_ids: Sequence[str] = ()
    truncate: bool = False


@dataclass(frozen=True, kw_only=True)
class SearchQuery(TextQuery):
    """A search: the query, the page (`k` hits after `offset`) and filters on the images."""

    k: int = 20
    offset: int = 0
    filters: SearchFilters | None = None


@dataclass(frozen=True)
class SearchFilters:
    """Restrict hits to images matching all given conditions."""

    created_after: datetime | None = None  # uploaded
    created_before: datetime | None = None
    taken_after: datetime | None = None  # the photo was taken (Image.taken_at)
    taken_before: datetime | None = None
    mime: tuple[str, ...] = ()

    @property
    def active(self) -> bool:
        return bool(
            self.created_after
            or self.created_before
            or self.taken_after
            or self.taken_before
            or self.mime
        )


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
    """Deserialised adapters and their photo means by row id (rows are immutable once written)."""

    def __init__(self, max_items: int = 4096) -> None:
        self._items: OrderedDict[str, ConceptAdapter] = OrderedDict()
        self._means: dict[str, np.ndarray | None] = {}
        self._memo: OrderedDict[str, object] = OrderedDict()
        self._lock = threading.Lock()
        self.max_items = max_items

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

    def photo_mean(
        self, row: Adapter, model_id: str, load: Callable[[], np.ndarray | None]
    ) -> np.ndarray | None:
        """The adapter's photo mean under `model_id`: cached, else `load()`ed and kept."""
        key = f"{row.id}:{model_id}"
        with self._lock:
            if key in self._means:
                return self._means[key]
        mean = load()
        with self._lock:
            self._means[key] = mean
            while len(self._means) > self.max_items:
                self._means.pop(next(iter(self._means)))
        return mean

    def memo(self, key: str, load: Callable[[], T]) -> T:
        """What `load()` returns for `key`, computed once while it stays among the most recent
        (an album's photo mean and library scores, app.services.albums)."""
        with self._lock:
            if key in self._memo:
                self._memo.move_to_end(key)
                return self._memo[key]  # type: ignore[return-value]
        value = load()
        with self._lock:
            self._memo[key] = value
            while len(self._memo) > self.max_items:
                self._memo.popitem(last=False)
        return value


def photo_mean(
    db_session: Session, cache: AdapterCache, row: Adapter, model_id: str
) -> np.ndarray | None:
    """Normalised mean of the normalised photo embeddings the adapter was trained on, (D,)."""

    def load() -> np.ndarray | None:
        blobs = repositories.adapter_photo_embeddings(
            db_session=db_session, adapter=row, model_id=model_id
        )
        if not blobs:
            return None
        return recipe.photo_mean(np.stack([np.frombuffer(b, np.float32) for b in blobs]))

    return cache.photo_mean(row, model_id, load)


def encode_query(
    serving: ServingModel,
    text: str,
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> np.ndarray:
    """The query embedding, (1, D): text under the concepts' updates, fused with their photos."""
    return recipe.encode_query(serving.bundle, text, adapters, photo_means, settings).vector


def encode_query_parts(
    serving: ServingModel,
    text: str,
    adapters: Sequence[ConceptAdapter],
    photo_means: Sequence[np.ndarray | None],
    settings: SearchSettings,
) -> QueryEncoding:
    """The query embedding and, when it names concepts and is re-ranked by crops, the part of
    each (`app.services.recipe.encode_query` on the serving model)."""
    return recipe.encode_query(serving.bundle, text, adapters, photo_means, settings)


def rerank_by_regions(
    db_session: Session,
    user_id: str,
    ranked: list[tuple[int, float]],
    parts: np.ndarray,
    weights: dict[str, float],
) -> tuple[list[tuple[int, float]], int]:
    """Candidates (vec id, score) re-scored with each concept's best region match of each kind
    that `weights` names, best first, and how many of them lacked one of those kinds.

    An image lacking a kind is matched on the kind it has (`rows_of_kind`), one without regions
    on its whole embedding; rows deleted since the index was read are dropped.
    """
    if not ranked:
        return ranked, 0
    dim = parts.shape[1]
    rows = repositories.image_vectors(
        db_session=db_session, user_id=user_id, vec_ids=[i for i, _ in ranked]
    )
    kept = [(i, s) for i, s in ranked if i in rows and rows[i].embedding is not None]
    if not kept:
        return [], 0
    whole = np.stack([np.frombuffer(rows[i].embedding, np.float32) for i, _ in kept])  # type: ignore[arg-type]
    stored = [
        split_regions(unpack_regions(rows[i].regions, dim), rows[i].region_layout) for i, _ in kept
    ]
    regions = {kind: [rows_of_kind(s, kind, dim) for s in stored] for kind in weights}
    base = np.array([s for _, s in kept], dtype=np.float32)
    order, scores = recipe.rerank(base, parts, whole, regions, weights)
    reranked = [(kept[n][0], float(s)) for n, s in zip(order, scores, strict=True)]
    return reranked, sum(any(kind not in s for kind in weights) for s in stored)


# Characters that show nothing: whitespace, controls, and format characters (zero-width space
# and joiner, bidi marks), which str.split does not count as space.
_INVISIBLE = frozenset({"Cc", "Cf", "Zs", "Zl", "Zp"})


def validate_query(query: str, limits: LimitSettings) -> str:
    text = " ".join(query.split())
    if all(unicodedata.category(ch) in _INVISIBLE for ch in text):
        raise ValidationFailed("the query is empty; say what to look for", code="empty_query")
    if len(text) > limits.max_query_chars:
        raise QueryTooLong(
            f"the query has {len(text)} characters; at most {limits.max_query_chars} are accepted"
        )
    return text


@dataclass
class _Personalized:
    """What a query's concept names resolved to: the text to encode and the recipe's inputs."""

    text: str
    adapters: list[ConceptAdapter] = field(default_factory=list)
    photo_means: list[np.ndarray | None] = field(default_factory=list)
    applied: list[AppliedConcept] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _personalize(
    db_session: Session,
    user_id: str,
    text: str,
    concept_ids: Sequence[str],
    serving: ServingModel,
    adapter_cache: AdapterCache,
    truncate: bool = False,
) -> _Personalized:
    """Rewrite the user's concept names into placeholders; load the named concepts' adapters.

    `truncate`: a query past the model's context is cut to it (`_fit_context`) instead of
    refused, and only the concepts named in what is kept apply."""
    concepts = repositories.user_concepts(db_session=db_session, user_id=user_id)
    by_id = {c.id: c for c in concepts}
    for cid in concept_ids:
        if cid not in by_id:
            raise NotFound.of("concept")
    stored = repositories.latest_adapters(db_session=db_session, concept_ids=list(by_id))
    out = _Personalized(text)
    loaded = _compatible_adapters(stored, by_id, serving, adapter_cache, out.warnings)
    phrases = {
        c.id: (
            placeholder_phrase(loaded[c.id].token, loaded[c.id].category)
            if c.id in loaded
            else c.name  # untrained: search for the name as plain text
        )
        for c in concepts
    }
    named_concepts = [NamedConcept(c.id, c.name) for c in concepts]
    rewritten = rewrite_query(text, named_concepts, phrases)
    out.text = rewritten.text
    if truncate:
        out.text, rewritten = _fit_context(serving, text, named_concepts, phrases, rewritten)
    for cid in dict.fromkeys([*rewritten.concept_ids, *concept_ids]):
        concept, row = by_id[cid], stored.get(cid)
        ok = cid in loaded
        if ok:
            assert row is not None
            out.adapters.append(loaded[cid])
            out.photo_means.append(photo_mean(db_session, adapter_cache, row, serving.model_id))
        elif row is None:
            out.warnings.append(
                f"'{concept.name}' is {concept.state} and has no trained version yet; "
                "its name was searched as plain text"
            )
        out.applied.append(
            AppliedConcept(
                id=cid,
                name=concept.name,
                version=row.version if ok and row else None,
                mentioned=cid in rewritten.concept_ids,
                applied=ok,
            )
        )
    return out


def _compatible_adapters(
    stored: dict[str, Adapter],
    by_id: dict[str, Concept],
    serving: ServingModel,
    adapter_cache: AdapterCache,
    warnings: list[str],
) -> dict[str, ConceptAdapter]:
    """concept id -> its newest adapter, for those trained on the serving model."""
    loaded: dict[str, ConceptAdapter] = {}
    for cid, row in stored.items():
        try:
            adapter = adapter_cache.get(row)
            adapter.check_compatible(serving.bundle.fingerprint)
        except AdapterMismatchError:
            warnings.append(
                f"'{by_id[cid].name}' was trained on another model; add a photo or "
                "re-register it to retrain it for the serving model"
            )
            continue
        loaded[cid] = adapter
    return loaded


def _fit_context(
    serving: ServingModel,
    text: str,
    concepts: Sequence[NamedConcept],
    phrases: dict[str, str],
    rewritten: RewrittenQuery,
) -> tuple[str, RewrittenQuery]:
    """The text to encode for a query that may pass the model's context, cut the way Immich's
    machine learning cuts its queries: the first context-2 tokens kept (open_clip's tokenizer,
    and Immich's `tokenizer.enable_truncation(max_length=context_length)`, keep the start and
    end tokens). The cut falls on the query as typed, so a concept applies when its name lies
    in the words that survive: the longest run of leading words whose rewriting fits is
    rewritten, the rest follows as typed and the tokenizer cuts it (returns the text and the
    rewriting of the kept words, whose mentions are the concepts that apply)."""
    bundle = serving.bundle
    if count_tokens(bundle, rewritten.text) <= bundle.context_length:
        return rewritten.text, rewritten
    words = text.split(" ")  # validate_query joined the words with single spaces

    def fits(n: int) -> RewrittenQuery | None:
        head = rewrite_query(" ".join(words[:n]), concepts, phrases)
        return head if count_tokens(bundle, head.text) <= bundle.context_length else None

    lo, hi = 0, len(words)  # fits(lo) holds (no words); fits(hi) does not (the whole query)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid) is None:
            hi = mid
        else:
            lo = mid
    head = fits(lo) or rewrite_query("", concepts, phrases)
    return " ".join([*([head.text] if head.text else []), *words[lo:]]), head


def _check_length(serving: ServingModel, text: str) -> None:
    bundle = serving.bundle
    n_tokens = count_tokens(bundle, text)
    if n_tokens > bundle.context_length:
        raise QueryTooLong(
            f"the query is {n_tokens} tokens long but the model reads at most "
            f"{bundle.context_length} (CLIP's context, start and end tokens included); shorten it",
            detail={"tokens": n_tokens, "context_length": bundle.context_length},
        )


def search_images(user_id: str, query: SearchQuery, env: SearchEnv) -> SearchOutcome:
    """Rank the user's images for `query`; concept names in it personalise the text encoder."""
    db_session, serving, limits, k, offset = (
        env.db_session,
        env.serving,
        env.limits,
        query.k,
        query.offset,
    )
    text = validate_query(query.text, limits)
    if not 1 <= k <= limits.max_k:
        raise ValidationFailed(f"k must be between 1 and {limits.max_k}", code="invalid_k")
    if not 0 <= offset <= limits.max_offset:
        raise ValidationFailed(
            f"offset must be between 0 and {limits.max_offset}", code="invalid_offset"
        )
    named = _understand(user_id, text, query, env)
    cfg = env.search
    want = offset + k
    # One query is small work: one thread per search, searches side by side on the cores.
    with cpu_threads(env.threads):
        encoding = recipe.encode_query(
            serving.bundle, named.text, named.adapters, named.photo_means, cfg
        )
        cached = env.index_cache.get(
            db_session=db_session,
            user_id=user_id,
            model_id=serving.model_id,
            dim=serving.bundle.embed_dim,
        )
        method = region_method(serving.bundle, cfg.region_method)
        weights = recipe.region_weights(encoding, cfg, method)
        # Photos marked "not <concept>" for a concept the query names are never its hits.
        rejected = _rejected_for(db_session, user_id, named)
        ranked = _rank(
            db_session,
            user_id,
            encoding,
            weights,
            cached,
            want + len(rejected),
            query.filters,
            cfg,
            named.warnings,
        )
        ranked = [(i, s) for i, s in ranked if i not in rejected][:want]
    images = repositories.images_by_vec_id(
        db_session=db_session, user_id=user_id, vec_ids=[i for i, _ in ranked]
    )
    # Rows deleted after the index was read are simply absent.
    ranked = [(i, s) for i, s in ranked if i in images]
    hits = [SearchHit(images[i], s, offset + n + 1) for n, (i, s) in enumerate(ranked[offset:want])]
    return SearchOutcome(
        query=query.text,
        text=named.text,
        personalized=bool(named.adapters),
        model_id=serving.model_id,
        hits=hits,
        concepts=named.applied,
        indexed=len(cached.index),
        warnings=named.warnings,
        reranked=bool(weights),
    )


def _rejected_for(db_session: Session, user_id: str, named: _Personalized) -> set[int]:
    """FAISS ids of the photos a person marked "not it" for a concept the query names
    (docs/ALBUMS.md: on synthetic PerVL one feedback round raises context mRR by 0.10 on test,
    the rejected look-alikes being what outranked the concept)."""
    ids = [c.id for c in named.applied]
    return repositories.rejected_vec_ids(db_session=db_session, user_id=user_id, concept_ids=ids)


def _understand(user_id: str, text: str, query: TextQuery, env: QueryEnv) -> _Personalized:
    """The query's `text` as it will be encoded (names rewritten, adapters found), within the
    context: QueryTooLong past it, or (`query.truncate`) cut to it as Immich's machine learning
    cuts."""
    named = (
        _personalize(
            env.db_session,
            user_id,
            text,
            query.concept_ids,
            env.serving,
            env.adapter_cache,
            query.truncate,
        )
        if query.personalize
        else _Personalized(text)
    )
    if not query.truncate:
        _check_length(env.serving, named.text)
    return named


@dataclass
class TextEmbedding:
    """A query's search vector with the user's concepts applied, and how it was understood."""

    query: str
    text: str  # what was encoded
    personalized: bool
    model_id: str
    vector: np.ndarray  # (D,) unit
    concepts: list[AppliedConcept]
    warnings: list[str] = field(default_factory=list)


def embed_text(user_id: str, query: TextQuery, env: QueryEnv) -> TextEmbedding:
    """The vector `search_images` would rank the library with (the same rewriting, stacking and
    photo fusion), for an application that searches its own index of the same model's image
    embeddings. The per-concept parts of a several-concept query (region re-ranking) stay here:
    the vector alone is the product. `query.truncate`: a query past the model's context is
    cut to it as Immich's machine learning cuts (`_fit_context`) instead of refused."""
    serving = env.serving
    text = validate_query(query.text, env.limits)
    named = _understand(user_id, text, query, env)
    with cpu_threads(env.threads):
        encoding = recipe.encode_query(
            serving.bundle, named.text, named.adapters, named.photo_means, env.search
        )
    return TextEmbedding(
        query=query.text,
        text=named.text,
        personalized=bool(named.adapters),
        model_id=serving.model_id,
        vector=encoding.vector[0],
        concepts=named.applied,
        warnings=named.warnings,
    )


def _rank(
    db_session: Session,
    user_id: str,
    encoding: QueryEncoding,
    weights: dict[str, float],
    cached: CachedIndex,
    want: int,
    filters: SearchFilters | None,
    cfg: SearchSettings,
    warnings: list[str],
) -> list[tuple[int, float]]:
    """The `want` best (vec id, score) of the user's index for the encoded query; `weights`
    (`recipe.region_weights`) re-rank the best candidates by region matches when not empty."""
    # Filters select ids in SQL (no vectors read); FAISS then ranks only those.
    among = _filtered_vec_ids(db_session, user_id, filters) if filters and filters.active else None
    # Never more than the library: the result arrays are sized by it, not by the request.
    fetch = min(recipe.candidates_to_fetch(want, bool(weights), cfg), len(cached.index))
    scores, ids = cached.index.search(encoding.vector, fetch, among=among)
    ranked = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
    if not weights:
        return ranked
    # Concepts named: the best candidates are re-ranked by where each concept best matches a
    # region of the image.
    assert encoding.parts is not None
    ranked, missing = rerank_by_regions(db_session, user_id, ranked, encoding.parts, weights)
    if missing:
        warnings.append(
            f"{missing} of the {len(ranked)} re-ranked "
            "images lack region embeddings of the configured kind (still being embedded, or "
            "added before the regions were on or changed: POST /index/rebuild adds them); "
            "they were matched on the regions they have, or on the whole image"
        )
    return ranked[:want]


def _filtered_vec_ids(db_session: Session, user_id: str, filters: SearchFilters) -> np.ndarray:
    """FAISS ids of the user's images that pass every filter, (M,) int64."""
    ids = repositories.filtered_vec_ids(
        db_session=db_session,
        user_id=user_id,
        created_after=filters.created_after,
        created_before=filters.created_before,
        taken_after=filters.taken_after,
        taken_before=filters.taken_before,
        mime=filters.mime,
    )
    return np.asarray(ids, dtype=np.int64)


def unembedded_count(db_session: Session, user_id: str, model_id: str) -> int:
    """Images of the user not (yet) embedded by the serving model."""
    return repositories.count_unembedded_images(
        db_session=db_session, user_id=user_id, model_id=model_id
    )
