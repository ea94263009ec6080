"""Libraries: their rows, the folders their scans walked, and the images indexed from them
(app.services.libraries, app.services.library_scan)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import PurePath
from typing import Any

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session

from app.models import Image, Job, JobKind, JobState, Library, LibraryFolder
from app.repositories.common import IN_CHUNK

# --- libraries ------------------------------------------------------------------------------------


def get_library(
    *, db_session: Session, user_id: str, library_id: str, for_update: bool = False
) -> Library | None:
    """One of the user's libraries (None for a missing or foreign id); `for_update` locks its
    row until the transaction ends (PostgreSQL; SQLite has one writer anyway)."""
    query = select(Library).where(Library.id == library_id, Library.user_id == user_id)
    return db_session.scalar(query.with_for_update() if for_update else query)


def all_libraries(*, db_session: Session) -> list[Library]:
    """Every user's libraries (the library monitor watches them all)."""
    return list(db_session.scalars(select(Library).order_by(Library.created_at, Library.id)))


def list_libraries(*, db_session: Session, user_id: str) -> list[Library]:
    return list(
        db_session.scalars(
            select(Library)
            .where(Library.user_id == user_id)
            .order_by(Library.created_at, Library.id)
        )
    )


def other_users_libraries(*, db_session: Session, user_id: str) -> list[Library]:
    """Every library that is not `user_id`'s."""
    return list(db_session.scalars(select(Library).where(Library.user_id != user_id)))


def library_folder_keys(
    *, db_session: Session, library_ids: Sequence[str]
) -> dict[str, dict[str, int]]:
    """library id -> {folder identity: depth} of the folders each library's last scan walked."""
    found: dict[str, dict[str, int]] = {i: {} for i in library_ids}
    ids = list(library_ids)
    for start in range(0, len(ids), IN_CHUNK):
        rows = db_session.execute(
            select(LibraryFolder.library_id, LibraryFolder.folder_key, LibraryFolder.depth).where(
                LibraryFolder.library_id.in_(ids[start : start + IN_CHUNK])
            )
        )
        for library_id, key, depth in rows:
            found[library_id][key] = depth
    return found


def replace_library_folders(
    *, db_session: Session, library_id: str, folders: Mapping[str, int]
) -> None:
    """The folders (identity -> depth) a scan of the library walked, instead of the last's."""
    db_session.execute(delete(LibraryFolder).where(LibraryFolder.library_id == library_id))
    rows = [{"library_id": library_id, "folder_key": k, "depth": d} for k, d in folders.items()]
    for start in range(0, len(rows), 500):
        db_session.execute(insert(LibraryFolder), rows[start : start + 500])


def set_watch_errors(*, db_session: Session, errors: Mapping[str, str | None]) -> None:
    """Record why each library (id -> reason, None: it is watched) is not watched now."""
    for library_id, error in errors.items():
        db_session.execute(
            update(Library)
            .where(Library.id == library_id, Library.watch_error.is_distinct_from(error))
            .values(watch_error=error)
        )


def _starts_with(column: Any, prefix: str) -> Any:
    """`column` begins with `prefix`, exactly: SQL's LIKE ignores ASCII case on SQLite, and file
    paths are case-sensitive (/photos/A is not /photos/a)."""
    return func.substr(column, 1, len(prefix)) == prefix


def libraries_overlapping(*, db_session: Session, path: str) -> list[Library]:
    """Libraries (any user) at `path`, above it, or inside it."""
    ancestors = [str(a) for a in PurePath(path).parents] + [path]
    return list(
        db_session.scalars(
            select(Library).where(
                or_(
                    Library.path.in_(ancestors),
                    _starts_with(Library.path, path.rstrip("/") + "/"),
                )
            )
        )
    )


def retry_passing_embed_failures(*, db_session: Session, library_id: str) -> int:
    """Forget the embed failures of the library's files that may pass without the file changing
    (embed_error_transient: an I/O error), so the embed pass after a scan reads them again; how
    many."""
    result = db_session.execute(
        update(Image)
        .where(
            Image.library_id == library_id,
            Image.embed_error.is_not(None),
            Image.embed_error_transient.is_(True),
        )
        .values(embed_error=None, embed_error_transient=None)
    )
    return int(getattr(result, "rowcount", 0) or 0)


def library_embed_failures(
    *, db_session: Session, library_id: str, limit: int
) -> tuple[int, list[tuple[str, str]]]:
    """(how many, the first `limit` (source_path, embed_error) by path) of the library's images
    whose file could not be read or decoded when embedded."""
    failed = (Image.library_id == library_id, Image.embed_error.is_not(None))
    count = int(db_session.scalar(select(func.count()).select_from(Image).where(*failed)) or 0)
    rows = db_session.execute(
        select(Image.source_path, Image.embed_error)
        .where(*failed)
        .order_by(Image.source_path)
        .limit(limit)
    )
    return count, [(str(path), str(reason)) for path, reason in rows]


def open_scan_job(
    *, db_session: Session, library: Library, states: tuple[JobState, ...] | None = None
) -> Job | None:
    """A queued or running (or: in one of `states`) scan of this library, if any."""
    wanted = states or (JobState.QUEUED, JobState.RUNNING)
    jobs = db_session.scalars(
        select(Job).where(
            Job.user_id == library.user_id,
            Job.kind == JobKind.SCAN_LIBRARY.value,
            Job.state.in_([st.value for st in wanted]),
        )
    )
    return next((j for j in jobs if j.payload.get("library_id") == library.id), None)


def library_storage_paths(*, db_session: Session, library_id: str) -> list[str]:
    return list(
        db_session.scalars(
            select(Image.storage_path).where(Image.library_id == library_id).distinct()
        )
    )


def delete_library_images(*, db_session: Session, library_id: str) -> None:
    """Every image indexed from the library leaves the index (their files are not touched)."""
    db_session.execute(delete(Image).where(Image.library_id == library_id))


def library_images_at(*, db_session: Session, library_id: str, paths: list[str]) -> list[Image]:
    return list(
        db_session.scalars(
            select(Image).where(Image.library_id == library_id, Image.source_path.in_(paths))
        )
    )


def keep_library_images(
    *, db_session: Session, library_id: str, generation: int, paths: Sequence[str]
) -> int:
    """Mark the library's images at or under `paths` as seen by scan `generation` (what a scan
    could not look at is kept); how many."""
    kept = 0
    for start in range(0, len(paths), 100):
        chunk = paths[start : start + 100]
        result = db_session.execute(
            update(Image)
            .where(
                Image.library_id == library_id,
                or_(
                    Image.source_path.in_(chunk),
                    *(_starts_with(Image.source_path, f"{p}/") for p in chunk),
                ),
            )
            .values(scan_generation=generation)
        )
        kept += int(getattr(result, "rowcount", 0) or 0)
    return kept


def stale_library_images(
    *, db_session: Session, library_id: str, generation: int, limit: int
) -> list[Image]:
    """Images of the library the scan `generation` did not see (up to `limit`)."""
    return list(
        db_session.scalars(
            select(Image)
            .where(
                Image.library_id == library_id,
                or_(Image.scan_generation.is_(None), Image.scan_generation != generation),
            )
            .limit(limit)
        )
    )
