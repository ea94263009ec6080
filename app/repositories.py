"""Queries. Every lookup of a user-owned object filters by owner, so foreign ids look missing."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import and_, exists, or_, select, update
from sqlalchemy.orm import Session

from app.models import ApiKey, ConceptExample, Image, Job, JobState, User


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
