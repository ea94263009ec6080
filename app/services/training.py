"""Training a concept version: the `train_concept` job handler.

One run reads what it needs in a short transaction (`_read_plan`), embeds the photos (cached per
model on the example rows), fits the adapter and measures retention outside any transaction,
then stores exactly one adapter per (concept, version) (`_save`). A job for an older version
never overwrites the state of a newer one, and a rerun after the adapter was stored only
finishes the concept's state, so the handler is idempotent.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image as PILImage
from PIL import ImageOps
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import TrainingSettings
from app.db import session_scope
from app.errors import ConceptDeleted, DomainError, InvalidImage, NotFound
from app.ml.adapter import ConceptAdapter
from app.ml.encode import encode_images
from app.ml.model import ClipBundle
from app.ml.selective import train_selective
from app.ml.threads import cpu_threads
from app.ml.tokens import SHARED_TOKEN
from app.ml.train import pick_concept_token, placeholder_phrase, train_adapter
from app.models import Adapter, Concept, ConceptState, Verdict, new_id
from app.services import job_runs, recipe, retention
from app.services.job_runs import JobContext, JobInterrupted
from app.services.model import ServingModel
from app.storage import ImageStore, open_regular_file, untrusted_image

log = logging.getLogger(__name__)

# Keep texts with foreign placeholder tokens: none (see _fit). The benchmark's service rows
# train with the same (app.bench.runner.TUNED_TRAINING).
KEEP_OTHER_TOKENS = 0
# Weight ν of the negative term (app.ml.train.away_from): how far a concept's text is pushed
# from the photos a person marked "not <concept>"; chosen on the synthetic PerVL validation split
# (bench/albums.py, docs/ALBUMS.md).
NEGATIVE_WEIGHT = 0.25
# Whether photos a person confirmed are training examples of the next version. Off: on the
# synthetic PerVL validation split, training on the confirmed photos (the album's lowest-ranked
# right ones) cost context mRR 0.914 -> 0.876 and two-concept mRR 0.950 -> 0.842; re-measured
# with rejected photos left out of search and the learned album cut-off, against rejecting
# only: album F1 on unmarked photos 0.773 vs 0.883, context mRR 0.964 vs 0.992, two-concept
# 0.842 vs 0.950 (bench/results/albums_synthetic.json); confirmed photos are always in the
# album either way.
TRAIN_ON_CONFIRMED = False
# Photos marked per verdict that one training reads (the most recent ones).
MAX_FEEDBACK_PHOTOS = 200
# Shares of a training job's progress: embedding the photos, then Adam, then retention.
_EMBED_SHARE, _TRAIN_SHARE = 0.1, 0.8


@dataclass(frozen=True)
class _Plan:
    """What a training run needs, read in one short transaction."""

    token: str
    category: str | None
    example_ids: list[str]
    storage_paths: list[str]
    embeddings: list[np.ndarray | None]  # cached for this model, else None
    hashes: frozenset[str]  # contents of the photos (the same photo in the library is no rival)
    # Library photos marked for this concept (docs/ALBUMS.md), embedded by this model:
    confirmed_ids: list[str]  # more positives
    confirmed: list[np.ndarray]
    rejected_ids: list[str]  # negatives
    rejected: list[np.ndarray]


def _load_photo(
    store: ImageStore, storage_path: str, max_pixels: int | None = None
) -> PILImage.Image:
    """A concept's photo, upright, RGB; a DomainError naming it when it is gone or no longer
    decodes (checked as an upload is: a regular file, an allowed format), which fails the
    training job with that message: a concept is trained on all of its photos or not at all."""
    try:
        path = store.path(storage_path)
        with open_regular_file(path) as f, untrusted_image(f, max_pixels=max_pixels) as img:
            return ImageOps.exif_transpose(img).convert("RGB")
    except FileNotFoundError as e:
        raise NotFound(
            "a photo of this concept is missing from storage; delete the concept and create "
            "it again",
            code="file_missing",
        ) from e
    except (DomainError, OSError, ValueError) as e:  # untrusted_image: any decoder failure
        reason = e.message if isinstance(e, DomainError) else str(e)
        raise InvalidImage(
            f"the photo {Path(storage_path).stem[:12]} of this concept cannot be read any more "
            f"({reason}); delete the concept and create it again",
            detail={"sha256": Path(storage_path).stem},
        ) from e


def _choose_token(
    db_session: Session, concept: Concept, bundle: ClipBundle, settings: TrainingSettings
) -> str:
    """`shared`: "sks"; `distinct`: keep the concept's own token, else pick an unused one."""
    if settings.token_mode == "shared":
        return SHARED_TOKEN
    if concept.token != SHARED_TOKEN:
        return concept.token
    taken = repositories.other_concept_tokens(
        db_session=db_session, user_id=concept.user_id, concept_id=concept.id
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
        concept = repositories.get_concept(db_session=s, user_id=ctx.user_id, concept_id=concept_id)
        if concept is None:
            raise ConceptDeleted("the concept was deleted before it was trained")
        if concept.version > version:
            log.info("concept %s v%d superseded by v%d; not training", concept_id, version,
                     concept.version)  # fmt: skip
            return None
        existing = repositories.get_adapter(db_session=s, concept_id=concept_id, version=version)
        if existing is not None:  # a rerun after the adapter was stored: just finish
            _apply_result(concept, existing)
            return None
        concept.state = ConceptState.TRAINING.value  # a retry after a failure trains again
        examples = repositories.examples_up_to(db_session=s, concept_id=concept_id, version=version)
        cached: list[np.ndarray | None] = []
        for ex in examples:
            vec = None
            if ex.embedding is not None and ex.embedding_model == model_id:
                vec = np.frombuffer(ex.embedding, dtype=np.float32)
                vec = vec if vec.shape == (serving.bundle.embed_dim,) else None
            cached.append(vec)
        hashes = frozenset(ex.sha256 for ex in examples)
        marked = repositories.verdict_embeddings(
            db_session=s,
            concept_id=concept_id,
            model_id=model_id,
            limit=MAX_FEEDBACK_PHOTOS,
        )
        dim = serving.bundle.embed_dim
        confirmed = [
            (m.image_id, v)
            for m in marked
            if TRAIN_ON_CONFIRMED and m.verdict == Verdict.CONFIRMED and m.sha256 not in hashes
            for v in [np.frombuffer(m.embedding, np.float32)]
            if v.shape == (dim,)
        ]
        rejected = [
            (m.image_id, v)
            for m in marked
            if m.verdict == Verdict.REJECTED
            for v in [np.frombuffer(m.embedding, np.float32)]
            if v.shape == (dim,)
        ]
        return _Plan(
            token=_choose_token(s, concept, serving.bundle, ctx.settings.training),
            category=concept.category,
            example_ids=[ex.id for ex in examples],
            storage_paths=[ex.storage_path for ex in examples],
            embeddings=cached,
            hashes=hashes,
            confirmed_ids=[i for i, _ in confirmed],
            confirmed=[v for _, v in confirmed],
            rejected_ids=[i for i, _ in rejected],
            rejected=[v for _, v in rejected],
        )


def _embed_photos(ctx: JobContext, plan: _Plan, serving: ServingModel) -> np.ndarray:
    """(N, D) float32 embeddings of the photos; computes and caches the missing ones."""
    missing = [i for i, e in enumerate(plan.embeddings) if e is None]
    vectors = list(plan.embeddings)
    if missing:
        most = ctx.settings.limits.max_pixels
        images = [_load_photo(ctx.store, plan.storage_paths[i], most) for i in missing]
        fresh = encode_images(serving.bundle, images)  # (M, D)
        with session_scope(ctx.session_factory) as s:
            for i, vec in zip(missing, fresh, strict=True):
                vectors[i] = vec
                repositories.store_example_embedding(
                    db_session=s,
                    example_id=plan.example_ids[i],
                    embedding=vec.astype(np.float32).tobytes(),
                    model_id=serving.model_id,
                )
    # Photos a person confirmed are examples too (after the taught ones, in marking order).
    return np.stack([*(v for v in vectors if v is not None), *plan.confirmed]).astype(np.float32)


def _fit(ctx: JobContext, plan: _Plan, serving: ServingModel, photos: np.ndarray) -> Adapter:
    """Train and measure retention; an unsaved Adapter row carrying the metrics in `meta`."""
    cfg = ctx.settings.training
    bundle = serving.bundle
    # Left open by the settings: the model's recipe (polar.json; the paper's for other models).
    keep = cfg.keep_weight if cfg.keep_weight is not None else bundle.recipe.keep_weight
    lr = cfg.lr if cfg.lr is not None else bundle.recipe.lr
    lam = cfg.lam if cfg.lam is not None else (0.0 if keep > 0 else bundle.default_lam)

    def progress(step: int, steps: int, _loss: float) -> None:
        ctx.progress(_EMBED_SHARE + _TRAIN_SHARE * step / steps)

    started = time.perf_counter()
    trainer: Callable[..., ConceptAdapter] = train_adapter  # the paper's objective, fast path
    extra: dict[str, Any] = {}
    if keep > 0:
        # Keep texts: the bare category (+ "sks" for distinct tokens). Foreign placeholder
        # tokens as well changed nothing on the validation split (ctx mRR 0.789 without, 0.781
        # with two) and cost 30% more training time.
        trainer, extra = train_selective, {"keep": keep, "others": KEEP_OTHER_TOKENS}
    if plan.rejected:
        # Photos marked "not <concept>": the negative term (app.ml.train.away_from).
        extra |= {
            "negatives": torch.from_numpy(np.stack(plan.rejected)),
            "negative_weight": NEGATIVE_WEIGHT,
        }
    adapter = trainer(
        bundle,
        torch.from_numpy(photos),
        plan.token,
        plan.category,
        lam=lam,
        steps=cfg.steps,
        lr=lr,
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
        "keep_weight": keep,
        "lr": lr,
        "recipe": bundle.recipe.source,
        "n_photos": int(photos.shape[0]),
        "n_confirmed": len(plan.confirmed),
        "n_rejected": len(plan.rejected),
        "negative_weight": NEGATIVE_WEIGHT if plan.rejected else 0.0,
        "model_id": serving.model_id,
        **kept.as_metrics(),
        "separation": _separation(ctx, plan, serving, adapter, photos),
    }
    meta = {
        "token": plan.token,
        "category": plan.category,
        "placeholder": placeholder_phrase(plan.token, plan.category),
        "metrics": metrics,
        "retention_score": kept.score,
        "retention_flagged": kept.flagged,
        # The marked library photos this version learned from: search and the album fuse the
        # confirmed ones into the concept's photo mean (repositories.adapter_photo_embeddings).
        "feedback": {"confirmed": plan.confirmed_ids, "rejected": plan.rejected_ids},
    }
    return Adapter(weights=adapter.to_bytes(), model_id=serving.model_id, meta=meta)


# Library photos compared with the concept's own when it is trained (the most recent ones).
SEPARATION_SAMPLE = 2000


def _separation(
    ctx: JobContext,
    plan: _Plan,
    serving: ServingModel,
    adapter: ConceptAdapter,
    photos: np.ndarray,
) -> dict[str, Any]:
    """How well the concept stands out from the rest of the user's library, as search sees it.

    "a photo of <concept>" is encoded the way a search would (the update and its photo mean);
    a library photo that scores at least the median of the concept's own photos is one the
    model takes for it: a look-alike. `margin` is the median own score minus the best other
    photo's (above 0: every other photo ranks below most of its own photos).
    """
    bundle = serving.bundle
    with session_scope(ctx.session_factory) as s:
        blobs = repositories.recent_image_embeddings(
            db_session=s,
            user_id=ctx.user_id,
            model_id=serving.model_id,
            exclude_sha256=plan.hashes,
            limit=SEPARATION_SAMPLE,
        )
    if not blobs:
        return {"checked": 0, "lookalikes": 0, "margin": None}
    phrase = placeholder_phrase(plan.token, plan.category)
    query = recipe.encode_query(
        bundle, f"a photo of {phrase}", [adapter], [recipe.photo_mean(photos)], ctx.settings.search
    ).vector[0]  # (D,)
    own = recipe.unit(np.asarray(photos, dtype=np.float32)) @ query  # (N,)
    library = recipe.unit(np.stack([np.frombuffer(b, np.float32) for b in blobs])) @ query
    bar = float(np.median(own))
    return {
        "checked": len(blobs),
        "lookalikes": int((library >= bar).sum()),
        "margin": round(bar - float(library.max()), 4),
    }


def _save(ctx: JobContext, concept_id: str, version: int, fitted: Adapter) -> None:
    """Store exactly one adapter per (concept, version); update the concept if still current."""
    for attempt in (1, 2):
        try:
            with session_scope(ctx.session_factory) as s:
                concept = repositories.get_concept(
                    db_session=s, user_id=ctx.user_id, concept_id=concept_id, lock=True
                )
                if concept is None:
                    raise ConceptDeleted("the concept was deleted while it was training")
                row = repositories.get_adapter(db_session=s, concept_id=concept_id, version=version)
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
    """Set the concept `failed` if this job's version is still the current one. An outage
    (`job_runs.outage_of`) says so: the job is retried, and a retry that succeeds sets it
    `ready`."""
    outage = job_runs.outage_of(error)
    if outage is not None:
        failure = {"code": outage.code, "message": outage.message}
    elif isinstance(error, DomainError):
        failure = {"code": error.code, "message": error.message}
    else:
        # The exception itself is in the job's log line, not in what the client reads.
        failure = {"code": job_runs.INTERNAL_ERROR, "message": job_runs.INTERNAL_ERROR_MESSAGE}
    try:
        with session_scope(ctx.session_factory) as s:
            repositories.fail_concept_version(
                db_session=s, concept_id=concept_id, version=version, metrics={"error": failure}
            )
    except Exception:
        log.exception("could not mark concept %s failed", concept_id)


def train_concept(ctx: JobContext) -> None:
    """Job handler: train one concept version; idempotent, and never overwrites a newer version."""
    concept_id = str(ctx.payload["concept_id"])
    version = int(ctx.payload["version"])
    try:
        serving = ctx.serving()
        plan = _read_plan(ctx, concept_id, version, serving)
        if plan is None:
            return
        # The whole job on its own thread count (one by default): its tensors are tiny, and it
        # runs beside searches (embedded mode) or other workers on the same cores.
        with cpu_threads(ctx.settings.threads.training):
            photos = _embed_photos(ctx, plan, serving)
            ctx.progress(_EMBED_SHARE)
            fitted = _fit(ctx, plan, serving, photos)
        _save(ctx, concept_id, version, fitted)
    except JobInterrupted:
        raise  # shutdown: the job runs again later and the concept stays `training`
    except Exception as e:  # not SystemExit & co: a killed worker's job is delivered again
        _mark_failed(ctx, concept_id, version, e)
        raise
