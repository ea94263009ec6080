"""Libraries: folders under an allowed root, indexed in place (no copy) by `scan_library` jobs.

Nothing outside the allowed roots (settings.library.roots) is read: a path with `..` is refused,
paths are resolved (symlinks followed) and must stay under a root and inside their library;
another library's folder (or one inside or around it) is refused. A scan walks the folder in
batches of `library.batch` files, each in a short transaction; rows it did not see this time
(their scan_generation is older) leave the index at the end; a file whose content the user
already has at a path that is gone is a move: the row keeps its id and takes the new path.
Whatever the file system refuses for one entry (a path past PATH_MAX, no permission) skips that
entry with the reason, never the scan. A link to a file in the library is read as that file: a
duplicate of its target, indexed once, at the target's path. A file is read by its real path,
opened one folder at a time from the allowed root with no link followed (app.storage
open_beneath): a folder swapped for a link after the walk or a check is refused, not followed.
A file indexed but that embedding then cannot read (swapped for a FIFO or a bomb) is marked
with the reason (images.embed_error), listed in the report's `failed`, and read again only once
a scan sees it changed; one that failed on an I/O error (a network share that dropped) is read
again by the next scan.

Every path that reaches the database or a report is valid UTF-8 text: a file or folder whose
name is not (Latin-1 names from old shares: Python keeps their bytes as lone surrogates) is
skipped with a reason, its name shown with the bad bytes escaped ("caf\\xe9.jpg").
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import errno
import functools
import itertools
import logging
import os
import stat
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import Settings
from app.db import session_scope, transaction_lock
from app.errors import Conflict, DomainError, Misconfigured, NotFound, ValidationFailed
from app.models import Image, Job, JobKind, JobState, Library, utcnow
from app.services.embedding import embed_pending
from app.services.folders import ancestry_keys, folder_key, open_folder_beneath, walk
from app.services.images import delete_unused_files, set_source_stamp, source_stamp
from app.services.job_runs import JobContext
from app.services.jobs import JobQueue, enqueue_committed
from app.storage import FileStamp, inspect_file, is_gone_error, os_error_reason, root_of
from app.text import UnsafeText, check_text

log = logging.getLogger(__name__)


def allowed_roots(settings: Settings) -> list[Path]:
    return [r.resolve() for r in settings.library.roots]


def is_utf8(text: str) -> bool:
    """Whether `text` is valid UTF-8 text (a name from the file system is not when its bytes
    were not: Python keeps them as lone surrogates, which no database or JSON can carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def shown(path: str | Path) -> str:
    """`path` as safe text for a report or a log: bytes that are not UTF-8 escaped (\\xe9)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate no file name decodes to ("\\ud800")
        return str(path).encode("utf-8", "backslashreplace").decode("utf-8")


def _taken() -> Conflict:
    # One answer whatever the path (never the other user, nor whether the folder exists).
    return Conflict(
        "this folder, or one inside or around it, is another user's library",
        code="library_taken",
    )


def _data_folder(raw: str | Path) -> ValidationFailed:
    return ValidationFailed(
        f"{shown(raw)} is the service's data folder, inside it or around it (its uploads, "
        "thumbnails and indexes); it can never be a library",
        code="path_not_allowed",
    )


# Why a scan does not enter a folder inside a library (named by the folder's own path only).
TAKEN_FOLDER = "another user's library (the same folder under another name); not read"
DATA_FOLDER = "the service's own data folder; never indexed"


def _folded(path: str | Path) -> str:
    """`path` as a case-insensitive file system compares names: case folded, Unicode composed."""
    return unicodedata.normalize("NFC", str(path)).casefold().rstrip("/") or "/"


def _overlap(a: str, b: str) -> bool:
    """Whether two folders (as text) are one, or one holds the other."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def _refuse_other_users(
    db_session: Session, user_id: str, path: Path, roots: list[Path] | None = None
) -> None:
    """Conflict if `path` is another user's library folder, or inside or above one, by name,
    exactly or as a case-insensitive file system compares names (`Alice` is `ALICE` on an SMB
    share: refused before the file system is asked whether it exists, so that an answer never
    tells which folders someone's library holds); with `roots`, only if it is under one of them
    (above them it is refused as outside)."""
    if roots is not None and not any(path.is_relative_to(r) for r in roots):
        return
    for other in repositories.libraries_overlapping(db_session=db_session, path=str(path)):
        if other.user_id != user_id:
            raise _taken()
    mine = _folded(path)
    for other in repositories.other_users_libraries(db_session=db_session, user_id=user_id):
        if _overlap(mine, _folded(other.path)) and _ignores_case(Path(other.path)):
            raise _taken()


