"""What a query reads (app.services.search): concepts, adapters, photo and image vectors."""

from __future__ import annotations

from collections.abc import Sequence, Set
from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func, select
from sqlalchemy.orm import Session, defer

from app.models import Adapter, Concept, ConceptExample, Image
from app.repositories.common import IN_CHUNK

# --- search: what a query reads (app.services.search) -------------------------------------------


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
    """The stored photo embeddings (float32 bytes, `model_id`) the adapter was trained on: its
    concept's photos and the library photos a person confirmed (its meta's `feedback`)."""
    taught, confirmed = adapter_photo_embeddings_by_kind(
        db_session=db_session, adapter=adapter, model_id=model_id
    )
    return taught + confirmed


def adapter_photo_embeddings_by_kind(
    *, db_session: Session, adapter: Adapter, model_id: str
) -> tuple[list[bytes], list[bytes]]:
    """(the concept's photos, the confirmed library photos) the adapter was trained on."""
    taught = db_session.scalars(
        select(ConceptExample.embedding).where(
            ConceptExample.concept_id == adapter.concept_id,
            ConceptExample.version_added <= adapter.version,
            ConceptExample.embedding_model == model_id,
            ConceptExample.embedding.is_not(None),
        )
    ).all()
    feedback = (adapter.meta or {}).get("feedback") or {}
    ids = [str(i) for i in feedback.get("confirmed") or []]
    confirmed: list[bytes | None] = []
    if ids:
        owner = select(Concept.user_id).where(Concept.id == adapter.concept_id).scalar_subquery()
        for start in range(0, len(ids), IN_CHUNK):
            confirmed += db_session.scalars(
                select(Image.embedding).where(
                    Image.user_id == owner,
                    Image.id.in_(ids[start : start + IN_CHUNK]),
                    Image.embedding_model == model_id,
                    Image.embedding.is_not(None),
                )
            ).all()
    return [b for b in taught if b is not None], [b for b in confirmed if b is not None]


def recent_image_embeddings(
    *, db_session: Session, user_id: str, model_id: str, exclude_sha256: Set[str], limit: int
) -> list[bytes]:
    """Whole-image embeddings (by `model_id`) of the user's most recent images, newest first,
    leaving out the given contents."""
    query = (
        select(Image.embedding, Image.sha256)
        .where(Image.user_id == user_id, Image.embedding_model == model_id)
        .order_by(Image.created_at.desc(), Image.id.desc())
        .limit(limit + len(exclude_sha256))
    )
    rows = db_session.execute(query).all()
    found = [e for e, sha in rows if e is not None and sha not in exclude_sha256]
    return found[:limit]


class ImageVectors(NamedTuple):
    """An image's stored vectors: its whole embedding and its packed region embeddings with the
    stored layout key that says what they are (app.ml.regions.stored_layout)."""

    embedding: bytes | None
    regions: bytes | None
    region_layout: str | None


def adapter_examples(
    *, db_session: Session, adapter: Adapter, model_id: str
) -> list[tuple[str, bytes]]:
    """(content hash, embedding) of the concept's photos the adapter was trained on."""
    rows = db_session.execute(
        select(ConceptExample.sha256, ConceptExample.embedding).where(
            ConceptExample.concept_id == adapter.concept_id,
            ConceptExample.version_added <= adapter.version,
            ConceptExample.embedding_model == model_id,
            ConceptExample.embedding.is_not(None),
        )
    )
    return [(h, e) for h, e in rows if e is not None]


def library_regions_by_hash(
    *, db_session: Session, user_id: str, model_id: str, hashes: Sequence[str]
) -> dict[str, ImageVectors]:
    """content hash -> the stored vectors of a library image of the user with that content,
    embedded by `model_id` (any one of them when several)."""
    ids = list(dict.fromkeys(hashes))
    found: dict[str, ImageVectors] = {}
    for start in range(0, len(ids), IN_CHUNK):
        query = select(
            Image.sha256, Image.embedding, Image.region_embeddings, Image.region_layout
        ).where(
            Image.user_id == user_id,
            Image.sha256.in_(ids[start : start + IN_CHUNK]),
            Image.embedding_model == model_id,
            Image.embedding.is_not(None),
        )
        found.update((h, ImageVectors(e, r, k)) for h, e, r, k in db_session.execute(query))
    return found


def image_vectors(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, ImageVectors]:
    """vec id -> the stored vectors of the user's images with those ids."""
    ids = list(vec_ids)
    found: dict[int, ImageVectors] = {}
    for start in range(0, len(ids), IN_CHUNK):
        query = select(
            Image.vec_id, Image.embedding, Image.region_embeddings, Image.region_layout
        ).where(Image.user_id == user_id, Image.vec_id.in_(ids[start : start + IN_CHUNK]))
        found.update((v, ImageVectors(e, r, k)) for v, e, r, k in db_session.execute(query))
    return found


def images_by_vec_id(
    *, db_session: Session, user_id: str, vec_ids: Sequence[int]
) -> dict[int, Image]:
    """vec id -> the user's image, without its vectors (hits need metadata only)."""
    ids = list(vec_ids)
    found: dict[int, Image] = {}
    for start in range(0, len(ids), IN_CHUNK):
        query = (
            select(Image)
            .options(defer(Image.embedding))  # crops are deferred by the model
            .where(Image.user_id == user_id, Image.vec_id.in_(ids[start : start + IN_CHUNK]))
        )
        found.update((img.vec_id, img) for img in db_session.scalars(query))
    return found


def filtered_vec_ids(
    *,
    db_session: Session,
    user_id: str,
    created_after: datetime | None = None,
    created_before: datetime | None = None,
    taken_after: datetime | None = None,
    taken_before: datetime | None = None,
    mime: Sequence[str] = (),
) -> list[int]:
    """Vec ids of the user's images uploaded and taken in the [after, before) ranges given, with
    one of the MIME types."""
    query = select(Image.vec_id).where(Image.user_id == user_id)
    if created_after:
        query = query.where(Image.created_at >= created_after)
    if created_before:
        query = query.where(Image.created_at < created_before)
    if taken_after:
        query = query.where(Image.taken_at >= taken_after)
    if taken_before:
        query = query.where(Image.taken_at < taken_before)
    if mime:
        query = query.where(Image.mime.in_(list(mime)))
    return list(db_session.scalars(query))


def count_unembedded_images(*, db_session: Session, user_id: str, model_id: str) -> int:
    """Images of the user not (yet) embedded by `model_id`, other than those whose file could
    not be read (embed_error): no pass embeds them until their file changes."""
    query = (
        select(func.count())
        .select_from(Image)
        .where(
            Image.user_id == user_id,
            (Image.embedding_model.is_(None)) | (Image.embedding_model != model_id),
            Image.embed_error.is_(None),
        )
    )
    return int(db_session.scalar(query) or 0)
