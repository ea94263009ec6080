"""Personal concepts: create from photos, list, rename, recategorise, add photos, delete, train.

Versions: anything that changes what the adapter must learn bumps `version` and queues one
`train_concept` job for the new version: more photos, or a new category (the category is part of
the placeholder phrase "sks <category>" the adapter is trained on). Renaming alone retrains
nothing: the name is only matched in queries, never encoded. A job for an older version never
overwrites the state of a newer one.

Photos are stored like library images (content-addressed, validated by ImageStore.stage) and are
all-or-nothing: one bad photo rejects the request and nothing of it is stored. A photo sent twice
counts once.

Importing this module registers `train_concept` as the handler of JobKind.TRAIN_CONCEPT.
"""

from __future__ import annotations

import base64
import enum
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import LimitSettings, TrainingSettings
from app.db import session_scope
from app.errors import (
    ConceptDeleted,
    DomainError,
    DuplicateConceptName,
    InvalidCategory,
    InvalidConceptName,
    NotFound,
    PhotoCountOutOfRange,
    ValidationFailed,
)
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_images
from app.ml.model import ClipBundle
from app.ml.selective import train_selective
from app.ml.tokens import SHARED_TOKEN
from app.ml.train import pick_concept_token, placeholder_phrase, train_adapter
from app.models import (
    Adapter,
    Concept,
    ConceptExample,
    ConceptState,
    Job,
    JobKind,
    new_id,
)
from app.services import jobs, retention
from app.services.images import IncomingFile, decode_cursor, stage_all
from app.services.jobs import JobContext, JobInterrupted
from app.services.model import ServingModel, load_serving_model
from app.services.query import normalize_name
from app.storage import ImageStore, StagedImage

log = logging.getLogger(__name__)

MAX_NAME_CHARS = 64
MAX_CATEGORY_CHARS = 40  # the phrase must leave room in a 32-token context (demo model)
# Shares of a training job's progress: embedding the photos, then Adam, then retention.
_EMBED_SHARE, _TRAIN_SHARE = 0.1, 0.8


class _Keep(enum.Enum):
    KEEP = "keep"


KEEP = _Keep.KEEP  # "leave this field as it is" (None means "remove the category")


@dataclass(frozen=True)
class ConceptView:
    """A concept with what its API representation needs besides the row."""

    concept: Concept
    example_count: int
    job_id: str | None  # the job training the current version

    @property
    def placeholder(self) -> str:
        return placeholder_phrase(self.concept.token, self.concept.category)


@dataclass(frozen=True)
class ConceptChange:
    """A concept after a change, and the job retraining it (None: nothing retrains)."""

    view: ConceptView
    job: Job | None


@dataclass(frozen=True)
class ConceptPage:
    """One page of a listing; `next_cursor` is None on the last page."""

    items: list[ConceptView]
    next_cursor: str | None


# --- validation ---------------------------------------------------------------------------------


def clean_name(name: str) -> str:
    """The name to store: stripped; 1-64 characters with a letter or digit, no control chars."""
    name = name.strip()
    if not name:
        raise InvalidConceptName("the concept name is empty")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidConceptName(
            f"the concept name has {len(name)} characters; the limit is {MAX_NAME_CHARS}",
            detail={"max_chars": MAX_NAME_CHARS},
        )
    if not name.isprintable():
        raise InvalidConceptName("the concept name contains control characters")
    if not any(ch.isalnum() for ch in name):
        # Queries find names as whole words; punctuation alone is never a word.
        raise InvalidConceptName("the concept name needs at least one letter or digit")
    return name


def clean_category(category: str | None) -> str | None:
    """The category to store, whitespace collapsed; empty means none."""
    if category is None:
        return None
    category = " ".join(category.split())
    if not category:
        return None
    if len(category) > MAX_CATEGORY_CHARS:
        raise InvalidCategory(
            f"the category has {len(category)} characters; the limit is {MAX_CATEGORY_CHARS}",
            detail={"max_chars": MAX_CATEGORY_CHARS},
        )
    if not category.isprintable() or not any(ch.isalnum() for ch in category):
        raise InvalidCategory("the category needs a letter or digit and no control characters")
    return category