def _ignores_case(folder: Path) -> bool:
    """Whether the file system holding `folder` (a library's folder, known to exist) finds it
    under its name with the case of its letters changed: then names that differ only in case
    are one folder there. Asks only about that library's own folder."""
    for name, parent in zip((folder, *folder.parents), folder.parents, strict=False):
        flipped = name.name.swapcase()
        if flipped == name.name:
            continue  # no letters in this name: try the folder above
        try:
            found = os.stat(parent / flipped)
            if flipped not in os.listdir(parent):  # found, though no entry has that name
                return True
            return os.path.samestat(os.stat(name), found)  # an entry: itself, or another?
        except OSError:
            return False
    return False


def foreign_folders(db_session: Session, user_id: str, settings: Settings) -> dict[str, str]:
    """The folders (identity -> why) that no library of `user_id` may hold, under any name:
    every other user's library folder as it is now and the folders its last scan walked inside
    it, and the service's data folder with the folders in it."""
    refuse: dict[str, str] = {}
    others = repositories.other_users_libraries(db_session=db_session, user_id=user_id)
    walked = repositories.library_folder_keys(
        db_session=db_session, library_ids=[o.id for o in others]
    )
    for other in others:
        refuse.update(dict.fromkeys(walked.get(other.id, {}), TAKEN_FOLDER))
        with contextlib.suppress(OSError):
            refuse[folder_key(os.stat(other.path))] = TAKEN_FOLDER
    refuse.update(dict.fromkeys(_data_folder_keys(settings), DATA_FOLDER))
    return refuse


def _data_folder_keys(settings: Settings) -> list[str]:
    """The identities of the data folder and of the folders in it (what a bind mount of one
    of them elsewhere would show)."""
    keys: list[str] = []
    with contextlib.suppress(OSError):
        data = settings.data_dir.resolve()
        keys.append(folder_key(os.stat(data)))
        with os.scandir(data) as it:
            for entry in it:
                if entry.is_dir(follow_symlinks=False):
                    keys.append(folder_key(entry.stat(follow_symlinks=False)))
    return keys


def check_ownership(db_session: Session, user_id: str, folder: Path, settings: Settings) -> None:
    """Refuse `folder` (resolved) as a library of `user_id` if it is, by identity, another
    user's library folder or inside one (under any name: a bind mount, another case on a
    case-insensitive share) or above one (Conflict `library_taken`), or the data folder, inside
    it or above it (ValidationFailed). OSError if the file system cannot tell."""
    mine = ancestry_keys(folder)
    data_keys = set(_data_folder_keys(settings))
    if data_keys & set(mine):
        raise _data_folder(folder)
    with contextlib.suppress(OSError):
        if mine[0] in ancestry_keys(settings.data_dir.resolve()):
            raise _data_folder(folder)
    others = repositories.other_users_libraries(db_session=db_session, user_id=user_id)
    if _same_folder_as(db_session, mine, others) is not None:
        raise _taken()


