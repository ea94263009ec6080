"""The scan of a library (the `scan_library` job): walk its folder, index what changed, prune
what is gone, then embed.

A scan walks the folder in batches of `library.batch` files, each in a short transaction; rows
it did not see this time (their scan_generation is older) leave the index at the end; a file
whose content the user already has at a path that is gone is a move: the row keeps its id and
takes the new path. Whatever the file system refuses for one entry (a path past PATH_MAX, no
permission) skips that entry with the reason, never the scan. A link to a file in the library is
read as that file: a duplicate of its target, indexed once, at the target's path. A file is read
by its real path, opened one folder at a time from the allowed root with no link followed
(app.storage open_beneath): a folder swapped for a link after the walk or a check is refused,
not followed. A file indexed but that embedding then cannot read (swapped for a FIFO or a bomb)
is marked with the reason (images.embed_error), listed in the report's `failed`, and read again
only once a scan sees it changed; one that failed on an I/O error (a network share that
dropped) is read again by the next scan.

Every path that reaches the database or a report is valid UTF-8 text: a file or folder whose
name is not (Latin-1 names from old shares: Python keeps their bytes as lone surrogates) is
skipped with a reason, its name shown with the bad bytes escaped ("caf\\xe9.jpg"). Which folders
a library may be is app/services/library_paths.py; adding, listing and deleting libraries is
app/services/libraries.py.

The job, step by step (`scan_library_job`): `_start_scan` (one scan of a folder at a time, a new
scan generation), `_allowed_root` and `_check_top` (the folder is still allowed, there, and this
user's), `_index_folder` (`_walk` the folder, `_index_batch` per batch, `_index_entry` per
file), `_prune_unseen`, `_finish_scan` (the report), then embedding and `_note_embed_failures`.
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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app import repositories
from app.config import Settings
from app.db import session_scope
from app.errors import DomainError, ValidationFailed
from app.models import Image, JobState, Library, utcnow
from app.services.embedding import embed_pending
from app.services.folders import open_folder_beneath, walk
from app.services.images import delete_unused_files, set_source_stamp, source_stamp
from app.services.job_runs import JobContext
from app.services.library_paths import (
    allowed_roots,
    check_ownership,
    foreign_folders,
    is_utf8,
    shown,
)
from app.storage import (
    FileStamp,
    InspectedFile,
    inspect_file,
    is_gone_error,
    os_error_reason,
    root_of,
)

log = logging.getLogger(__name__)


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
        files, here.descend = _sort_entries(here.path, here.entries, report)
        for p, is_link in files:
            if not is_link:
                yield p, p
            elif (target := _link_target(p, folder, report)) is not None:
                links.append((p, target))
    yield from links


def _sort_entries(
    base: Path, entries: list[os.DirEntry[str]], report: ScanReport
) -> tuple[list[tuple[Path, bool]], list[str]]:
    """A folder's entries sorted out: the files to read, as (path, whether it is a link), and
    the names of the subfolders to enter; any other entry is skipped in the report with why."""
    files: list[tuple[Path, bool]] = []
    subdirs: list[str] = []
    for entry in entries:
        p = base / entry.name
        try:
            is_link = entry.is_symlink()
            is_dir = entry.is_dir(follow_symlinks=False)
        except OSError as e:
            report.unreadable(p, e)
            continue
        if is_link:  # a link to a folder is reported as a folder; a loop... is told later
            with contextlib.suppress(OSError):
                is_dir = entry.is_dir()
        why = _why_not_entered(entry.name, p, is_link) if is_dir else _why_not_read(entry.name, p)
        if why is not None:
            report.skip(p, why)
        elif is_dir:
            subdirs.append(entry.name)
        else:
            files.append((p, is_link))
    return files, subdirs


def _too_long_to_store(p: Path) -> bool:
    return len(str(p).encode("utf-8")) > MAX_STORED_PATH_BYTES


def _why_not_entered(name: str, p: Path, is_link: bool) -> str | None:
    """Why the walk does not enter the folder `p` (named `name`); None: it does."""
    if not is_utf8(name):
        return NOT_UTF8_FOLDER  # every path under it has this name
    if is_link:
        return "a symlinked folder is not followed"
    if _too_long_to_store(p):
        return TOO_LONG_TO_STORE  # nothing under it could be stored
    return None


def _why_not_read(name: str, p: Path) -> str | None:
    """Why the file `p` (named `name`) is not read; None: it is."""
    if not is_utf8(name):
        return NOT_UTF8_FILE
    if _too_long_to_store(p):
        return TOO_LONG_TO_STORE
    return None


def _link_target(p: Path, folder: Path, report: ScanReport) -> Path | None:
    """The file the link `p` leads to, when that is a file in `folder`; None, with the reason in
    the report, when the link is broken, loops or leads outside."""
    try:
        target = p.resolve()
        os.stat(target)
    except RuntimeError:  # a loop, before Python 3.13
        report.skip(p, "a symlink that loops or cannot be followed")
        return None
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR):
            report.skip(p, "broken link")
        elif e.errno == errno.ELOOP:
            report.skip(p, "a symlink that loops or cannot be followed")
        else:
            report.skip(p, os_error_reason(e))
        return None
    if not target.is_relative_to(folder):
        report.skip(p, "the symlink leads outside the library; not read")
        return None
    return target


# --- the job, step by step ----------------------------------------------------------------------


def scan_library_job(ctx: JobContext) -> None:
    """Handler of `scan_library` (payload {"library_id"}): walk, index, prune, then embed."""
    library_id = str(ctx.payload.get("library_id"))
    started = _start_scan(ctx, library_id)
    if started is None:
        return
    gen, folder = started
    root = _allowed_root(ctx.settings, folder)
    _check_top(ctx, library_id, folder, root)
    report, walked = _index_folder(ctx, library_id, gen, folder, root)
    stale = _prune_unseen(ctx, library_id, gen, folder, report, walked)
    _finish_scan(ctx, library_id, report, stale)
    ctx.progress(0.5)
    embed_pending(dataclasses.replace(ctx, progress=lambda f: ctx.progress(0.5 + f / 2)), None)
    _note_embed_failures(ctx, library_id, report)


def _start_scan(ctx: JobContext, library_id: str) -> tuple[int, Path] | None:
    """This scan's generation and the library's folder; None when the library is gone or
    another scan of it is running (two scans of one folder at once would each prune what the
    other marked)."""
    with session_scope(ctx.session_factory) as s:
        library = repositories.get_library(
            db_session=s, user_id=ctx.user_id, library_id=library_id, for_update=True
        )
        if library is None:
            return None  # deleted meanwhile
        other = repositories.open_scan_job(
            db_session=s, library=library, states=(JobState.RUNNING,)
        )
        if other is not None and other.id != ctx.job_id:
            log.info("library %s: scan %s is running; this one does nothing", library_id,
                     other.id, extra={"job_id": ctx.job_id})  # fmt: skip
            return None
        library.scan_generation += 1
        return library.scan_generation, Path(library.path)


def _allowed_root(settings: Settings, folder: Path) -> Path:
    """The allowed root the library's folder lies under (folders and files are opened from it
    down, no link followed); the scan fails, changing nothing, when there is none any more."""
    roots = allowed_roots(settings)
    if not any(folder.is_relative_to(r) for r in roots):
        raise ValidationFailed(
            "the library's folder is no longer under an allowed root; nothing was changed",
            code="path_not_allowed",
        )
    return root_of(folder, roots)


def _index_folder(
    ctx: JobContext, library_id: str, gen: int, folder: Path, root: Path
) -> tuple[ScanReport, dict[str, int]]:
    """Walk the folder and index its files batch by batch; the report so far, and the folders
    walked (identity -> depth)."""
    with session_scope(ctx.session_factory) as s:
        refuse = foreign_folders(s, ctx.user_id, ctx.settings)
    report = ScanReport(max_reported=ctx.settings.library.max_reported)
    walked: dict[str, int] = {}
    entries = _walk(folder, root, report, walked, refuse)
    while batch := list(itertools.islice(entries, ctx.settings.library.batch)):
        index = functools.partial(_index_batch, ctx, library_id, gen, batch, report, root)
        _once_more_on_a_race(index, report, library_id)
    return report, walked


def _prune_unseen(
    ctx: JobContext,
    library_id: str,
    gen: int,
    folder: Path,
    report: ScanReport,
    walked: dict[str, int],
) -> list[str]:
    """Keep what the scan could not look at, record the folders walked, then remove, batch by
    batch, the images the scan did not see, unless `_why_not_prune` says why not; the stored
    files (thumbnails) of the images removed."""
    batch = ctx.settings.library.batch
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
                db_session=s, library_id=library_id, generation=gen, limit=batch
            )
            for img in rows:
                stale.append(img.storage_path)
                s.delete(img)
            report.removed += len(rows)
            if rows:
                repositories.bump_index_generation(db_session=s, user_id=ctx.user_id)
        if len(rows) < batch:
            break
    return stale


def _finish_scan(ctx: JobContext, library_id: str, report: ScanReport, stale: list[str]) -> None:
    """Delete the files of the images removed that nothing else uses, and store the report on
    the library (with the files that could not be embedded so far)."""
    with session_scope(ctx.session_factory) as s:
        delete_unused_files(s, ctx.store, sorted(set(stale)))
        library = repositories.get_library(db_session=s, user_id=ctx.user_id, library_id=library_id)
        if library is not None:
            # A file that failed for a reason that may pass (its share dropped) is read again.
            repositories.retry_passing_embed_failures(db_session=s, library_id=library_id)
            _note_failures(s, library, report)
            library.report = {"job_id": ctx.job_id, **report.as_dict()}
            library.scanned_at = utcnow()


def _note_embed_failures(ctx: JobContext, library_id: str, report: ScanReport) -> None:
    """After embedding: what it could not read, and why, in the stored report."""
    with session_scope(ctx.session_factory) as s:
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
            repositories.delete_library_images(db_session=s, library_id=library_id)
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


@dataclass
class _Batch:
    """What the steps of indexing one batch share: its job, its transaction and its report,
    and the rows already indexed at the batch's paths (source path -> image; a file indexed
    or moved here takes its place)."""

    ctx: JobContext
    db_session: Session
    library_id: str
    gen: int
    report: ScanReport
    root: Path
    known: dict[str | None, Image]


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
    with session_scope(ctx.session_factory) as s:
        looked_up = {str(p) for p, _ in entries}  # and a link's target (what a row can name)
        looked_up |= {str(real) for _, real in entries if is_utf8(str(real))}
        known = {
            img.source_path: img
            for img in repositories.library_images_at(
                db_session=s, library_id=library_id, paths=sorted(looked_up)
            )
        }
        batch = _Batch(ctx, s, library_id, gen, report, root, known)
        for p, real in entries:
            _index_entry(batch, p, real)


def _index_entry(b: _Batch, p: Path, real: Path) -> None:
    """Index the file at `p`, read through `real` (itself, or a link's target): skipped, kept
    as it is, updated, taken as a move of an image whose file is gone, or added."""
    report = b.report
    try:
        st = os.stat(real)
    except OSError as e:
        report.unreadable(p, e)
        return
    if not stat.S_ISREG(st.st_mode):
        report.skip(p, "not a regular file")
        return
    target = b.known.get(str(real)) if real != p else None
    if target is not None and target.scan_generation == b.gen and _unchanged(target, st):
        # its target was indexed by this scan: not read twice
        report.skip(p, f"a link to {shown(real)} in the library; indexed there")
        return
    img = b.known.get(str(p))
    if img is not None and _unchanged(img, st):
        img.scan_generation = b.gen
        report.unchanged += 1
        return
    info = _read_file(b, p, real, st)
    if info is None:
        return
    storage_path = b.ctx.store.cache_thumbnail(info.sha256, info.ext, info.thumbnail, info.preview)
    mtime = datetime.fromtimestamp(st.st_mtime_ns / 1e9, UTC)
    same = repositories.get_image_by_sha256(
        db_session=b.db_session, user_id=b.ctx.user_id, sha256=info.sha256
    )
    if img is not None:
        _update_indexed(b, p, img, same, info, st, storage_path, mtime)
    elif same is not None:
        _move_or_skip_duplicate(b, p, same, st)
    else:
        _add_new(b, p, info, st, storage_path, mtime)


def _read_file(b: _Batch, p: Path, real: Path, st: os.stat_result) -> InspectedFile | None:
    """The file validated like an upload (hash, size limit, full decode), opened from the
    allowed root down; None, with the reason in the report, when it is refused, cannot be read
    or changed while it was read (`st`: as it was before)."""
    limits = b.ctx.settings.limits
    try:
        info = inspect_file(
            real, max_bytes=limits.max_upload_bytes, max_pixels=limits.max_pixels, within=b.root
        )
        after = os.stat(real)
    except DomainError as e:
        b.report.skip(p, e.message)
        return None
    except OSError as e:
        b.report.unreadable(p, e)
        return None
    if not FileStamp.of(st).same_file(after) or info.size_bytes != st.st_size:
        b.report.skip(p, "the file changed while it was read; the next scan takes it")
        return None
    return info


def _update_indexed(
    b: _Batch,
    p: Path,
    img: Image,
    same: Image | None,
    info: InspectedFile,
    st: os.stat_result,
    storage_path: str,
    mtime: datetime,
) -> None:
    """The file at `p`, indexed as `img`, was read again: the same bytes (only its stamp is
    new), content indexed elsewhere (`same`: this row goes), or new content (the row takes it
    and loses its vectors and any past embedding failure)."""
    if info.sha256 == img.sha256:
        # Touched, not changed (a chmod, the same bytes copied over it): its image,
        # vector and all, stay; only the new stamp is kept.
        set_source_stamp(img, st)
        img.scan_generation = b.gen
        b.report.unchanged += 1
        return
    if same is not None and same.id != img.id:
        b.db_session.delete(img)  # this path now holds content indexed elsewhere
        b.report.skip(p, f"same content as image {same.id}; indexed once")
        return
    img.sha256, img.mime, img.size_bytes = info.sha256, info.mime, info.size_bytes
    img.width, img.height, img.storage_path = info.width, info.height, storage_path
    img.embedding = img.embedding_model = None
    img.region_embeddings = img.region_layout = None
    img.taken_at = info.taken_at or mtime
    set_source_stamp(img, st)
    img.scan_generation = b.gen
    img.embed_error = None  # a new file: read again
    b.report.changed += 1


def _move_or_skip_duplicate(b: _Batch, p: Path, same: Image, st: os.stat_result) -> None:
    """A new path whose content the user has as `same`: a move when `same` is a library file
    whose path is gone (and this scan did not see it here), the row taking the new path;
    otherwise a duplicate, skipped."""
    gone = same.source_path is not None and not os.path.lexists(same.source_path)
    seen_here = same.library_id == b.library_id and same.scan_generation == b.gen
    if same.library_id is not None and gone and not seen_here:
        same.library_id, same.source_path = b.library_id, str(p)
        same.original_filename = p.name[-255:]
        set_source_stamp(same, st)
        same.scan_generation = b.gen
        same.embed_error = None  # read whole just now, at its new path
        b.known[str(p)] = same
        b.report.moved += 1
    else:
        where = same.source_path or "uploaded"
        b.report.skip(p, f"same content as image {same.id} ({where}); indexed once")


def _add_new(
    b: _Batch,
    p: Path,
    info: InspectedFile,
    st: os.stat_result,
    storage_path: str,
    mtime: datetime,
) -> None:
    """A new image for the file at `p`."""
    new = Image(
        user_id=b.ctx.user_id,
        sha256=info.sha256,
        original_filename=p.name[-255:],
        mime=info.mime,
        size_bytes=info.size_bytes,
        width=info.width,
        height=info.height,
        storage_path=storage_path,
        taken_at=info.taken_at or mtime,
        created_at=utcnow(),
        library_id=b.library_id,
        source_path=str(p),
        scan_generation=b.gen,
    )
    set_source_stamp(new, st)
    b.db_session.add(new)
    b.db_session.flush()
    b.known[str(p)] = new
    b.report.added += 1
