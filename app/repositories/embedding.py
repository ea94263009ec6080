"""What embedding reads and writes (app.services.embedding), and the vector index's reads
(app.services.index)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from sqlalchemy import case, func, or_, select, update
from sqlalchemy.orm import Session

from app.models import Image, Job, JobKind, JobState, Library, User

# --- embedding: what app.services.embedding reads and writes -----------------------------------


class ImageSourceRow(NamedTuple):
    """Where an image's bytes are: its stored original, or its library file and that file's
    stamp as the last scan saw it."""

    id: str
    storage_path: str
    source_path: str | None
    library_path: str | None
    source_size: int | None
    source_mtime_ns: int | None
    source_ctime_ns: int | None
    source_ino: int | None


def images_to_embed(
    *,
    db_session: Session,
    user_id: str,
    model_id: str,
    image_ids: Sequence[str] | None,
    region_key: str | None = None,
) -> list[ImageSourceRow]:
    """The user's images (among `image_ids`; None: all) whose file has not failed to read
    (embed_error), oldest first: those lacking an embedding by `model_id` or, with
    `region_key`, those embedded by it whose regions are not stored as `region_key`."""
    current = Image.embedding_model == model_id
    readable = Image.embed_error.is_(None)
    if region_key is None:
        wanted = [or_(Image.embedding.is_(None), ~current), readable]
    else:
        stale = or_(Image.region_layout.is_(None), Image.region_layout != region_key)
        wanted = [current, stale, readable]
    query = (
        select(
            Image.id,
            Image.storage_path,
            Image.source_path,
            Library.path,
            Image.source_size,
            Image.source_mtime_ns,
            Image.source_ctime_ns,
            Image.source_ino,
        )
        .outerjoin(Library, Library.id == Image.library_id)
        .where(Image.user_id == user_id, *wanted)
    )
    if image_ids is not None:
        query = query.where(Image.id.in_(list(image_ids)))
    rows = db_session.execute(query.order_by(Image.created_at, Image.id))
    return [ImageSourceRow(*row) for row in rows]


def store_embedding(
    *,
    db_session: Session,
    user_id: str,
    image_id: str,
    embedding: bytes,
    model_id: str,
    vec_id: int,
    region_embeddings: bytes | None,
    region_layout: str | None,
) -> None:
    """An image's new embedding (a row deleted meanwhile matches nothing); its regions with it
    (None drops those of another model)."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id)
        .values(
            embedding=embedding,
            embedding_model=model_id,
            vec_id=vec_id,
            region_embeddings=region_embeddings,
            region_layout=region_layout,
        )
    )


def store_regions(
    *,
    db_session: Session,
    user_id: str,
    image_id: str,
    model_id: str,
    region_embeddings: bytes,
    region_layout: str,
) -> None:
    """An image's region rows, only next to an embedding of `model_id` (a model switch may
    race)."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id, Image.embedding_model == model_id)
        .values(region_embeddings=region_embeddings, region_layout=region_layout)
    )


def set_embed_error(
    *, db_session: Session, user_id: str, image_id: str, reason: str, transient: bool
) -> None:
    """Why an image's file could not be read, and whether that may pass."""
    db_session.execute(
        update(Image)
        .where(Image.id == image_id, Image.user_id == user_id)
        .values(embed_error=reason, embed_error_transient=transient)
    )


def clear_embed_errors(*, db_session: Session, user_id: str) -> None:
    """Every image of the user is readable again, as far as embedding knows."""
    db_session.execute(
        update(Image)
        .where(Image.user_id == user_id, Image.embed_error.is_not(None))
        .values(embed_error=None, embed_error_transient=None)
    )


def stored_regions(
    *, db_session: Session, user_id: str, image_ids: Sequence[str]
) -> list[tuple[str, bytes | None, str | None]]:
    """(id, region rows, region_layout) of those of the user's images that have regions."""
    rows = db_session.execute(
        select(Image.id, Image.region_embeddings, Image.region_layout).where(
            Image.id.in_(list(image_ids)),
            Image.user_id == user_id,
            Image.region_layout.is_not(None),
        )
    )
    return [(i, blob, key) for i, blob, key in rows]