def _same_folder_as(
    db_session: Session, mine: list[str], libraries: list[Library]
) -> Library | None:
    """The first of `libraries` that the folder whose ancestry is `mine` (its identity first,
    then its parents') is, lies inside (as the library's last scan walked it, or its folder as
    it is now) or lies above; None."""
    walked = repositories.library_folder_keys(
        db_session=db_session, library_ids=[lib.id for lib in libraries]
    )
    ancestry = set(mine)
    for lib in libraries:
        keys = set(walked.get(lib.id, {}))
        with contextlib.suppress(OSError):
            keys.add(folder_key(os.stat(lib.path)))
        if keys & ancestry:
            return lib
        with contextlib.suppress(OSError):
            if mine[0] in ancestry_keys(Path(lib.path)):
                return lib
    return None


def refuse_data_folder_in_roots(settings: Settings) -> None:
    """Misconfigured (the service must not start) when the data folder lies under an allowed
    library root, by name or by identity (a root that is a bind mount of a folder above it):
    any user could add it as a library and read every user's uploads."""
    try:
        data = settings.data_dir.resolve()
        above = set(ancestry_keys(data)) if data.exists() else set()
    except OSError:
        return  # nothing there yet to hold: the check by name below still holds
    for root in allowed_roots(settings):
        by_key = False
        with contextlib.suppress(OSError):
            by_key = folder_key(os.stat(root)) in above
        if data.is_relative_to(root) or root.is_relative_to(data) or by_key:
            raise Misconfigured(
                f"the data folder {shown(data)} lies under the library root {shown(root)} (or "
                "holds it): every user could add it as a library and read everyone's uploads. "
                "Set POLAR_DATA_DIR outside POLAR_LIBRARY__ROOTS (or the roots around your "
                "photos only)",
                code="data_dir_in_library_roots",
            )


def confine_folder(
    raw: str, settings: Settings, *, db_session: Session | None = None, user_id: str = ""
) -> Path:
    """The resolved folder `raw` names, if it is an existing folder under an allowed root.

    With a `db_session`, a path inside or above another user's library is refused (409) before
    the file system is asked whether it exists, both as typed and resolved: the answer must
    not tell another user which folders exist in someone's library. Whatever the file system
    says of the path (no permission to follow a /proc link, a loop, a name too long) is a 422
    `invalid_path`, never a 500.
    """
    roots = allowed_roots(settings)
    if not roots:
        raise ValidationFailed(
            "this server allows no library folders (the admin sets POLAR_LIBRARY__ROOTS)",
            code="libraries_disabled",
        )
    p = Path(raw)
    if not p.is_absolute():
        raise ValidationFailed(f"give an absolute path, not {raw!r}", code="path_not_absolute")
    if ".." in p.parts:
        raise ValidationFailed("a library path may not contain '..'", code="path_traversal")
    try:  # the API refuses these first (app/api/schemas.py LibraryIn); the database would fail
        check_text(raw)
    except UnsafeText as e:
        raise ValidationFailed(
            f"this path cannot be used as a folder: {e}", code="invalid_path"
        ) from None
    if db_session is not None:
        # As typed, then with its symlinks followed as far as they go (realpath keeps a missing
        # part, a loop or a name too long as it is), before any error the file system could
        # give but one: no permission to read a link on the way (a /proc link), a 422 below.
        _refuse_other_users(db_session, user_id, p, roots)
        try:
            followed = os.path.realpath(p)
        except OSError as e:
            raise _unusable(e) from None
        _refuse_other_users(db_session, user_id, Path(shown(followed)), roots)
    try:  # what the file system says of a path a user typed: any error is a clear 422
        real = p.resolve()
        if not is_utf8(str(real)):  # a symlink on the way leads to a name that is not UTF-8
            raise ValueError(f"it leads to {shown(real)}, a name that is not valid UTF-8")
        is_dir = real.is_dir()
    except (OSError, ValueError, RuntimeError) as e:  # too long, NUL byte, a loop, EACCES
        raise _unusable(e) from None
    if not any(real.is_relative_to(r) for r in roots):
        via = " (through a symlink)" if real != Path(os.path.normpath(p)) else ""
        raise ValidationFailed(
            f"{raw} is outside the allowed library roots{via}",
            code="path_not_allowed",
            detail={"roots": [str(r) for r in roots]},
        )
    if not is_dir:
        raise ValidationFailed(f"{raw} is not an existing folder", code="not_a_folder")
    if db_session is not None:
        try:
            check_ownership(db_session, user_id, real, settings)
        except OSError as e:
            raise _unusable(e) from None
    return real