def _photo_range_error(got: int, training: TrainingSettings, what: str) -> PhotoCountOutOfRange:
    lo, hi = training.min_photos, training.max_photos
    return PhotoCountOutOfRange(
        f"a concept needs {lo} to {hi} distinct photos; {what} {got}",
        code="too_few_photos" if got < lo else "too_many_photos",
        detail={"min_photos": lo, "max_photos": hi, "got": got},
    )


# --- queries ------------------------------------------------------------------------------------


def cursor_for(created_at: datetime, row_id: str) -> str:
    """Opaque cursor just after (created_at, id); the format of app.services.images' cursors."""
    raw = f"{created_at.isoformat()}|{row_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _get(db_session: Session, user_id: str, concept_id: str, *, lock: bool = False) -> Concept:
    query = select(Concept).where(Concept.id == concept_id, Concept.user_id == user_id)
    if lock:  # re-read under the row lock: another request may have just bumped the version
        query = query.with_for_update().execution_options(populate_existing=True)
    concept = db_session.scalar(query)
    if concept is None:
        raise NotFound.of("concept")
    return concept


def _check_name_free(
    db_session: Session, user_id: str, name: str, except_id: str | None = None
) -> None:
    query = select(Concept.id).where(
        Concept.user_id == user_id, Concept.name_key == normalize_name(name)
    )
    if except_id is not None:
        query = query.where(Concept.id != except_id)
    if db_session.scalar(query.limit(1)) is not None:
        raise DuplicateConceptName(f"you already have a concept named {name!r}")


def _example_counts(db_session: Session, ids: Sequence[str]) -> dict[str, int]:
    rows = db_session.execute(
        select(ConceptExample.concept_id, func.count())
        .where(ConceptExample.concept_id.in_(ids))
        .group_by(ConceptExample.concept_id)
    ).all()
    return {concept_id: int(n) for concept_id, n in rows}


def _current_jobs(db_session: Session, concepts: Sequence[Concept]) -> dict[str, str]:
    """concept id -> id of the newest job training its current version."""
    if not concepts:
        return {}
    wanted = {c.id: c.version for c in concepts}
    rows = db_session.scalars(
        select(Job)
        .where(
            Job.user_id == concepts[0].user_id,
            Job.kind == JobKind.TRAIN_CONCEPT.value,
            Job.payload["concept_id"].as_string().in_(list(wanted)),
        )
        .order_by(Job.created_at, Job.id)
    ).all()
    found: dict[str, str] = {}
    for job in rows:  # oldest first: the newest match wins
        concept_id = job.payload.get("concept_id")
        if concept_id in wanted and job.payload.get("version") == wanted[concept_id]:
            found[concept_id] = job.id
    return found


def _views(db_session: Session, concepts: Sequence[Concept]) -> list[ConceptView]:
    ids = [c.id for c in concepts]
    counts = _example_counts(db_session, ids)
    job_ids = _current_jobs(db_session, concepts)
    return [ConceptView(c, counts.get(c.id, 0), job_ids.get(c.id)) for c in concepts]


def _view(db_session: Session, concept: Concept) -> ConceptView:
    return _views(db_session, [concept])[0]


# --- photos -------------------------------------------------------------------------------------


def _distinct(staged: Iterable[StagedImage], known: set[str]) -> list[StagedImage]:
    """The photos whose content is not in `known` nor earlier in the list."""
    seen = set(known)
    out = []
    for s in staged:
        if s.sha256 not in seen:
            seen.add(s.sha256)
            out.append(s)
    return out


def _add_examples(
    db_session: Session,
    store: ImageStore,
    concept_id: str,
    photos: Sequence[StagedImage],
    version: int,
    created_paths: list[str],
) -> None:
    """Move the photos into the store and add their rows (appends new files to created_paths)."""
    for s in photos:
        storage_path, created = store.commit(s)
        if created:
            created_paths.append(storage_path)
        db_session.add(
            ConceptExample(
                id=new_id(),
                concept_id=concept_id,
                sha256=s.sha256,
                storage_path=storage_path,
                mime=s.mime,
                width=s.width,
                height=s.height,
                version_added=version,
            )
        )