class IndexCounts(NamedTuple):
    images: int
    embedded: int  # by the model asked about
    with_regions: int  # ... and with regions of the layout asked about
    failed: int  # not embedded by it, and its file could not be read


def index_counts(*, db_session: Session, user_id: str, model_id: str, layout: str) -> IndexCounts:
    """How many of the user's images `model_id` can search, and how well (one query)."""
    current = Image.embedding_model == model_id
    failed = Image.embed_error.is_not(None) & or_(
        Image.embedding_model.is_(None), Image.embedding_model != model_id
    )
    row = db_session.execute(
        select(
            func.count(),
            func.count(case((current, 1))),
            func.count(case((current & (Image.region_layout == layout), 1))),
            func.count(case((failed, 1))),
        ).where(Image.user_id == user_id)
    ).one()
    return IndexCounts(int(row[0]), int(row[1]), int(row[2]), int(row[3]))


def open_rebuild_job(*, db_session: Session, user_id: str) -> Job | None:
    """The user's newest queued or running `rebuild_index` job, if any."""
    return db_session.scalars(
        select(Job)
        .where(
            Job.user_id == user_id,
            Job.kind == JobKind.REBUILD_INDEX.value,
            Job.state.in_([JobState.QUEUED.value, JobState.RUNNING.value]),
        )
        .order_by(Job.created_at.desc())
        .limit(1)
    ).first()


# --- the vector index: what app.services.index reads ------------------------------------------


def index_generation(*, db_session: Session, user_id: str) -> int | None:
    """The user's index generation (bumped by every change to their searchable images); None
    for a missing user."""
    return db_session.scalar(select(User.index_generation).where(User.id == user_id))


def _embedded_by(user_id: str, model_id: str) -> tuple[Any, ...]:
    """The user's images that carry an embedding of `model_id`."""
    return (
        Image.user_id == user_id,
        Image.embedding_model == model_id,
        Image.embedding.is_not(None),
    )


def stream_embeddings(
    *, db_session: Session, user_id: str, model_id: str
) -> Iterator[tuple[int, bytes | None]]:
    """(vec_id, embedding) of every image of the user embedded by `model_id`, streamed from the
    database 2000 rows at a time."""
    rows = db_session.execute(
        select(Image.vec_id, Image.embedding)
        .where(*_embedded_by(user_id, model_id))
        .execution_options(yield_per=2000)
    )
    return iter(rows.tuples())


def embedded_vec_ids(*, db_session: Session, user_id: str, model_id: str) -> Iterable[int]:
    """The vec_ids of the user's images embedded by `model_id`."""
    return db_session.scalars(select(Image.vec_id).where(*_embedded_by(user_id, model_id)))


def embedded_region_layouts(
    *, db_session: Session, user_id: str, model_id: str
) -> list[tuple[int, str | None]]:
    """(vec_id, region_layout) of every image of the user embedded by `model_id`: which vectors
    there are and whether their regions are stored yet (the regions follow in a second pass,
    under the same vec_id)."""
    rows = db_session.execute(
        select(Image.vec_id, Image.region_layout).where(*_embedded_by(user_id, model_id))
    )
    return [(int(v), k) for v, k in rows]


def embeddings_of(
    *, db_session: Session, user_id: str, model_id: str, vec_ids: list[int]
) -> list[tuple[int, bytes | None]]:
    """(vec_id, embedding) of those of `vec_ids` (at most a few hundred: one IN list) that
    name an image of the user embedded by `model_id`."""
    rows = db_session.execute(
        select(Image.vec_id, Image.embedding).where(
            *_embedded_by(user_id, model_id), Image.vec_id.in_(vec_ids)
        )
    )
    return [(v, b) for v, b in rows]
