"""Library images: upload (validate, dedup, store, queue embedding), list, get, delete.

Upload is all-or-nothing: if any file of a request is bad, the request fails naming every bad
file, and nothing of it (rows, files, job) is stored. A file whose content the user already has
is not stored again: the existing image comes back marked `duplicate`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from app import repositories
from app.config import LimitSettings, TrainingSettings
from app.db import session_scope, transaction_lock
from app.errors import (
    Conflict,
    DomainError,
    FileFailure,
    InvalidImage,
    LibraryUnavailable,
    NotFound,
    StorageUnavailable,
    TooManyFiles,
    UploadRejected,
    ValidationFailed,
)
from app.models import Image, Job, JobKind, utcnow
from app.repositories import Page
from app.services.jobs import JobQueue, enqueue_committed
from app.storage import (
    BinaryStream,
    FileStamp,
    HeldFile,
    ImageStore,
    StagedImage,
    display_filename,
    is_gone_error,
    open_library_file,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class PhotoEnv:
    """What a request that stores photos or queues their jobs works with: its database session,
    the image store, the job queue, the limits, the training settings (a concept's photo
    range) and the library roots whose photos it may use."""

    db_session: Session
    store: ImageStore
    queue: JobQueue
    limits: LimitSettings = field(default_factory=LimitSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    library_roots: Sequence[Path] = ()


@dataclass(frozen=True)
class IncomingFile:
    """One uploaded file, independent of the web framework."""

    filename: str | None
    stream: BinaryStream
    modified_at: datetime | None = None  # the file's time on the client's disk, if it sent one


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


def upload_images(user_id: str, files: Sequence[IncomingFile], env: PhotoEnv) -> UploadOutcome:
    """Validate every file, then store them all (deduplicated) and queue one embed job."""
    db_session, store, limits, queue = env.db_session, env.store, env.limits, env.queue
    if not files:
        raise ValidationFailed("send at least one file in the form field 'files'")
    if len(files) > limits.max_files_per_request:
        raise TooManyFiles(
            f"{len(files)} files in one request; the limit is {limits.max_files_per_request}",
            detail={"max_files": limits.max_files_per_request},
        )
    staged = stage_all(files, store, limits)
    try:
        taken = [s.taken_at or f.modified_at for s, f in zip(staged, files, strict=True)]
        outcome = _persist(user_id, staged, taken, db_session=db_session, store=store)
    finally:
        for s in staged:
            store.discard(s)  # no-op for the committed ones
    enqueue_committed(queue, outcome.job)
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
            except StorageUnavailable:
                raise  # the server's disk, not this file: no point trying the others
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
    user_id: str,
    staged: Sequence[StagedImage],
    taken: Sequence[datetime | None],
    *,
    db_session: Session,
    store: ImageStore,
) -> UploadOutcome:
    """Move files into place and insert rows in one transaction; undo the files on failure.

    The user's uploads take turns here (`transaction_lock` on a key of the user): two requests
    with the same new bytes at the same moment would otherwise both find no row and both insert
    one, and the second would fail on the unique (user, sha256) key. With the lock the second
    finds the first's row and answers it as a duplicate. Only this short step is serialised;
    files are validated before it, side by side."""
    now = utcnow()
    created_paths: list[str] = []
    by_sha: dict[str, Image] = {}
    results: list[UploadedImage] = []
    try:
        transaction_lock(db_session, _upload_lock_key(user_id))
        for s, taken_at in zip(staged, taken, strict=True):
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
                taken_at=taken_at or now,
                created_at=now,
            )
            db_session.add(image)
            by_sha[s.sha256] = image
            results.append(UploadedImage(image, duplicate=False))
        # The same bytes sent again: an image whose file could not be read when it was
        # embedded (its stored original lost or damaged, now restored by store.commit) is
        # read again.
        retried = {img.id for img in by_sha.values() if img.embed_error is not None}
        for img in by_sha.values():
            if img.id in retried:
                img.embed_error = None
        db_session.flush()
        # Re-uploading an image whose embedding never arrived (failed job) embeds it again.
        pending = [img.id for img in by_sha.values() if img.embedding is None or img.id in retried]
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
        delete_unused_files(db_session, store, created_paths)
        if isinstance(e, IntegrityError):
            raise Conflict(
                "another request stored the same image at the same moment; retry this one"
            ) from e
        raise
    return UploadOutcome(images=results, job=job)


def _upload_lock_key(user_id: str) -> int:
    """The advisory lock key of a user's uploads: 64 bits of a hash of the id."""
    digest = hashlib.blake2b(f"polar-upload:{user_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def list_images(
    user_id: str,
    *,
    db_session: Session,
    limit: int,
    cursor: str | None = None,
    newest_first: bool = False,
) -> Page[Image]:
    """A page of the user's images, oldest (or newest) first; stable under concurrent uploads."""
    return repositories.list_images_page(
        db_session=db_session,
        user_id=user_id,
        limit=limit,
        cursor=cursor,
        newest_first=newest_first,
    )


def get_image(user_id: str, image_id: str, *, db_session: Session) -> Image:
    """One of the user's images; NotFound for a missing or foreign id alike."""
    image = repositories.get_image(db_session=db_session, user_id=user_id, image_id=image_id)
    if image is None:
        raise NotFound.of("image")
    return image