def _undo_files(db_session: Session, store: ImageStore, paths: Sequence[str]) -> None:
    for path in paths:
        if not repositories.storage_path_in_use(db_session=db_session, storage_path=path):
            store.delete(path)


def _queue_training(db_session: Session, concept: Concept) -> Job:
    return jobs.create_job(
        db_session=db_session,
        user_id=concept.user_id,
        kind=JobKind.TRAIN_CONCEPT,
        payload={"concept_id": concept.id, "version": concept.version},
    )


def _dispatch(job: Job | None) -> None:
    jobs.dispatch_committed(job)


def _start_new_version(concept: Concept) -> None:
    """The concept retrains: next version, no metrics until it is trained."""
    concept.version += 1
    concept.state = ConceptState.TRAINING.value
    concept.metrics = None
    concept.retention_score = None
    concept.retention_flagged = False


# --- use cases ----------------------------------------------------------------------------------


def create_concept(
    user_id: str,
    name: str,
    category: str | None,
    files: Sequence[IncomingFile],
    *,
    db_session: Session,
    store: ImageStore,
    training: TrainingSettings,
    limits: LimitSettings,
) -> ConceptChange:
    """Store a new concept (version 1, `training`) with its photos and queue its training."""
    name, category = clean_name(name), clean_category(category)
    if not training.min_photos <= len(files) <= training.max_photos:
        raise _photo_range_error(len(files), training, "got")
    _check_name_free(db_session, user_id, name)
    staged = stage_all(files, store, limits)
    created_paths: list[str] = []
    try:
        photos = _distinct(staged, set())
        if len(photos) < training.min_photos:
            raise _photo_range_error(len(photos), training, "got (duplicates count once)")
        concept = Concept(
            id=new_id(),
            user_id=user_id,
            name=name,
            name_key=normalize_name(name),
            category=category,
            token=SHARED_TOKEN,  # a distinct token, if configured, is picked when it trains
            state=ConceptState.TRAINING.value,
            version=1,
        )
        db_session.add(concept)
        db_session.flush()
        _add_examples(db_session, store, concept.id, photos, 1, created_paths)
        job = _queue_training(db_session, concept)
        db_session.commit()
    except BaseException as e:
        db_session.rollback()
        _undo_files(db_session, store, created_paths)
        if isinstance(e, IntegrityError):
            raise DuplicateConceptName(f"you already have a concept named {name!r}") from e
        raise
    finally:
        for s in staged:
            store.discard(s)  # no-op for the committed ones
    _dispatch(job)
    return ConceptChange(ConceptView(concept, len(photos), job.id), job)


def list_concepts(
    user_id: str, *, db_session: Session, limit: int, cursor: str | None = None
) -> ConceptPage:
    """A page of the user's concepts, oldest first, by (created_at, id) cursor."""
    query = select(Concept).where(Concept.user_id == user_id)
    if cursor:
        created_at, concept_id = decode_cursor(cursor)
        query = query.where(
            (Concept.created_at > created_at)
            | ((Concept.created_at == created_at) & (Concept.id > concept_id))
        )
    rows = db_session.scalars(query.order_by(Concept.created_at, Concept.id).limit(limit + 1)).all()
    items = rows[:limit]
    last = items[-1] if len(rows) > limit else None
    next_cursor = cursor_for(last.created_at, last.id) if last is not None else None
    return ConceptPage(_views(db_session, items), next_cursor)


def get_concept(user_id: str, concept_id: str, *, db_session: Session) -> ConceptView:
    """One of the user's concepts; NotFound for a missing or foreign id alike."""
    return _view(db_session, _get(db_session, user_id, concept_id))


def update_concept(
    user_id: str,
    concept_id: str,
    *,
    db_session: Session,
    name: str | None = None,
    category: str | _Keep | None = KEEP,
) -> ConceptChange:
    """Rename (no retraining) and/or change the category (new placeholder phrase: retrains)."""
    if name is None and category is KEEP:
        raise ValidationFailed("send a new `name` and/or `category`")
    new_name = clean_name(name) if name is not None else None
    new_category = category if category is KEEP else clean_category(category)
    concept = _get(db_session, user_id, concept_id, lock=True)
    job = None
    try:
        if new_name is not None:
            _check_name_free(db_session, user_id, new_name, except_id=concept.id)
            concept.name, concept.name_key = new_name, normalize_name(new_name)
        if new_category is not KEEP and new_category != concept.category:
            concept.category = new_category
            _start_new_version(concept)
            db_session.flush()
            job = _queue_training(db_session, concept)
        db_session.commit()
    except IntegrityError as e:
        db_session.rollback()
        raise DuplicateConceptName(f"you already have a concept named {new_name!r}") from e
    except BaseException:
        db_session.rollback()
        raise
    _dispatch(job)
    return ConceptChange(_view(db_session, concept), job)