def _own_overlap(db_session: Session, user_id: str, folder: Path) -> Library | None:
    """The user's own library that `folder` is under another name, lies in or around."""
    own = repositories.list_libraries(db_session=db_session, user_id=user_id)
    folded = _folded(folder)
    for lib in own:
        if _overlap(folded, _folded(lib.path)) and _ignores_case(Path(lib.path)):
            return lib
    return _same_folder_as(db_session, ancestry_keys(folder), own)


def _unusable(e: BaseException) -> ValidationFailed:
    reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return ValidationFailed(f"this path cannot be used as a folder: {reason}", code="invalid_path")


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
                raise _taken()
            raise Conflict(
                f"this folder overlaps your library {other.id} ({other.path})",
                code="library_overlaps",
                detail={"library_id": other.id},
            )
        _refuse_other_users(db_session, user_id, folder)
        try:
            check_ownership(db_session, user_id, folder, settings)
            own = _own_overlap(db_session, user_id, folder)
        except OSError as e:
            raise _unusable(e) from None
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
    db_session.execute(delete(Image).where(Image.library_id == library.id))
    db_session.delete(library)
    repositories.bump_index_generation(db_session=db_session, user_id=user_id)
    db_session.commit()
    delete_unused_files(db_session, store, paths)  # cached thumbnails only


# --- the scan job -------------------------------------------------------------------------------


@dataclass
class ScanReport:
    """What one scan did; stored on the library and returned by GET /libraries/{id}."""

    max_reported: int
    added: int = 0
    changed: int = 0
    moved: int = 0
    unchanged: int = 0
    removed: int = 0
    skipped_count: int = 0
    skipped: list[dict[str, str]] = field(default_factory=list)
    # Files indexed but not searchable: they could not be read or decoded when embedded.
    failed_count: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    # Files and folders the scan could not look at (an I/O error, no permission): what was
    # indexed there is kept as it was, since nothing says it is gone.
    kept_count: int = 0
    # Folders inside the library not entered because they are, by identity, another user's
    # library or the service's data folder (under another name): what was indexed there goes.
    refused_count: int = 0
    # Why nothing was removed although the scan saw none of the indexed files (None: pruned).
    not_pruned: str | None = None
    kept_paths: list[str] = field(default_factory=list)  # internal: not in the stored report

    def skip(self, path: str | Path, reason: str) -> None:
        self.skipped_count += 1
        if len(self.skipped) < self.max_reported:
            self.skipped.append({"path": shown(path), "reason": reason})

    def refuse(self, path: Path, reason: str) -> None:
        """`path` is a folder that no library of this user may hold: not read; what was indexed
        under it leaves the index."""
        self.skip(path, reason)
        self.refused_count += 1

    def unreadable(self, path: Path, e: OSError) -> None:
        """`path` could not be looked at: skipped with the reason; unless the error says it is
        gone, what was indexed at or under it is kept (a network share that dropped, a folder
        made unreadable, must not empty the index)."""
        if is_gone_error(e) or not is_utf8(str(path)):
            self.skip(path, os_error_reason(e))
            return
        self.skip(path, f"{os_error_reason(e)}; what was indexed there is kept")
        self.kept_count += 1
        self.kept_paths.append(str(path))

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("max_reported")
        d.pop("kept_paths")
        return d


