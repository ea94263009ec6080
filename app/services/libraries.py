"""Libraries: folders under an allowed root, indexed in place (no copy) by `scan_library` jobs.

The use cases on the `libraries` rows: add one (its folder confined by
app/services/library_paths.py, its first scan queued), read, list, ask for a scan, delete. What
a scan does is app/services/library_scan.py.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app import repositories
from app.config import Settings
from app.db import transaction_lock
from app.errors import Conflict, NotFound
from app.models import Job, JobKind, Library
from app.services.images import delete_unused_files
from app.services.jobs import JobQueue, enqueue_committed
from app.services.library_paths import (
    check_ownership,
    confine_folder,
    library_taken,
    own_overlap,
    refuse_other_users,
    unusable_path,
)

# The lock that makes "no library overlaps this folder" and the insert one step (any constant;
# the same in every process on one database).
_ADD_LIBRARY_LOCK_KEY = 0x504F4C4C4942  # "POLLIB"


def add_library(
    user_id: str, raw_path: str, *, db_session: Session, settings: Settings, queue: JobQueue
) -> tuple[Library, Job]:
    """Register a folder and queue its first scan (commits).

    The last overlap checks (by name and by identity) and the insert run under one lock
    (`transaction_lock`) that every add takes, so two adds of overlapping folders at the same
    moment (two users, or one user twice, under one name or two) cannot both pass the check:
    the second waits for the first to commit, then sees its library and gets the 409."""
    folder = confine_folder(raw_path, settings, db_session=db_session, user_id=user_id)
    try:
        transaction_lock(db_session, _ADD_LIBRARY_LOCK_KEY)
        for other in repositories.libraries_overlapping(db_session=db_session, path=str(folder)):
            if other.user_id != user_id:
                raise library_taken()
            raise Conflict(
                f"this folder overlaps your library {other.id} ({other.path})",
                code="library_overlaps",
                detail={"library_id": other.id},
            )
        refuse_other_users(db_session, user_id, folder)
        try:
            check_ownership(db_session, user_id, folder, settings)
            own = own_overlap(db_session, user_id, folder)
        except OSError as e:
            raise unusable_path(e) from None
        if own is not None:
            raise Conflict(
                f"this folder is your library {own.id} ({own.path}), inside it or around it, "
                "under another name (a bind mount, or another case on a case-insensitive share)",
                code="library_overlaps",
                detail={"library_id": own.id},
            )
        library = Library(user_id=user_id, path=str(folder), scan_generation=0)
        db_session.add(library)
        db_session.flush()
        job = _add_scan_job(db_session, library)
        db_session.commit()
    except BaseException:
        db_session.rollback()  # releases the lock at once, whoever closes the session
        raise
    enqueue_committed(queue, job)
    return library, job


def _add_scan_job(db_session: Session, library: Library) -> Job:
    return repositories.add_job(
        db_session=db_session,
        user_id=library.user_id,
        kind=JobKind.SCAN_LIBRARY.value,
        payload={"library_id": library.id},
    )


def get_library(user_id: str, library_id: str, *, db_session: Session) -> Library:
    library = repositories.get_library(
        db_session=db_session, user_id=user_id, library_id=library_id
    )
    if library is None:
        raise NotFound.of("library")
    return library


def list_libraries(user_id: str, *, db_session: Session) -> list[Library]:
    return repositories.list_libraries(db_session=db_session, user_id=user_id)


def request_scan(
    user_id: str, library_id: str, *, db_session: Session, queue: JobQueue
) -> tuple[Job, bool]:
    """Queue a scan, or return the one already queued or running; (job, created). Commits.

    The library's row is locked first, so that two requests at once (a user and the library
    monitor, two workers' monitors) queue one scan between them.
    """
    library = repositories.get_library(
        db_session=db_session, user_id=user_id, library_id=library_id, for_update=True
    )
    if library is None:
        raise NotFound.of("library")
    open_job = repositories.open_scan_job(db_session=db_session, library=library)
    if open_job is not None:
        return open_job, False
    job = _add_scan_job(db_session, library)
    db_session.commit()
    enqueue_committed(queue, job)
    return job, True


def delete_library(user_id: str, library_id: str, *, db_session: Session, store: Any) -> None:
    """Forget a library: its images leave the index; its files are never touched."""
    library = get_library(user_id, library_id, db_session=db_session)
    paths = repositories.library_storage_paths(db_session=db_session, library_id=library.id)
    repositories.delete_library_images(db_session=db_session, library_id=library.id)
    db_session.delete(library)
    repositories.bump_index_generation(db_session=db_session, user_id=user_id)
    db_session.commit()
    delete_unused_files(db_session, store, paths)  # cached thumbnails only