def add_examples(
    user_id: str,
    concept_id: str,
    files: Sequence[IncomingFile],
    *,
    db_session: Session,
    store: ImageStore,
    training: TrainingSettings,
    limits: LimitSettings,
) -> ConceptChange:
    """Add photos (a new version trains on all of them); the total stays within max_photos."""
    _get(db_session, user_id, concept_id)  # 404 before reading any upload
    if not files:
        raise ValidationFailed("send at least one photo in the form field 'files'")
    if len(files) > training.max_photos:
        raise _photo_range_error(len(files), training, "this request sends")
    staged = stage_all(files, store, limits)
    created_paths: list[str] = []
    try:
        concept = _get(db_session, user_id, concept_id, lock=True)
        known = set(
            db_session.scalars(
                select(ConceptExample.sha256).where(ConceptExample.concept_id == concept.id)
            )
        )
        photos = _distinct(staged, known)
        if not photos:
            raise ValidationFailed(
                "every photo sent is already a photo of this concept", code="no_new_photos"
            )
        total = len(known) + len(photos)
        if total > training.max_photos:
            raise _photo_range_error(
                total, training, f"it has {len(known)}, with these it would have"
            )
        _start_new_version(concept)
        _add_examples(db_session, store, concept.id, photos, concept.version, created_paths)
        db_session.flush()
        job = _queue_training(db_session, concept)
        db_session.commit()
    except BaseException:
        db_session.rollback()
        _undo_files(db_session, store, created_paths)
        raise
    finally:
        for s in staged:
            store.discard(s)
    _dispatch(job)
    return ConceptChange(ConceptView(concept, total, job.id), job)


def delete_concept(
    user_id: str, concept_id: str, *, db_session: Session, store: ImageStore
) -> None:
    """Delete the concept, its photos' rows and adapters; files go when nothing else uses them."""
    concept = _get(db_session, user_id, concept_id)
    paths = set(
        db_session.scalars(
            select(ConceptExample.storage_path).where(ConceptExample.concept_id == concept.id)
        )
    )
    # Core DELETE: the database cascades to examples and adapters (ON DELETE CASCADE).
    db_session.execute(
        delete(Concept).where(Concept.id == concept.id).execution_options(synchronize_session=False)
    )
    db_session.commit()
    db_session.expunge(concept)
    # After the commit: a concurrent upload of the same content either committed first (and
    # keeps the file) or re-creates it in store.commit.
    _undo_files(db_session, store, sorted(paths))


# --- training (the job handler) -----------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """What a training run needs, read in one short transaction."""

    token: str
    category: str | None
    example_ids: list[str]
    storage_paths: list[str]
    embeddings: list[np.ndarray | None]  # cached for this model, else None


def _load_photo(store: ImageStore, storage_path: str) -> PILImage.Image:
    path = store.path(storage_path)
    if not path.is_file():
        raise NotFound(
            "a photo of this concept is missing from storage; delete the concept and create "
            "it again",
            code="file_missing",
        )
    with PILImage.open(path) as img:
        return ImageOps.exif_transpose(img).convert("RGB")


def _choose_token(
    db_session: Session, concept: Concept, bundle: ClipBundle, settings: TrainingSettings
) -> str:
    """`shared`: "sks"; `distinct`: keep the concept's own token, else pick an unused one."""
    if settings.token_mode == "shared":
        return SHARED_TOKEN
    if concept.token != SHARED_TOKEN:
        return concept.token
    taken = set(
        db_session.scalars(
            select(Concept.token).where(
                Concept.user_id == concept.user_id, Concept.id != concept.id
            )
        )
    )
    return pick_concept_token(bundle, taken, settings.token_mode)