NOT_UTF8_FOLDER = "the folder's name is not valid UTF-8; rename it to index what it holds"
NOT_UTF8_FILE = "the file's name is not valid UTF-8; rename it to index it"


# A file's path is stored and indexed (library_id, source_path); PostgreSQL's b-tree refuses
# index entries past about 2.7 KB (2704 bytes with its id), which would fail the whole batch, so
# longer paths are skipped.
MAX_STORED_PATH_BYTES = 2600
TOO_LONG_TO_STORE = f"its path is longer than {MAX_STORED_PATH_BYTES} bytes; not indexed"


def _walk(
    folder: Path, root: Path, report: ScanReport, walked: dict[str, int], refuse: dict[str, str]
) -> Iterator[tuple[Path, Path]]:
    """(path, what to read) for every file in the folder, in order (sorted names, a folder's
    files before its subfolders'), every path valid UTF-8 text: a folder whose name is not is
    skipped whole, a file so named too. Folders are opened from the allowed `root` down with no
    link followed (app.services.folders.walk): a symlinked folder is not entered, nor one
    swapped for a link while the scan runs (named in the report by its own path only), nor one
    whose identity is in `refuse` (another user's library, the service's data folder) under
    any name. A link to a file is read through its target, only if that stays in the folder,
    after every other file (so that its target, indexed first, is what it duplicates).
    `walked` collects the identity and depth of every folder walked.

    Whatever the file system refuses for one entry (a path past PATH_MAX, no permission, a
    folder gone meanwhile) skips that entry (a folder: its subtree) with the reason; it never
    ends the walk. Iterative: a tree deeper than Python's recursion limit is walked too.
    """
    links: list[tuple[Path, Path]] = []
    for here in walk(
        folder, root, unreadable=report.unreadable, refused=report.refuse, refuse=refuse
    ):
        walked[here.key] = here.depth
        base = here.path
        files: list[tuple[Path, bool]] = []
        subdirs: list[str] = []
        for entry in here.entries:
            p = base / entry.name
            try:
                is_link = entry.is_symlink()
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError as e:
                report.unreadable(p, e)
                continue
            if is_link:  # a link to a folder is reported as a folder; a loop... is told below
                with contextlib.suppress(OSError):
                    is_dir = entry.is_dir()
            if is_dir and not is_utf8(entry.name):
                report.skip(p, NOT_UTF8_FOLDER)  # every path under it has this name
            elif is_dir and is_link:
                report.skip(p, "a symlinked folder is not followed")
            elif is_dir and len(str(p).encode("utf-8")) > MAX_STORED_PATH_BYTES:
                report.skip(p, TOO_LONG_TO_STORE)  # nothing under it could be stored
            elif is_dir:
                subdirs.append(entry.name)
            elif not is_utf8(entry.name):
                report.skip(p, NOT_UTF8_FILE)
            elif len(str(p).encode("utf-8")) > MAX_STORED_PATH_BYTES:
                report.skip(p, TOO_LONG_TO_STORE)
            else:
                files.append((p, is_link))
        here.descend = subdirs
        for p, is_link in files:
            if not is_link:
                yield p, p
                continue
            try:
                target = p.resolve()
                os.stat(target)
            except RuntimeError:  # a loop, before Python 3.13
                report.skip(p, "a symlink that loops or cannot be followed")
                continue
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR):
                    report.skip(p, "broken link")
                elif e.errno == errno.ELOOP:
                    report.skip(p, "a symlink that loops or cannot be followed")
                else:
                    report.skip(p, os_error_reason(e))
                continue
            if not target.is_relative_to(folder):
                report.skip(p, "the symlink leads outside the library; not read")
                continue
            links.append((p, target))
    yield from links


