"""Library images: upload (validate, dedup, store, queue embedding), list, get, delete.

Upload is all-or-nothing: if any file of a request is bad, the request fails naming every bad
file, and nothing of it (rows, files, job) is stored. A file whose content the user already has
is not stored again: the existing image comes back marked `duplicate`.
"""

from __future__ import annotations

import base64
import binascii
import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import LimitSettings
from app.errors import (
    Conflict,
    DomainError,
    FileFailure,
    InvalidCursor,
    NotFound,
    TooManyFiles,
    UploadRejected,
    ValidationFailed,
)
from app.models import Image, Job, JobKind
from app.storage import BinaryStream, ImageStore, StagedImage, display_filename

log = logging.getLogger(__name__)

# Called with each newly created job after its row is committed. The lead wires it to the job
# dispatcher (app.services.jobs); None = jobs stay queued for someone else to pick up.
on_job_created: Callable[[Job], None] | None = None


@dataclass(frozen=True)
class IncomingFile:
    """One uploaded file, independent of the web framework."""

    filename: str | None
    stream: BinaryStream


@dataclass(frozen=True)
class UploadedImage:
    """An image in an upload's answer; `duplicate`: the user already had this content."""

    image: Image
    duplicate: bool


@dataclass(frozen=True)
class UploadOutcome:
    """Result of an upload: one entry per file, in request order, and the embed job if any."""

    images: list[UploadedImage]
    job: Job | None


@dataclass(frozen=True)
class ImagePage:
    """One page of a listing; `next_cursor` is None on the last page."""

    items: Sequence[Image]
    next_cursor: str | None


def upload_images(
    user_id: str,
    files: Sequence[IncomingFile],
    *,
    db_session: Session,
    store: ImageStore,
    limits: LimitSettings,
) -> UploadOutcome:
    """Validate every file, then store them all (deduplicated) and queue one embed job."""
    if not files:
        raise ValidationFailed("send at least one file in the form field 'files'")
    if len(files) > limits.max_files_per_request:
        raise TooManyFiles(
            f"{len(files)} files in one request; the limit is {limits.max_files_per_request}",
            detail={"max_files": limits.max_files_per_request},
        )
    staged = stage_all(files, store, limits)
    try:
        outcome = _persist(user_id, staged, db_session=db_session, store=store)
    finally:
        for s in staged:
            store.discard(s)  # no-op for the committed ones
    if outcome.job is not None and on_job_created is not None:
        try:
            on_job_created(outcome.job)
        except Exception:
            # The rows are committed and the job is queued in the database; failing the request
            # now would make the client retry an upload that succeeded.
            log.exception("dispatching job %s failed; it stays queued", outcome.job.id)
    return outcome


def stage_all(
    files: Sequence[IncomingFile], store: ImageStore, limits: LimitSettings
) -> list[StagedImage]:
    """Validate and stage every file; UploadRejected naming each bad one (nothing kept) if any."""
    staged: list[StagedImage] = []
    failures: list[FileFailure] = []
    try:
        for index, f in enumerate(files):
            try:
                staged.append(
                    store.stage(
                        f.stream,
                        f.filename,
                        max_bytes=limits.max_upload_bytes,
                        max_pixels=limits.max_pixels,
                    )
                )
            except DomainError as e:
                failures.append(FileFailure(index, display_filename(f.filename), e))
        if failures:
            raise UploadRejected(failures, total=len(files))
    except BaseException:
        for s in staged:
            store.discard(s)
        raise
    return staged


def _persist(
    user_id: str, staged: Sequence[StagedImage], *, db_session: Session, store: ImageStore
) -> UploadOutcome:
    """Move files into place and insert rows in one transaction; undo the files on failure."""
    created_paths: list[str] = []
    by_sha: dict[str, Image] = {}
    results: list[UploadedImage] = []
    try:
        for s in staged:
            # Committing a duplicate too restores its file if it went missing.
            storage_path, created = store.commit(s)
            if created:
                created_paths.append(storage_path)
            image = by_sha.get(s.sha256) or repositories.get_image_by_sha256(
                db_session=db_session, user_id=user_id, sha256=s.sha256
            )
            if image is not None:
                results.append(UploadedImage(image, duplicate=True))
                by_sha[s.sha256] = image
                continue
            image = Image(
                id=str(uuid.uuid4()),
                user_id=user_id,
                sha256=s.sha256,
                original_filename=s.filename,
                mime=s.mime,
                size_bytes=s.size_bytes,
                width=s.width,
                height=s.height,
                storage_path=storage_path,
            )
            db_session.add(image)
            by_sha[s.sha256] = image
            results.append(UploadedImage(image, duplicate=False))
        db_session.flush()
        # Re-uploading an image whose embedding never arrived (failed job) embeds it again.
        pending = [img.id for img in by_sha.values() if img.embedding is None]
        job = None
        if pending:
            job = repositories.add_job(
                db_session=db_session,
                user_id=user_id,
                kind=JobKind.EMBED_IMAGES.value,
                payload={"image_ids": pending},
            )
        db_session.commit()
    except BaseException as e:
        db_session.rollback()
        for path in created_paths:
            if not repositories.storage_path_in_use(db_session=db_session, storage_path=path):
                store.delete(path)
        if isinstance(e, IntegrityError):
            raise Conflict(
                "another request stored the same image at the same moment; retry this one"
            ) from e
        raise
    return UploadOutcome(images=results, job=job)


def encode_cursor(image: Image) -> str:
    """Opaque cursor pointing just after `image` in (created_at, id) order."""
    raw = f"{image.created_at.isoformat()}|{image.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """The (created_at, id) key inside a cursor; InvalidCursor if we did not make it."""
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        stamp, image_id = raw.split("|")
        created_at = datetime.fromisoformat(stamp)
        uuid.UUID(image_id)
    except (binascii.Error, UnicodeDecodeError, ValueError) as e:
        raise InvalidCursor("malformed cursor: pass back next_cursor unchanged") from e
    if created_at.tzinfo is None:
        raise InvalidCursor("malformed cursor: pass back next_cursor unchanged")
    return created_at, image_id


def list_images(
    user_id: str, *, db_session: Session, limit: int, cursor: str | None = None
) -> ImagePage:
    """A page of the user's images, oldest first; stable under concurrent uploads."""
    after = decode_cursor(cursor) if cursor else None
    rows = repositories.list_images_page(
        db_session=db_session, user_id=user_id, limit=limit + 1, after=after
    )
    items = rows[:limit]
    next_cursor = encode_cursor(items[-1]) if len(rows) > limit else None
    return ImagePage(items=items, next_cursor=next_cursor)


def get_image(user_id: str, image_id: str, *, db_session: Session) -> Image:
    """One of the user's images; NotFound for a missing or foreign id alike."""
    image = repositories.get_image(db_session=db_session, user_id=user_id, image_id=image_id)
    if image is None:
        raise NotFound.of("image")
    return image


def delete_image(user_id: str, image_id: str, *, db_session: Session, store: ImageStore) -> None:
    """Delete the row (the index drops it on its next reload) and the file if now unused."""
    image = get_image(user_id, image_id, db_session=db_session)
    storage_path = image.storage_path
    db_session.delete(image)
    repositories.bump_index_generation(db_session=db_session, user_id=user_id)
    db_session.commit()
    # After the commit: a concurrent upload of the same content either committed first (and
    # keeps the file) or re-creates it in store.commit.
    if not repositories.storage_path_in_use(db_session=db_session, storage_path=storage_path):
        store.delete(storage_path)