def _apply_result(concept: Concept, row: Adapter) -> None:
    """Make the concept `ready` with what its adapter row recorded."""
    meta = dict(row.meta or {})
    concept.state = ConceptState.READY.value
    concept.token = str(meta.get("token", concept.token))
    concept.metrics = meta.get("metrics")
    score = meta.get("retention_score")
    concept.retention_score = None if score is None else float(score)
    concept.retention_flagged = bool(meta.get("retention_flagged", False))


def _read_plan(
    ctx: JobContext, concept_id: str, version: int, serving: ServingModel
) -> _Plan | None:
    """Load what training needs; None when there is nothing to do (done, or superseded)."""
    model_id = serving.model_id
    with session_scope(ctx.session_factory) as s:
        concept = s.scalar(
            select(Concept).where(Concept.id == concept_id, Concept.user_id == ctx.user_id)
        )
        if concept is None:
            raise ConceptDeleted("the concept was deleted before it was trained")
        if concept.version > version:
            log.info("concept %s v%d superseded by v%d; not training", concept_id, version,
                     concept.version)  # fmt: skip
            return None
        existing = s.scalar(
            select(Adapter).where(Adapter.concept_id == concept_id, Adapter.version == version)
        )
        if existing is not None:  # a rerun after the adapter was stored: just finish
            _apply_result(concept, existing)
            return None
        concept.state = ConceptState.TRAINING.value  # a retry after a failure trains again
        examples = s.scalars(
            select(ConceptExample)
            .where(ConceptExample.concept_id == concept_id, ConceptExample.version_added <= version)
            .order_by(ConceptExample.created_at, ConceptExample.id)
        ).all()
        cached: list[np.ndarray | None] = []
        for ex in examples:
            vec = None
            if ex.embedding is not None and ex.embedding_model == model_id:
                vec = np.frombuffer(ex.embedding, dtype=np.float32)
                vec = vec if vec.shape == (serving.bundle.embed_dim,) else None
            cached.append(vec)
        return _Plan(
            token=_choose_token(s, concept, serving.bundle, ctx.settings.training),
            category=concept.category,
            example_ids=[ex.id for ex in examples],
            storage_paths=[ex.storage_path for ex in examples],
            embeddings=cached,
        )


def _embed_photos(ctx: JobContext, plan: _Plan, serving: ServingModel) -> np.ndarray:
    """(N, D) float32 embeddings of the photos; computes and caches the missing ones."""
    missing = [i for i, e in enumerate(plan.embeddings) if e is None]
    vectors = list(plan.embeddings)
    if missing:
        store = ImageStore(ctx.settings.data_dir)
        images = [_load_photo(store, plan.storage_paths[i]) for i in missing]
        fresh = encode_images(serving.bundle, images)  # (M, D)
        with session_scope(ctx.session_factory) as s:
            for i, vec in zip(missing, fresh, strict=True):
                vectors[i] = vec
                s.execute(
                    update(ConceptExample)
                    .where(ConceptExample.id == plan.example_ids[i])
                    .values(
                        embedding=vec.astype(np.float32).tobytes(), embedding_model=serving.model_id
                    )
                )
    return np.stack([v for v in vectors if v is not None]).astype(np.float32)