def scan_library_job(ctx: JobContext) -> None:
    """Handler of `scan_library` (payload {"library_id"}): walk, index, prune, then embed."""
    library_id = str(ctx.payload.get("library_id"))
    settings = ctx.settings
    with session_scope(ctx.session_factory) as s:
        library = repositories.get_library(
            db_session=s, user_id=ctx.user_id, library_id=library_id, for_update=True
        )
        if library is None:
            return  # deleted meanwhile
        other = repositories.open_scan_job(
            db_session=s, library=library, states=(JobState.RUNNING,)
        )
        if other is not None and other.id != ctx.job_id:
            # Two scans of one folder at once would each prune what the other marked.
            log.info("library %s: scan %s is running; this one does nothing", library_id,
                     other.id, extra={"job_id": ctx.job_id})  # fmt: skip
            return
        library.scan_generation += 1
        gen, folder = library.scan_generation, Path(library.path)
    roots = allowed_roots(settings)
    if not any(folder.is_relative_to(r) for r in roots):
        raise ValidationFailed(
            "the library's folder is no longer under an allowed root; nothing was changed",
            code="path_not_allowed",
        )
    root = root_of(folder, roots)  # folders and files are opened from it down, no link followed
    _check_top(ctx, library_id, folder, root)
    with session_scope(ctx.session_factory) as s:
        refuse = foreign_folders(s, ctx.user_id, settings)
    report = ScanReport(max_reported=settings.library.max_reported)
    walked: dict[str, int] = {}
    entries = _walk(folder, root, report, walked, refuse)
    while batch := list(itertools.islice(entries, settings.library.batch)):
        index = functools.partial(_index_batch, ctx, library_id, gen, batch, report, root)
        _once_more_on_a_race(index, report, library_id)
    with session_scope(ctx.session_factory) as s:
        repositories.keep_library_images(
            db_session=s, library_id=library_id, generation=gen, paths=report.kept_paths
        )
        repositories.replace_library_folders(db_session=s, library_id=library_id, folders=walked)
        report.not_pruned = _why_not_prune(s, folder, library_id, gen, report)
    stale: list[str] = []
    while report.not_pruned is None:
        with session_scope(ctx.session_factory) as s:
            rows = repositories.stale_library_images(
                db_session=s, library_id=library_id, generation=gen, limit=settings.library.batch
            )
            for img in rows:
                stale.append(img.storage_path)
                s.delete(img)
            report.removed += len(rows)
            if rows:
                repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)
        if len(rows) < settings.library.batch:
            break
    with session_scope(ctx.session_factory) as s:
        delete_unused_files(s, ctx.store, sorted(set(stale)))
        library = repositories.get_library(db_session=s, user_id=ctx.user_id, library_id=library_id)
        if library is not None:
            # A file that failed for a reason that may pass (its share dropped) is read again.
            repositories.retry_passing_embed_failures(db_session=s, library_id=library_id)
            _note_failures(s, library, report)
            library.report = {"job_id": ctx.job_id, **report.as_dict()}
            library.scanned_at = utcnow()
    ctx.progress(0.5)
    embed_pending(dataclasses.replace(ctx, progress=lambda f: ctx.progress(0.5 + f / 2)), None)
    with session_scope(ctx.session_factory) as s:  # what embedding could not read, and why
        library = repositories.get_library(db_session=s, user_id=ctx.user_id, library_id=library_id)
        if library is not None:
            _note_failures(s, library, report)
            library.report = {"job_id": ctx.job_id, **report.as_dict()}


