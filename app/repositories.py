"""Queries. Every lookup of a user-owned object filters by owner, so foreign ids look missing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, func, or_, select, update
from sqlalchemy.orm import Session, defer

from app.models import Adapter, ApiKey, Concept, ConceptExample, Image, Job, JobState, User


def get_user(*, db_session: Session, user_id: str) -> User | None:
    """A user by id."""
    return db_session.get(User, user_id)


def get_api_key(*, db_session: Session, key_id: str) -> ApiKey | None:
    """An API key by id."""
    return db_session.get(ApiKey, key_id)


def get_api_key_by_hash(*, db_session: Session, key_hash: str) -> ApiKey | None:
    """The key whose sha256 is `key_hash` (revoked or not)."""
    return db_session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash))


def bump_index_generation(*, db_session: Session, user_id: str) -> None:
    """Tell every API process that the user's embedded image set changed."""
    db_session.execute(
        update(User)
        .where(User.id == user_id)
        .values(index_generation=User.index_generation + 1)
        .execution_options(synchronize_session=False)
    )


def get_image(*, db_session: Session, user_id: str, image_id: str) -> Image | None:
    """One of the user's images (None for a missing or foreign id)."""
    return db_session.scalar(select(Image).where(Image.id == image_id, Image.user_id == user_id))


def get_image_by_sha256(*, db_session: Session, user_id: str, sha256: str) -> Image | None:
    """The user's image with this content, if any."""
    return db_session.scalar(select(Image).where(Image.user_id == user_id, Image.sha256 == sha256))


def list_images_page(
    *,
    db_session: Session,
    user_id: str,
    limit: int,
    after: tuple[datetime, str] | None = None,
) -> Sequence[Image]:
    """Up to `limit` images ordered by (created_at, id), strictly after the `after` key."""
    query = select(Image).where(Image.user_id == user_id)
    if after is not None:
        created_at, image_id = after
        query = query.where(
            or_(
                Image.created_at > created_at,
                and_(Image.created_at == created_at, Image.id > image_id),
            )
        )
    return db_session.scalars(query.order_by(Image.created_at, Image.id).limit(limit)).all()


def storage_path_in_use(*, db_session: Session, storage_path: str) -> bool:
    """Whether any row (any user, image or concept example) still points at this file."""
    in_images = exists().where(Image.storage_path == storage_path)
    in_examples = exists().where(ConceptExample.storage_path == storage_path)
    return bool(db_session.scalar(select(or_(in_images, in_examples))))


def add_job(*, db_session: Session, user_id: str, kind: str, payload: dict[str, Any]) -> Job:
    """A new queued job (flushed, so it has its id; the caller commits)."""
    job = Job(user_id=user_id, kind=kind, state=JobState.QUEUED.value, payload=payload)
    db_session.add(job)
    db_session.flush()
    return job


# --- search: what a query reads (app.services.search) -------------------------------------------

_IN_CHUNK = 900  # ids per IN (...): SQLite allows at most 999 bound parameters


def user_concepts(*, db_session: Session, user_id: str) -> list[Concept]:
    """Every concept of the user (any state)."""
    return list(db_session.scalars(select(Concept).where(Concept.user_id == user_id)))


def latest_adapters(*, db_session: Session, concept_ids: Sequence[str]) -> dict[str, Adapter]:
    """concept id -> its newest stored adapter: a concept keeps searching while it retrains."""
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


def adapter_photo_embeddings(
    *, db_session: Session, adapter: Adapter, model_id: str
) -> list[bytes]:
    """The stored photo embeddings (float32 bytes, `model_id`) the adapter was trained on."""
    blobs = db_session.scalars(
        select(ConceptExample.embedding).where(
            ConceptExample.concept_id == adapter.concept_id,
            ConceptExample.version_added <= adapter.version,
            ConceptExample.embedding_model == model_id,
            ConceptExample.embedding.is_not(None),
        )
    ).all()
    return [b for b in blobs if b is not None]


def image_vectors(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, tuple[bytes | None, bytes | None]]:
    """vec id -> (whole embedding, packed crop embeddings) of the user's images with those ids."""
    ids = list(vec_ids)
    found: dict[int, tuple[bytes | None, bytes | None]] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        query = select(Image.vec_id, Image.embedding, Image.region_embeddings).where(
            Image.user_id == user_id, Image.vec_id.in_(ids[start : start + _IN_CHUNK])
        )
        found.update((v, (e, r)) for v, e, r in db_session.execute(query))
    return found


def images_by_vec_id(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, Image]:
    """vec id -> the user's image, without its vectors (hits need metadata only)."""
    ids = list(vec_ids)
    found: dict[int, Image] = {}
    for start in range(0, len(ids), _IN_CHUNK):
        query = (
            select(Image)
            .options(defer(Image.embedding))  # crops are deferred by the model
            .where(Image.user_id == user_id, Image.vec_id.in_(ids[start : start + _IN_CHUNK]))
        )
        found.update((img.vec_id, img) for img in db_session.scalars(query))
    return found


def filtered_vec_ids(
    *,
    db_session: Session,
    user_id: str,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    mime: Sequence[str] = (),
) -> list[int]:
    """Vec ids of the user's images created in [after, before) with one of the MIME types."""
    query = select(Image.vec_id).where(Image.user_id == user_id)
    if created_after:
        query = query.where(Image.created_at >= created_after)
    if created_before:
        query = query.where(Image.created_at < created_before)
    if mime:
        query = query.where(Image.mime.in_(list(mime)))
    return list(db_session.scalars(query))


def count_unembedded_images(*, db_session: Session, user_id: str, model_id: str) -> int:
    """Images of the user not (yet) embedded by `model_id`."""
    query = (
        select(func.count())
        .select_from(Image)
        .where(
            Image.user_id == user_id,
            (Image.embedding_model.is_(None)) | (Image.embedding_model != model_id),
        )
    )
    return int(db_session.scalar(query) or 0)