def original_file(
    user_id: str,
    image_id: str,
    *,
    db_session: Session,
    store: ImageStore,
    library_roots: Sequence[Path],
) -> tuple[Image, Path]:
    """One of the user's images and where its original bytes are: the store (uploads), or its
    folder (libraries indexed in place). A folder's file is opened here, inside the library
    and the allowed roots with no link followed on the way (`open_library_file`), and what
    comes back is that open file as a path (`HeldFile`: its stat and every open reach that
    file), so whoever reads it reads the file checked here, even if a folder on its path is
    swapped for a link to somewhere else meanwhile."""
    image = get_image(user_id, image_id, db_session=db_session)
    if image.source_path is not None and image.library_id is not None:
        library = repositories.get_library(
            db_session=db_session, user_id=user_id, library_id=image.library_id
        )
        try:
            if library is None:
                raise ValueError("its library is gone")
            real, f = open_library_file(image.source_path, library.path, list(library_roots))
        except FileNotFoundError as e:
            raise NotFound(
                "the photo is gone from its library folder; rescan the library",
                code="file_missing",
            ) from e
        except OSError as e:
            if is_gone_error(e):
                raise NotFound(
                    "the photo is no longer readable in its library folder; rescan the library",
                    code="file_missing",
                ) from e
            raise LibraryUnavailable(
                f"the photo's library folder cannot be read right now ({e.strerror or e}); "
                "try again once it is back (a network share may have dropped)"
            ) from e
        except (ValueError, InvalidImage) as e:  # InvalidImage: not a regular file
            raise NotFound(
                "the photo is no longer readable in its library folder; rescan the library",
                code="file_missing",
            ) from e
        try:
            return image, HeldFile.hold(f, real)
        except BaseException:
            f.close()
            raise
    path = store.path(image.storage_path)
    if not path.is_file():
        raise NotFound("the stored file is missing; upload the image again", code="file_missing")
    return image, path


def source_stamp(image: Image) -> FileStamp | None:
    """The stamp of the file a folder photo's last scan read (None: an upload)."""
    if image.source_size is None or image.source_mtime_ns is None:
        return None
    return FileStamp(
        image.source_size, image.source_mtime_ns, image.source_ctime_ns, image.source_ino
    )


def set_source_stamp(image: Image, st: os.stat_result) -> None:
    """Record `st` as the stat of the file the scan read for `image`."""
    stamp = FileStamp.of(st)
    image.source_size, image.source_mtime_ns = stamp.size, stamp.mtime_ns
    image.source_ctime_ns, image.source_ino = stamp.ctime_ns, stamp.ino


def ensure_unchanged(image: Image, st: os.stat_result) -> None:
    """Conflict `file_changed` unless a folder photo's file (`st`: its stat) is the one the
    library's last scan indexed (app.storage.FileStamp: size, mtime, ctime and inode): one
    changed since may now hold anything (another photo, a text file), not what the image's
    type, size, hash, ETag and embedding say. Uploads always pass."""
    stamp = source_stamp(image)
    if image.source_path is None or stamp is None:
        return
    if not stamp.same_file(st):
        raise Conflict(
            "the photo's file changed in its library folder since the library was last "
            "scanned; the next scan picks it up (the folder watcher starts one soon, or "
            f"POST /libraries/{image.library_id}/scan)",
            code="file_changed",
            detail={"library_id": image.library_id},
        )


def delete_image(user_id: str, image_id: str, *, db_session: Session, store: ImageStore) -> None:
    """Delete the row (the index drops it on its next reload) and the file if now unused."""
    image = get_image(user_id, image_id, db_session=db_session)
    storage_path = image.storage_path
    db_session.delete(image)
    repositories.bump_index_generation(db_session=db_session, user_id=user_id)
    db_session.commit()
    # After the commit: a concurrent upload of the same content either committed first (and
    # keeps the file) or re-creates it in store.commit.
    delete_unused_files(db_session, store, [storage_path])


# An original younger than this may belong to an upload whose row is not committed yet.
SWEEP_MIN_AGE_S = 3600.0
_SWEEP_LOG_PATHS = 20  # paths named in the sweep's log line; the rest are counted


def sweep_unreferenced_originals(
    session_factory: sessionmaker[Session],
    store: ImageStore,
    *,
    min_age_s: float = SWEEP_MIN_AGE_S,
    now: float | None = None,
) -> list[str]:
    """Delete stored originals (and their thumbnails) that no row references, older than
    `min_age_s` (an upload moved in place but interrupted before its commit, by a crash or a
    full disk); their storage paths, also logged.

    Only on the database's word: if it cannot be asked the error propagates and nothing is
    deleted, and a database that references no file at all while originals exist (the wrong
    database, or an empty one) is not believed: nothing is deleted either.
    """
    cutoff = (time.time() if now is None else now) - min_age_s
    candidates = [path for path, mtime in store.originals() if mtime < cutoff]
    if not candidates:
        return []
    with session_scope(session_factory) as s:
        referenced = repositories.referenced_storage_paths(db_session=s)
    if not referenced:
        log.warning(
            "startup sweep skipped: the database references no stored file, yet %d "
            "original(s) are stored; check POLAR_DATABASE_URL",
            len(candidates),
        )
        return []
    removed = [p for p in candidates if p not in referenced and store.delete_if_older(p, cutoff)]
    if removed:
        named = ", ".join(removed[:_SWEEP_LOG_PATHS])
        more = len(removed) - _SWEEP_LOG_PATHS
        log.warning("startup sweep removed %d original(s) that no row references: %s%s",
                    len(removed), named, f" and {more} more" if more > 0 else "")  # fmt: skip
    return removed


def delete_unused_files(db_session: Session, store: ImageStore, paths: Sequence[str]) -> None:
    """Delete each stored file that no row (any user, image or concept photo) points at."""
    for path in paths:
        if not repositories.storage_path_in_use(db_session=db_session, storage_path=path):
            store.delete(path)