def _check_top(ctx: JobContext, library_id: str, folder: Path, root: Path) -> None:
    """Fail the scan, changing nothing, while the library's folder cannot be walked (its disk is
    not mounted, it is a link now: never followed); and, removing the library's images, when it
    is by identity another user's library, inside or around one, or the data folder (a mount
    changed under the running service)."""
    try:
        os.close(open_folder_beneath(folder, root))
    except (OSError, ValueError) as e:
        why = "is a link now" if isinstance(e, OSError) and e.errno == errno.ELOOP else ""
        raise ValidationFailed(
            f"the library's folder {why or 'is missing or unreadable'}; nothing was changed",
            code="library_unavailable",
        ) from None
    try:
        with session_scope(ctx.session_factory) as s:
            check_ownership(s, ctx.user_id, folder, ctx.settings)
    except OSError:
        return  # told by the walk, folder by folder
    except DomainError as refused:
        with session_scope(ctx.session_factory) as s:
            paths = repositories.library_storage_paths(db_session=s, library_id=library_id)
            s.execute(delete(Image).where(Image.library_id == library_id))
            repositories.replace_library_folders(db_session=s, library_id=library_id, folders={})
            repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)
        with session_scope(ctx.session_factory) as s:
            delete_unused_files(s, ctx.store, paths)
        log.warning("library %s: %s; its images were removed", library_id, refused.message,
                    extra={"job_id": ctx.job_id})  # fmt: skip
        raise


def _why_not_prune(
    db_session: Session, folder: Path, library_id: str, gen: int, report: ScanReport
) -> str | None:
    """Why the images this scan did not see must not be removed, or None to remove them: the
    folder is gone now, or it holds nothing at all though images were indexed from it (a
    network share not mounted leaves its mount point as an empty folder, or with a file or two
    that are not photos)."""
    if not folder.is_dir():
        return "the folder went away during the scan; nothing was removed"
    # Files that are not photos (a placeholder left in a mount point) say nothing.
    seen = report.added + report.changed + report.moved + report.unchanged + report.kept_count
    seen += report.refused_count  # what was there is not this library's: it goes
    if seen == 0 and repositories.stale_library_images(
        db_session=db_session, library_id=library_id, generation=gen, limit=1
    ):
        return (
            "the folder holds no photos; nothing was removed, in case it is a share that is "
            "not mounted (delete the library to drop its images)"
        )
    return None


def _note_failures(db_session: Session, library: Library, report: ScanReport) -> None:
    """Put the library's files that could not be embedded (embed_error) in the report."""
    count, rows = repositories.library_embed_failures(
        db_session=db_session, library_id=library.id, limit=report.max_reported
    )
    report.failed_count = count
    report.failed = [{"path": path, "reason": reason} for path, reason in rows]


def _once_more_on_a_race(index: Callable[[], None], report: ScanReport, library_id: str) -> None:
    """`index()` (a batch), run again once if its transaction lost a race on a unique key: an
    upload of the same new bytes committed between the batch's lookup and its insert. The
    second run finds the upload's image (the file is then a duplicate of it); the report
    counts the batch once."""
    before = copy.deepcopy(report)
    try:
        index()
    except IntegrityError:
        log.info("library %s: a batch met a concurrent upload; indexing it again", library_id)
        report.__dict__.update(copy.deepcopy(before).__dict__)
        index()


def _unchanged(img: Image, st: os.stat_result) -> bool:
    """Whether `st` is the file `img` was indexed from, unchanged (FileStamp: a restored
    mtime does not hide a change). A row indexed before ctime and inode were kept matches on
    size and mtime, as it did then, and takes the rest of its stamp now: upgrading does not
    read a whole library again."""
    stamp = source_stamp(img)
    if stamp is None or not stamp.same_file(st):
        return False
    if None in (stamp.ctime_ns, stamp.ino):
        set_source_stamp(img, st)
    return True


