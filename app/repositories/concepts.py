"""Concepts, their photos and adapters (app.services.concepts, app.services.training), and the
verdicts a person gives library photos for them (docs/ALBUMS.md)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, defer

from app.models import (
    Adapter,
    Concept,
    ConceptExample,
    ConceptState,
    ConceptVerdict,
    Image,
    Job,
    JobKind,
    Verdict,
)
from app.repositories.common import IN_CHUNK, Page, keyset_page

# --- concepts -----------------------------------------------------------------------------------


def get_concept(
    *, db_session: Session, user_id: str, concept_id: str, lock: bool = False
) -> Concept | None:
    """One of the user's concepts; `lock` re-reads it under a row lock (SELECT ... FOR UPDATE)."""
    query = select(Concept).where(Concept.id == concept_id, Concept.user_id == user_id)
    if lock:  # another request may have just bumped the version: take the row as it is now
        query = query.with_for_update().execution_options(populate_existing=True)
    return db_session.scalar(query)


def concept_name_taken(
    *, db_session: Session, user_id: str, name_key: str, except_id: str | None = None
) -> bool:
    """Whether another of the user's concepts has this normalised name."""
    query = select(Concept.id).where(Concept.user_id == user_id, Concept.name_key == name_key)
    if except_id is not None:
        query = query.where(Concept.id != except_id)
    return db_session.scalar(query.limit(1)) is not None


def list_concepts_page(
    *, db_session: Session, user_id: str, limit: int, cursor: str | None = None
) -> Page[Concept]:
    """A page of the user's concepts, oldest first."""
    return keyset_page(
        db_session,
        select(Concept).where(Concept.user_id == user_id),
        created_at=Concept.created_at,
        row_id=Concept.id,
        limit=limit,
        cursor=cursor,
    )


def example_counts(*, db_session: Session, concept_ids: Sequence[str]) -> dict[str, int]:
    """concept id -> number of photos (concepts without photos are absent)."""
    rows = db_session.execute(
        select(ConceptExample.concept_id, func.count())
        .where(ConceptExample.concept_id.in_(concept_ids))
        .group_by(ConceptExample.concept_id)
    ).all()
    return {concept_id: int(n) for concept_id, n in rows}


def example_hashes(*, db_session: Session, concept_id: str) -> set[str]:
    """The content hashes of a concept's photos."""
    return set(
        db_session.scalars(
            select(ConceptExample.sha256).where(ConceptExample.concept_id == concept_id)
        )
    )


def list_examples(*, db_session: Session, concept_id: str) -> list[ConceptExample]:
    """A concept's photos, oldest first, without their embeddings."""
    query = (
        select(ConceptExample)
        .options(defer(ConceptExample.embedding))
        .where(ConceptExample.concept_id == concept_id)
        .order_by(ConceptExample.created_at, ConceptExample.id)
    )
    return list(db_session.scalars(query))


def get_example(
    *, db_session: Session, user_id: str, concept_id: str, example_id: str
) -> ConceptExample | None:
    """One photo of one of the user's concepts (None for a missing or foreign id)."""
    query = (
        select(ConceptExample)
        .options(defer(ConceptExample.embedding))
        .join(Concept, Concept.id == ConceptExample.concept_id)
        .where(
            ConceptExample.id == example_id,
            ConceptExample.concept_id == concept_id,
            Concept.user_id == user_id,
        )
    )
    return db_session.scalar(query)


def example_storage_paths(*, db_session: Session, concept_id: str) -> list[str]:
    """The stored files of a concept's photos, sorted."""
    return sorted(
        set(
            db_session.scalars(
                select(ConceptExample.storage_path).where(ConceptExample.concept_id == concept_id)
            )
        )
    )


def current_training_jobs(*, db_session: Session, concepts: Sequence[Concept]) -> dict[str, str]:
    """concept id -> id of the newest job training its current version (one user's concepts)."""
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


def delete_concept(*, db_session: Session, concept_id: str) -> None:
    """Core DELETE; the database cascades to photos and adapters (ON DELETE CASCADE)."""
    db_session.execute(
        delete(Concept).where(Concept.id == concept_id).execution_options(synchronize_session=False)
    )


# Training (app.services.training): a concept version's photos, tokens and adapter.


def other_concept_tokens(*, db_session: Session, user_id: str, concept_id: str) -> set[str]:
    """The tokens of the user's other concepts."""
    return set(
        db_session.scalars(
            select(Concept.token).where(Concept.user_id == user_id, Concept.id != concept_id)
        )
    )


def get_adapter(*, db_session: Session, concept_id: str, version: int) -> Adapter | None:
    """The adapter stored for one version of a concept, if any."""
    return db_session.scalar(
        select(Adapter).where(Adapter.concept_id == concept_id, Adapter.version == version)
    )


def examples_up_to(*, db_session: Session, concept_id: str, version: int) -> list[ConceptExample]:
    """A concept's photos added up to `version`, oldest first, with their embeddings."""
    return list(
        db_session.scalars(
            select(ConceptExample)
            .where(ConceptExample.concept_id == concept_id, ConceptExample.version_added <= version)
            .order_by(ConceptExample.created_at, ConceptExample.id)
        ).all()
    )


def store_example_embedding(
    *, db_session: Session, example_id: str, embedding: bytes, model_id: str
) -> None:
    """A concept photo's embedding, by `model_id`."""
    db_session.execute(
        update(ConceptExample)
        .where(ConceptExample.id == example_id)
        .values(embedding=embedding, embedding_model=model_id)
    )