def _fit(ctx: JobContext, plan: _Plan, serving: ServingModel, photos: np.ndarray) -> Adapter:
    """Train and measure retention; an unsaved Adapter row carrying the metrics in `meta`."""
    cfg = ctx.settings.training
    bundle = serving.bundle
    lam = cfg.lam if cfg.lam is not None else (0.0 if cfg.keep_weight > 0 else bundle.default_lam)

    def progress(step: int, steps: int, _loss: float) -> None:
        ctx.progress(_EMBED_SHARE + _TRAIN_SHARE * step / steps)

    started = time.perf_counter()
    trainer: Callable[..., ConceptAdapter] = train_adapter  # the paper's objective, fast path
    extra: dict[str, Any] = {}
    if cfg.keep_weight > 0:
        # Keep texts: the bare category (+ "sks" for distinct tokens). Foreign placeholder
        # tokens as well changed nothing on the validation split (ctx mRR 0.789 without, 0.781
        # with two) and cost 30% more training time.
        trainer, extra = train_selective, {"keep": cfg.keep_weight, "others": 0}
    adapter = trainer(
        bundle,
        torch.from_numpy(photos),
        plan.token,
        plan.category,
        lam=lam,
        steps=cfg.steps,
        lr=cfg.lr,
        seed=cfg.seed,
        progress=progress,
        **extra,
    )
    train_seconds = time.perf_counter() - started
    kept = retention.measure_retention(
        serving, ctx.settings.model, adapter, max_drop=cfg.retention_max_drop
    )
    metrics: dict[str, Any] = {
        "final_loss": adapter.final_loss,
        "train_seconds": round(train_seconds, 4),
        "retention_seconds": round(time.perf_counter() - started - train_seconds, 4),
        "steps": adapter.steps,
        "lam": lam,
        "keep_weight": cfg.keep_weight,
        "lr": cfg.lr,
        "n_photos": int(photos.shape[0]),
        "model_id": serving.model_id,
        **kept.as_metrics(),
    }
    meta = {
        "token": plan.token,
        "category": plan.category,
        "placeholder": placeholder_phrase(plan.token, plan.category),
        "metrics": metrics,
        "retention_score": kept.score,
        "retention_flagged": kept.flagged,
    }
    return Adapter(weights=adapter.to_bytes(), model_id=serving.model_id, meta=meta)


def _save(ctx: JobContext, concept_id: str, version: int, fitted: Adapter) -> None:
    """Store exactly one adapter per (concept, version); update the concept if still current."""
    for attempt in (1, 2):
        try:
            with session_scope(ctx.session_factory) as s:
                concept = s.scalar(
                    select(Concept)
                    .where(Concept.id == concept_id, Concept.user_id == ctx.user_id)
                    .with_for_update()
                )
                if concept is None:
                    raise ConceptDeleted("the concept was deleted while it was training")
                row = s.scalar(
                    select(Adapter).where(
                        Adapter.concept_id == concept_id, Adapter.version == version
                    )
                )
                if row is None:  # else another run of this job stored it first: keep that one
                    row = Adapter(
                        id=new_id(),
                        concept_id=concept_id,
                        version=version,
                        weights=fitted.weights,
                        model_id=fitted.model_id,
                        meta=fitted.meta,
                    )
                    s.add(row)
                    s.flush()
                if concept.version == version:  # a newer version is the one that sets state
                    _apply_result(concept, row)
            return
        except IntegrityError:
            # Two runs inserted the same version at once; the second attempt finds the winner's.
            if attempt == 2:
                raise


def _mark_failed(ctx: JobContext, concept_id: str, version: int, error: BaseException) -> None:
    """Set the concept `failed` if this job's version is still the current one."""
    if isinstance(error, DomainError):
        failure = {"code": error.code, "message": error.message}
    else:
        failure = {"code": jobs.INTERNAL_ERROR, "message": f"{type(error).__name__}: {error}"}
    try:
        with session_scope(ctx.session_factory) as s:
            s.execute(
                update(Concept)
                .where(Concept.id == concept_id, Concept.version == version)
                .values(state=ConceptState.FAILED.value, metrics={"error": failure})
            )
    except Exception:
        log.exception("could not mark concept %s failed", concept_id)


def train_concept(ctx: JobContext) -> None:
    """Job handler: train one concept version; idempotent, and never overwrites a newer version."""
    concept_id = str(ctx.payload["concept_id"])
    version = int(ctx.payload["version"])
    try:
        serving = load_serving_model(ctx.settings.model)
        plan = _read_plan(ctx, concept_id, version, serving)
        if plan is None:
            return
        photos = _embed_photos(ctx, plan, serving)
        ctx.progress(_EMBED_SHARE)
        fitted = _fit(ctx, plan, serving, photos)
        _save(ctx, concept_id, version, fitted)
    except JobInterrupted:
        raise  # shutdown: the job runs again later and the concept stays `training`
    except Exception as e:  # not SystemExit & co: a killed worker's job is delivered again
        _mark_failed(ctx, concept_id, version, e)
        raise


jobs.register_handler(JobKind.TRAIN_CONCEPT, train_concept)