def _index_batch(
    ctx: JobContext,
    library_id: str,
    gen: int,
    entries: list[tuple[Path, Path]],
    report: ScanReport,
    root: Path,
) -> None:
    """Index (path, what to read) pairs from `_walk`: what is read is the path itself, or the
    target in the library of a link, which is indexed under the link's path only if its target
    is not indexed (its content is a duplicate of its target's). What is read is opened from
    the allowed `root` down with no link followed on the way (a folder swapped for a link
    since the walk is refused). Any OSError, any refusal of one file skips that file with the
    reason. A file read again because it changed (or moved) loses a past embedding failure."""
    limits = ctx.settings.limits
    with session_scope(ctx.session_factory) as s:
        looked_up = {str(p) for p, _ in entries}  # and a link's target (what a row can name)
        looked_up |= {str(real) for _, real in entries if is_utf8(str(real))}
        known = {
            img.source_path: img
            for img in repositories.library_images_at(
                db_session=s, library_id=library_id, paths=sorted(looked_up)
            )
        }
        for p, real in entries:
            try:
                st = os.stat(real)
            except OSError as e:
                report.unreadable(p, e)
                continue
            if not stat.S_ISREG(st.st_mode):
                report.skip(p, "not a regular file")
                continue
            target = known.get(str(real)) if real != p else None
            if (
                target is not None and target.scan_generation == gen and _unchanged(target, st)
            ):  # its target was indexed by this scan: not read twice
                report.skip(p, f"a link to {shown(real)} in the library; indexed there")
                continue
            img = known.get(str(p))
            if img is not None and _unchanged(img, st):
                img.scan_generation = gen
                report.unchanged += 1
                continue
            try:
                info = inspect_file(
                    real,
                    max_bytes=limits.max_upload_bytes,
                    max_pixels=limits.max_pixels,
                    within=root,
                )
                after = os.stat(real)
            except DomainError as e:
                report.skip(p, e.message)
                continue
            except OSError as e:
                report.unreadable(p, e)
                continue
            if not FileStamp.of(st).same_file(after) or info.size_bytes != st.st_size:
                report.skip(p, "the file changed while it was read; the next scan takes it")
                continue
            storage_path = ctx.store.cache_thumbnail(info.sha256, info.ext, info.thumbnail)
            mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)
            same = repositories.get_image_by_sha256(
                db_session=s, user_id=ctx.user_id, sha256=info.sha256
            )
            if img is not None and info.sha256 == img.sha256:
                # Touched, not changed (a chmod, the same bytes copied over it): its image,
                # vector and all, stay; only the new stamp is kept.
                set_source_stamp(img, st)
                img.scan_generation = gen
                report.unchanged += 1
                continue
            if img is not None:
                if same is not None and same.id != img.id:
                    s.delete(img)  # this path now holds content indexed elsewhere
                    report.skip(p, f"same content as image {same.id}; indexed once")
                    continue
                img.sha256, img.mime, img.size_bytes = info.sha256, info.mime, info.size_bytes
                img.width, img.height, img.storage_path = info.width, info.height, storage_path
                img.embedding = img.embedding_model = None
                img.region_embeddings = img.region_layout = None
                img.taken_at = info.taken_at or mtime
                set_source_stamp(img, st)
                img.scan_generation = gen
                img.embed_error = None  # a new file: read again
                report.changed += 1
                continue
            if same is not None:
                gone = same.source_path is not None and not os.path.lexists(same.source_path)
                seen_here = same.library_id == library_id and same.scan_generation == gen
                if same.library_id is not None and gone and not seen_here:
                    same.library_id, same.source_path = library_id, str(p)
                    same.original_filename = p.name[-255:]
                    set_source_stamp(same, st)
                    same.scan_generation = gen
                    same.embed_error = None  # read whole just now, at its new path
                    known[str(p)] = same
                    report.moved += 1
                else:
                    where = same.source_path or "uploaded"
                    report.skip(p, f"same content as image {same.id} ({where}); indexed once")
                continue
            new = Image(
                user_id=ctx.user_id,
                sha256=info.sha256,
                original_filename=p.name[-255:],
                mime=info.mime,
                size_bytes=info.size_bytes,
                width=info.width,
                height=info.height,
                storage_path=storage_path,
                taken_at=info.taken_at or mtime,
                created_at=utcnow(),
                library_id=library_id,
                source_path=str(p),
                scan_generation=gen,
            )
            set_source_stamp(new, st)
            s.add(new)
            s.flush()
            known[str(p)] = new
            report.added += 1
