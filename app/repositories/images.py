"""Images: one user's photos, by id, content hash or page, and the stored files rows point at."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import exists, or_, select
from sqlalchemy.orm import Session, defer

from app.models import ConceptExample, Image
from app.repositories.common import IN_CHUNK, Page, keyset_page


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
    cursor: str | None = None,
    newest_first: bool = False,
) -> Page[Image]:
    """A page of the user's images, oldest (or newest) first."""
    return keyset_page(
        db_session,
        select(Image).where(Image.user_id == user_id),
        created_at=Image.created_at,
        row_id=Image.id,
        limit=limit,
        cursor=cursor,
        newest_first=newest_first,
    )


def get_images(*, db_session: Session, user_id: str, image_ids: Sequence[str]) -> dict[str, Image]:
    """id -> the user's image, for those of `image_ids` that exist and are the user's."""
    ids = list(dict.fromkeys(image_ids))
    found: dict[str, Image] = {}
    for start in range(0, len(ids), IN_CHUNK):
        query = (
            select(Image)
            .options(defer(Image.embedding))
            .where(Image.user_id == user_id, Image.id.in_(ids[start : start + IN_CHUNK]))
        )
        found.update((img.id, img) for img in db_session.scalars(query))
    return found


def storage_path_in_use(*, db_session: Session, storage_path: str) -> bool:
    """Whether any row (any user, image or concept example) still points at this file."""
    in_images = exists().where(Image.storage_path == storage_path)
    in_examples = exists().where(ConceptExample.storage_path == storage_path)
    return bool(db_session.scalar(select(or_(in_images, in_examples))))


def referenced_storage_paths(*, db_session: Session) -> set[str]:
    """Every stored file some row points at (any user, images and concept examples)."""
    return set(db_session.scalars(select(Image.storage_path).distinct())) | set(
        db_session.scalars(select(ConceptExample.storage_path).distinct())
    )