def fail_concept_version(
    *, db_session: Session, concept_id: str, version: int, metrics: dict[str, Any]
) -> None:
    """The concept -> failed (`metrics` says why), if `version` is still its current one."""
    db_session.execute(
        update(Concept)
        .where(Concept.id == concept_id, Concept.version == version)
        .values(state=ConceptState.FAILED.value, metrics=metrics)
    )


# --- concept verdicts: a person's marks on library photos (docs/ALBUMS.md) ---------------------


def active_verdict(
    *, db_session: Session, concept_id: str, image_id: str, lock: bool = False
) -> ConceptVerdict | None:
    """The photo's current mark for the concept, if any."""
    query = select(ConceptVerdict).where(
        ConceptVerdict.concept_id == concept_id,
        ConceptVerdict.image_id == image_id,
        ConceptVerdict.ended_at.is_(None),
    )
    return db_session.scalar(query.with_for_update() if lock else query)


def active_verdicts(*, db_session: Session, concept_id: str) -> dict[str, ConceptVerdict]:
    """image id -> its current mark for the concept."""
    rows = db_session.scalars(
        select(ConceptVerdict).where(
            ConceptVerdict.concept_id == concept_id, ConceptVerdict.ended_at.is_(None)
        )
    )
    return {v.image_id: v for v in rows}


def rejected_vec_ids(*, db_session: Session, user_id: str, concept_ids: Sequence[str]) -> set[int]:
    """FAISS ids of the user's images with an active "not it" mark for any of the concepts."""
    if not concept_ids:
        return set()
    rows = db_session.scalars(
        select(Image.vec_id)
        .join(ConceptVerdict, ConceptVerdict.image_id == Image.id)
        .where(
            ConceptVerdict.user_id == user_id,
            Image.user_id == user_id,
            ConceptVerdict.concept_id.in_(list(concept_ids)),
            ConceptVerdict.verdict == Verdict.REJECTED,
            ConceptVerdict.ended_at.is_(None),
            Image.vec_id.is_not(None),
        )
    )
    return {int(v) for v in rows}


def image_verdicts(*, db_session: Session, user_id: str, image_id: str) -> dict[str, str]:
    """concept id -> the image's current verdict for it, over the user's concepts."""
    rows = db_session.execute(
        select(ConceptVerdict.concept_id, ConceptVerdict.verdict).where(
            ConceptVerdict.user_id == user_id,
            ConceptVerdict.image_id == image_id,
            ConceptVerdict.ended_at.is_(None),
        )
    )
    return {str(cid): str(verdict) for cid, verdict in rows.all()}


def verdict_history_page(
    *, db_session: Session, concept_id: str, limit: int, cursor: str | None = None
) -> Page[ConceptVerdict]:
    """Every mark of the concept, ended ones too, newest first."""
    return keyset_page(
        db_session,
        select(ConceptVerdict).where(ConceptVerdict.concept_id == concept_id),
        created_at=ConceptVerdict.created_at,
        row_id=ConceptVerdict.id,
        limit=limit,
        cursor=cursor,
        newest_first=True,
    )


class MarkedEmbedding(NamedTuple):
    """A marked library photo's embedding, for training."""

    image_id: str
    verdict: str
    sha256: str
    embedding: bytes


def verdict_embeddings(
    *, db_session: Session, concept_id: str, model_id: str, limit: int
) -> list[MarkedEmbedding]:
    """The concept's currently marked photos embedded by `model_id`, oldest mark first; at most
    `limit` per verdict (the most recent)."""
    out: list[MarkedEmbedding] = []
    for verdict in ("confirmed", "rejected"):
        rows = db_session.execute(
            select(ConceptVerdict.image_id, Image.sha256, Image.embedding)
            .join(Image, Image.id == ConceptVerdict.image_id)
            .where(
                ConceptVerdict.concept_id == concept_id,
                ConceptVerdict.ended_at.is_(None),
                ConceptVerdict.verdict == verdict,
                Image.embedding_model == model_id,
                Image.embedding.is_not(None),
            )
            .order_by(ConceptVerdict.created_at.desc(), ConceptVerdict.id.desc())
            .limit(limit)
        ).all()
        out += [
            MarkedEmbedding(i, verdict, sha, e) for i, sha, e in reversed(rows) if e is not None
        ]
    return out


def taught_library_images(*, db_session: Session, user_id: str, concept_id: str) -> list[Image]:
    """The user's library images with the same content as one of the concept's photos."""
    hashes = select(ConceptExample.sha256).where(ConceptExample.concept_id == concept_id)
    return list(
        db_session.scalars(
            select(Image)
            .options(defer(Image.embedding))
            .where(Image.user_id == user_id, Image.sha256.in_(hashes))
        )
    )


def concepts_taught_with(*, db_session: Session, user_id: str, sha256: str) -> set[str]:
    """Ids of the user's concepts with a photo of this content."""
    return set(
        db_session.scalars(
            select(ConceptExample.concept_id)
            .join(Concept, Concept.id == ConceptExample.concept_id)
            .where(Concept.user_id == user_id, ConceptExample.sha256 == sha256)
        )
    )


def image_embeddings_by_id(
    *, db_session: Session, user_id: str, image_ids: Sequence[str], model_id: str
) -> dict[str, np.ndarray]:
    """image id -> its embedding by `model_id`, (D,), for the user's images that have one."""
    ids = list(dict.fromkeys(image_ids))
    found: dict[str, np.ndarray] = {}
    for start in range(0, len(ids), IN_CHUNK):
        rows = db_session.execute(
            select(Image.id, Image.embedding).where(
                Image.user_id == user_id,
                Image.id.in_(ids[start : start + IN_CHUNK]),
                Image.embedding_model == model_id,
                Image.embedding.is_not(None),
            )
        )
        found.update((i, np.frombuffer(e, np.float32)) for i, e in rows if e is not None)
    return found
